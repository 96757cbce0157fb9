"""Engine command lines as data: one frozen table per runtime, filled by one pure function.

A table says how an engine spells its flags (model path, served name, parallelism, port,
host, metrics), where its health endpoint is, and how it spans several nodes under a
LeaderWorkerSet. `engine_command` turns an ArksApplication spec and a pod role into the
container argv; nothing else in the controller builds engine command lines.

Multi-node templates may use `{size}`, `{port}`, `{ray_port}` and `{dist_port}`, filled
here, and the LeaderWorkerSet variables `$(LWS_LEADER_ADDRESS)` and `$(LWS_WORKER_INDEX)`,
which Kubernetes expands in `command` from the env the LWS controller injects into every
container of the group.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from controller.kube.errors import PermanentError

Role = Literal["single", "leader", "worker"]

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
class EngineSpec:
    """How one runtime is started and probed."""

    runtime: str
    program: tuple[str, ...]
    model_flag: str | None  # None: the model path is the first positional argument
    served_name_flag: str
    tp_flag: str
    pp_flag: str | None  # None: pipeline parallelism is not offered by this table
    port_flag: str
    host_flag: str
    metrics_flags: tuple[str, ...]
    default_port: int
    health_path: str
    # Prometheus series for the autoscaling metric types (HPA Pods metrics).
    waiting_requests_metric: str
    kv_cache_usage_metric: str
    multi_node: MultiNode
    # Used when the application names no image (the CRD promises one). Pin it in production.
    default_image: str = ""


VLLM = EngineSpec(
    default_image="vllm/vllm-openai:latest",
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
    waiting_requests_metric="vllm:num_requests_waiting",
    kv_cache_usage_metric="vllm:kv_cache_usage_perc",
    multi_node=MultiNode(
        leader_prelude=("ray", "start", "--head", "--port={ray_port}"),
        engine_flags=("--distributed-executor-backend", "ray"),
        worker_argv=("ray", "start", "--address=$(LWS_LEADER_ADDRESS):{ray_port}", "--block"),
        worker_retry_s=5,
    ),
)

SGLANG = EngineSpec(
    default_image="lmsysorg/sglang:latest",
    runtime="sglang",
    program=("python3", "-m", "sglang.launch_server"),
    model_flag="--model-path",
    served_name_flag="--served-model-name",
    tp_flag="--tp",
    pp_flag=None,
    port_flag="--port",
    host_flag="--host",
    metrics_flags=("--enable-metrics",),
    default_port=30000,
    health_path="/health",
    waiting_requests_metric="sglang:num_queue_reqs",
    kv_cache_usage_metric="sglang:token_usage",
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
)

ENGINES: Mapping[str, EngineSpec] = {e.runtime: e for e in (VLLM, SGLANG)}


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


def engine_command(app: Mapping[str, Any], role: Role) -> list[str]:
    """The container command for `role` in the workload rendered from ArksApplication `app`."""
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

    argv = list(engine.program)
    argv += [engine.model_flag, MODEL_DIR] if engine.model_flag else [MODEL_DIR]
    argv += [engine.served_name_flag, served_model_name(spec)]
    argv += [engine.tp_flag, str(par.tp)]
    if engine.pp_flag is not None:
        argv += [engine.pp_flag, str(par.pp)]
    argv += [engine.host_flag, "0.0.0.0", engine.port_flag, str(engine.default_port)]
    argv += engine.metrics_flags
    if role != "single":
        argv += _fill(multi.engine_flags, values)
    argv += [str(a) for a in spec.get("runtimeCommonArgs") or ()]

    if role == "leader" and multi.leader_prelude:
        prelude = shlex.join(_fill(multi.leader_prelude, values))
        return ["sh", "-c", f"{prelude} && exec {shlex.join(argv)}"]
    return argv
