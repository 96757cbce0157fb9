"""Engine command lines as data: one frozen table per runtime, filled by pure functions.

A table says how an engine spells its flags (model path, served name, parallelism, port,
host, metrics), where its health endpoints are, how it spans several nodes under a
LeaderWorkerSet, and how it runs as the prefill or decode half of a disaggregated pair.
A router table says the same for what sits in front of the engines (the Dynamo frontend,
the SGLang router). `engine_command` and `router_command` turn a spec into the container
argv; nothing else in the controller builds command lines.

Dynamo runs vLLM as its backend (`python3 -m dynamo.vllm`): the CRD has no field to pick
another one, and the vLLM backend is the one with the same multi-node recipe (Ray) as our
plain vLLM table.

Multi-node templates may use `{size}`, `{port}`, `{ray_port}` and `{dist_port}`, filled
here, and the LeaderWorkerSet variables `$(LWS_LEADER_ADDRESS)` and `$(LWS_WORKER_INDEX)`,
which Kubernetes expands in `command` from the env the LWS controller injects into every
container of the group.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from arks.adapters.kube.errors import PermanentError
from controller.render.engine_flags import (
    describe,
    tables_for_image,
    translate_args,
    unknown_flags,
)

Role = Literal["single", "leader", "worker"]
DisaggregationMode = Literal["prefill", "decode"]

MODEL_DIR = "/models"
RAY_PORT = 6379
DIST_INIT_PORT = 20000


class UnsupportedApplication(PermanentError):
    """The spec asks for something the chosen runtime cannot run; retrying will not help."""


@dataclass(frozen=True)
class MultiNode:
    """How one engine instance spans a LeaderWorkerSet group."""

    # Run on the leader before the engine, e.g. a Ray head; joined with `&&` in `sh -c`.
    leader_prelude: tuple[str, ...] = ()
    # Added to the engine argv on every pod that runs the engine.
    engine_flags: tuple[str, ...] = ()
    # What workers run instead of the engine; None means workers run the engine too.
    worker_argv: tuple[str, ...] | None = None
    # Retry `worker_argv` until it succeeds: the leader may not be listening yet, and a
    # failing worker container would restart the whole group (RecreateGroupOnPodRestart).
    worker_retry_s: int = 0


@dataclass(frozen=True)
class Disaggregation:
    """How an engine runs as the prefill or the decode half of a disaggregated pair."""

    mode_flag: str  # followed by "prefill" or "decode"
    # (flag, value) pairs added unless the user's args already give the flag; both halves of a
    # pair must agree on them (`shared_pd_flags`): a value one group's args give is the other's.
    default_flags: tuple[tuple[str, str], ...] = ()
    # SGLang: prefill instances run a bootstrap server that decode instances contact for the
    # KV transfer; the router learns its port from a pod annotation.
    bootstrap_port_flag: str | None = None
    bootstrap_port: int = 0
    bootstrap_port_annotation: str = ""
    # Variables set to the pod IP, so peers on other nodes can reach the KV transfer channel.
    pod_ip_env: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouterSpec:
    """What serves the public HTTP API in front of engines that do not (or not alone)."""

    name: str
    program: tuple[str, ...]
    port_flag: str
    host_flag: str | None  # None: the program listens on all interfaces by default
    default_port: int
    readiness_path: str
    liveness_path: str
    # Prefill/decode mode with Kubernetes pod discovery, filled by `router_command`.
    pd_flags: tuple[str, ...] = ()
    prefill_selector_flag: str | None = None
    decode_selector_flag: str | None = None
    metrics_flags: tuple[str, ...] = ()
    # The router lists and watches pods itself, so it needs a service account and a Role.
    watches_pods: bool = False
    # The router tokenizes, reading the files the workers registered from the model path.
    needs_model: bool = False
    flag_table: str = ""  # its table in `engine_flags`


@dataclass(frozen=True)
class EngineSpec:
    """How one runtime is started and probed."""

    runtime: str
    program: tuple[str, ...]
    model_flag: str | None  # None: the model path is the first positional argument
    served_name_flag: str
    tp_flag: str
    pp_flag: str | None  # None: pipeline parallelism is not offered by this table
    port_flag: str | None  # None: the engine serves no HTTP API; `default_port` is for probes
    host_flag: str | None
    metrics_flags: tuple[str, ...]
    default_port: int
    health_path: str
    multi_node: MultiNode
    # Used when the application names no image: pinned to a version whose flags are in
    # `engine_flag_tables` (a moving tag would change the flags under a running spec).
    default_image: str = ""
    port_name: str = "http"  # the container port the probes use
    liveness_path: str | None = None  # None: the health path
    env: tuple[tuple[str, str], ...] = ()
    # Set when the engine pods do not serve the OpenAI API themselves: this serves it.
    frontend: RouterSpec | None = None
    # The router of a disaggregated deployment; None: the runtime has no such mode.
    pd_router: RouterSpec | None = None
    disaggregation: Disaggregation | None = None
    # "dynamo": the pods find each other through Dynamo's discovery (etcd) and need its env.
    discovery: str = ""


SGLANG_ROUTER = RouterSpec(
    name="sglang-router",
    program=("python3", "-m", "sglang_router.launch_router"),
    port_flag="--port",
    host_flag="--host",
    default_port=30000,
    readiness_path="/readiness",  # 503 until the router has healthy workers
    liveness_path="/liveness",
    pd_flags=(
        "--pd-disaggregation",
        "--service-discovery",
        "--service-discovery-namespace",
        "{namespace}",
        "--service-discovery-port",
        "{engine_port}",
        # No --bootstrap-port-annotation: sglang-router has no such flag (0.1.5 to 0.3.2); it
        # reads the `sglang.ai/bootstrap-port` annotation, which is what we set.
    ),
    prefill_selector_flag="--prefill-selector",
    decode_selector_flag="--decode-selector",
    metrics_flags=("--prometheus-host", "0.0.0.0", "--prometheus-port", "29000"),
    watches_pods=True,
    flag_table="sglang-router",
)

DYNAMO_FRONTEND = RouterSpec(
    name="dynamo-frontend",
    program=("python3", "-m", "dynamo.frontend"),
    port_flag="--http-port",
    host_flag=None,  # --http-host defaults to 0.0.0.0
    default_port=8000,
    readiness_path="/health",
    liveness_path="/live",
    needs_model=True,
    flag_table="dynamo-frontend",
    # Disaggregation needs no flag: the frontend pairs the prefill and decode workers it
    # discovers in its Dynamo namespace.
)

VLLM = EngineSpec(
    default_image="vllm/vllm-openai:v0.16.0",  # a version with a flag table
    runtime="vllm",
    program=("vllm", "serve"),
    model_flag=None,
    served_name_flag="--served-model-name",
    tp_flag="--tensor-parallel-size",
    pp_flag="--pipeline-parallel-size",
    port_flag="--port",
    host_flag="--host",
    metrics_flags=(),  # /metrics is always served by the OpenAI server
    default_port=8000,
    health_path="/health",
    multi_node=MultiNode(
        leader_prelude=("ray", "start", "--head", "--port={ray_port}"),
        engine_flags=("--distributed-executor-backend", "ray"),
        worker_argv=("ray", "start", "--address=$(LWS_LEADER_ADDRESS):{ray_port}", "--block"),
        worker_retry_s=5,
    ),
)

SGLANG = EngineSpec(
    default_image="lmsysorg/sglang:v0.5.9",
    runtime="sglang",
    program=("python3", "-m", "sglang.launch_server"),
    model_flag="--model-path",
    served_name_flag="--served-model-name",
    tp_flag="--tp-size",  # `--tp` in SGLang's docs is argparse's abbreviation of it
    pp_flag=None,
    port_flag="--port",
    host_flag="--host",
    metrics_flags=("--enable-metrics",),
    default_port=30000,
    health_path="/health",
    multi_node=MultiNode(
        engine_flags=(
            "--dist-init-addr",
            "$(LWS_LEADER_ADDRESS):{dist_port}",
            "--nnodes",
            "{size}",
            "--node-rank",
            "$(LWS_WORKER_INDEX)",
        ),
    ),
    pd_router=SGLANG_ROUTER,
    disaggregation=Disaggregation(
        mode_flag="--disaggregation-mode",
        default_flags=(("--disaggregation-transfer-backend", "mooncake"),),
        bootstrap_port_flag="--disaggregation-bootstrap-port",
        bootstrap_port=8998,
        bootstrap_port_annotation="sglang.ai/bootstrap-port",
    ),
)

SYSTEM_PORT = 9090

# Dynamo's vLLM worker: no HTTP API of its own (the frontend serves it); it registers in
# Dynamo's discovery and reports health and metrics (vLLM's too) on the system port.
DYNAMO_VLLM = replace(
    VLLM,
    default_image="nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
    runtime="dynamo",
    program=("python3", "-m", "dynamo.vllm"),
    model_flag="--model",
    port_flag=None,
    host_flag=None,
    default_port=SYSTEM_PORT,
    port_name="system",
    health_path="/health",
    liveness_path="/live",
    env=(
        ("DYN_SYSTEM_ENABLED", "true"),  # older releases; newer ones enable it by the port
        ("DYN_SYSTEM_PORT", str(SYSTEM_PORT)),
        # /health answers 200 only once the worker's generate endpoint is serving.
        ("DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS", '["generate"]'),
    ),
    frontend=DYNAMO_FRONTEND,
    pd_router=DYNAMO_FRONTEND,
    disaggregation=Disaggregation(
        mode_flag="--disaggregation-mode",
        # NIXL's side channel defaults to localhost; peers in other pods need the pod IP.
        pod_ip_env=("VLLM_NIXL_SIDE_CHANNEL_HOST",),
    ),
    discovery="dynamo",
)

ENGINES: Mapping[str, EngineSpec] = {e.runtime: e for e in (VLLM, SGLANG, DYNAMO_VLLM)}


@dataclass(frozen=True)
class Parallelism:
    tp: int
    pp: int
    size: int

    @property
    def gpus_per_pod(self) -> int:
        return self.tp * self.pp // self.size


def engine_for(spec: Mapping[str, Any]) -> EngineSpec:
    runtime = str(spec.get("runtime", "vllm"))
    engine = ENGINES.get(runtime)
    if engine is None:
        raise UnsupportedApplication(f"runtime {runtime!r} is not supported by this renderer")
    return engine


def served_model_name(spec: Mapping[str, Any]) -> str:
    return str(spec.get("servedModelName") or spec["model"]["name"])


def parallelism(spec: Mapping[str, Any]) -> Parallelism:
    p = Parallelism(
        tp=int(spec.get("tensorParallelSize", 1)),
        pp=int(spec.get("pipelineParallelSize", 1)),
        size=int(spec.get("size", 1)),
    )
    if min(p.tp, p.pp, p.size) < 1:
        raise UnsupportedApplication("tensorParallelSize, pipelineParallelSize, size must be >= 1")
    if (p.tp * p.pp) % p.size:
        raise UnsupportedApplication(
            f"tensorParallelSize*pipelineParallelSize ({p.tp * p.pp}) is not a multiple "
            f"of size ({p.size}): GPUs cannot be split evenly across the group's pods"
        )
    return p


def _fill(template: Sequence[str], values: Mapping[str, object]) -> list[str]:
    return [arg.format_map(values) for arg in template]


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value the last `flag` in `args` gives (`--flag value` or `--flag=value`), else None."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg[len(flag) + 1 :]
    return found


def user_args(spec: Mapping[str, Any]) -> list[str]:
    """The group's `runtimeCommonArgs`, with flags spelled for another engine translated."""
    return translate_args(
        engine_for(spec).runtime, [str(a) for a in spec.get("runtimeCommonArgs") or ()]
    )


