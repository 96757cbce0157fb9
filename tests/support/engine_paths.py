"""The engines' own admin and operations paths (vLLM's, SGLang's): a tenant never reaches them
through the gateway (unit tests decide on them, integration tests send them through Envoy)."""

ENGINE_ADMIN_PATHS = (
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/metrics",
    "/health",
    "/version",
    "/server_info",
    "/get_server_info",
    "/start_profile",
    "/stop_profile",
    "/reset_prefix_cache",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/invocations",
    "/pooling/",
)