def args_problems(spec: Mapping[str, Any], where: str = "runtimeCommonArgs") -> list[str]:
    """What is wrong with the user's engine flags of an ArksApplication-shaped `spec`: the flags
    (after translation) that its engine's flag table for the image does not list."""
    engine = engine_for(spec)
    candidates = tables_for_image(engine.runtime, str(spec.get("image") or engine.default_image))
    unknown = unknown_flags(user_args(spec), candidates)
    if not unknown:
        return []
    return [f"{where}: {', '.join(unknown)} not accepted by {describe(candidates)}"]


def router_args_problems(router: RouterSpec, args: Sequence[str], where: str) -> list[str]:
    """The same for the extra args of a router (the SGLang router, the Dynamo frontend)."""
    candidates = tables_for_image(router.flag_table, "")
    unknown = unknown_flags([str(a) for a in args], candidates)
    if not unknown:
        return []
    return [f"{where}: {', '.join(unknown)} not accepted by {describe(candidates)}"]


def shared_pd_flags(
    engine: EngineSpec, prefill: Mapping[str, Any], decode: Mapping[str, Any]
) -> tuple[tuple[str, str], ...]:
    """The disaggregation defaults both halves of a pair use: the engine's, unless one group's
    args give another value (then both use it); two different values cannot transfer KV."""
    pd = engine.disaggregation
    if pd is None:
        return ()
    shared = []
    for flag, default in pd.default_flags:
        given = {
            mode: v
            for mode, spec in (("prefill", prefill), ("decode", decode))
            if (v := flag_value(user_args(spec), flag)) is not None
        }
        if len(set(given.values())) > 1:
            raise UnsupportedApplication(
                f"prefill and decode must use the same {flag}: prefill gives "
                f"{given['prefill']!r}, decode {given['decode']!r}"
            )
        shared.append((flag, next(iter(given.values()), default)))
    return tuple(shared)


def engine_command(
    app: Mapping[str, Any],
    role: Role,
    *,
    disaggregation: DisaggregationMode | None = None,
    pd_flags: Sequence[tuple[str, str]] | None = None,
) -> list[str]:
    """The container command for `role` in the workload rendered from ArksApplication `app`.

    `disaggregation` makes it the prefill or decode half of a disaggregated pair (`app` is
    then the group's spec in ArksApplication shape); `pd_flags` are the pair's shared
    defaults (`shared_pd_flags`; the engine's own when None).
    """
    spec = app["spec"]
    engine = engine_for(spec)
    par = parallelism(spec)
    if role != "single" and par.size < 2:
        raise ValueError(f"role {role!r} needs size > 1")
    if role == "single" and par.size > 1:
        raise ValueError("size > 1 renders leader and worker roles")
    if par.pp > 1 and engine.pp_flag is None:
        raise UnsupportedApplication(
            f"pipelineParallelSize > 1 is not supported for runtime {engine.runtime}"
        )
    pd = engine.disaggregation
    if disaggregation is not None and pd is None:
        raise UnsupportedApplication(f"runtime {engine.runtime} has no disaggregated mode")
    values = {
        "size": par.size,
        "port": engine.default_port,
        "ray_port": RAY_PORT,
        "dist_port": DIST_INIT_PORT,
    }
    multi = engine.multi_node

    if role == "worker" and multi.worker_argv is not None:
        worker = shlex.join(_fill(multi.worker_argv, values))
        if multi.worker_retry_s:
            worker = f"until {worker}; do sleep {multi.worker_retry_s}; done"
        return ["sh", "-c", worker]

    args = user_args(spec)
    argv = list(engine.program)
    argv += [engine.model_flag, MODEL_DIR] if engine.model_flag else [MODEL_DIR]
    argv += [engine.served_name_flag, served_model_name(spec)]
    argv += [engine.tp_flag, str(par.tp)]
    if engine.pp_flag is not None:
        argv += [engine.pp_flag, str(par.pp)]
    if engine.host_flag is not None:
        argv += [engine.host_flag, "0.0.0.0"]
    if engine.port_flag is not None:
        argv += [engine.port_flag, str(engine.default_port)]
    argv += engine.metrics_flags
    if role != "single":
        argv += _fill(multi.engine_flags, values)
    if disaggregation is not None and pd is not None:
        argv += [pd.mode_flag, disaggregation]
        for flag, value in pd.default_flags if pd_flags is None else pd_flags:
            if not _has_flag(args, flag):
                argv += [flag, value]
        if disaggregation == "prefill" and pd.bootstrap_port_flag is not None:
            argv += [pd.bootstrap_port_flag, str(pd.bootstrap_port)]
    argv += args

    if role == "leader" and multi.leader_prelude:
        prelude = shlex.join(_fill(multi.leader_prelude, values))
        return ["sh", "-c", f"{prelude} && exec {shlex.join(argv)}"]
    return argv


def _selector_args(labels: Mapping[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in labels.items()]


def router_command(
    router: RouterSpec,
    *,
    namespace: str = "",
    engine: EngineSpec | None = None,
    prefill_selector: Mapping[str, str] | None = None,
    decode_selector: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command of `router` in front of `engine` pods; with selectors, in prefill/decode mode."""
    argv = list(router.program)
    if router.host_flag is not None:
        argv += [router.host_flag, "0.0.0.0"]
    argv += [router.port_flag, str(router.default_port)]
    if prefill_selector is not None and decode_selector is not None and router.pd_flags:
        if engine is None or engine.disaggregation is None:
            raise ValueError("prefill/decode routing needs an engine with a disaggregated mode")
        values = {"namespace": namespace, "engine_port": engine.default_port}
        argv += _fill(router.pd_flags, values)
        if router.prefill_selector_flag and router.decode_selector_flag:
            argv += [router.prefill_selector_flag, *_selector_args(prefill_selector)]
            argv += [router.decode_selector_flag, *_selector_args(decode_selector)]
    argv += router.metrics_flags
    argv += [str(a) for a in extra_args]
    return argv
