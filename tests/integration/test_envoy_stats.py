"""The Envoy stats inclusion list (arks/envoy_stats.py) on the real local Envoy: after traffic,
/stats/prometheus shows the families the dashboards and alerts read, and not the ones left out.

And the cluster-name tag of the same module on real Envoys: a model with dots in its name keeps
them in `envoy_cluster_name` (so the scrape relabelling's `model` is the ArksEndpoint's name, read
back from a real Prometheus), on the local stack's Envoy and on Envoy 1.39 running the bootstrap
Envoy Gateway renders with EnvoyProxy arks-proxy's patch applied."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from arks.api import token_digest
from arks.prometheus_config import envoy_job
from launcher.procs import Child, Supervisor, free_port, wait_http
from tests.support.envoy_gateway import eg_bootstrap, eg_route_cluster
from tests.support.exposition import families
from tests.support.manifests import INSTALL, one
from tests.support.objects import backend, endpoint, token
from tests.support.prometheus import Prometheus
from tests.support.stack import Stack, running_stack
from tests.support.tools import tool
from tests.support.waiting import wait_for

DOTTED = "llama-3.1-8b"
CAROL = "sk-arks-test-carol-3f1d2e9a7b6c"

INCLUDED = (
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_rq_time",
    "envoy_cluster_upstream_rq_timeout",
    "envoy_cluster_upstream_rq_retry",
    "envoy_cluster_membership_healthy",
    "envoy_cluster_membership_total",
    "envoy_cluster_outlier_detection_ejections_active",
    "envoy_cluster_update_rejected",
    "envoy_http_downstream_rq_xx",
    "envoy_http_downstream_rq_time",
    "envoy_http_ext_proc_streams_started",
    "envoy_http_ext_proc_streams_failed",
    "envoy_http_ext_proc_message_timeouts",
    "envoy_http_rds_update_rejected",
    "envoy_access_logs_grpc_access_log_logs_written",
    "envoy_access_logs_grpc_access_log_logs_dropped",
    "envoy_cluster_manager_cds_update_rejected",
    "envoy_listener_manager_lds_update_rejected",
    "envoy_control_plane_connected_state",
    "envoy_server_live",
    "envoy_server_uptime",
)
EXCLUDED_PREFIXES = (
    "envoy_cluster_http2_",  # codec internals, per cluster
    "envoy_cluster_lb_",
    "envoy_cluster_upstream_cx_rx_bytes",
    "envoy_http_downstream_cx_length_ms",
    "envoy_http_tracing_",
    "envoy_filesystem_",
    "envoy_runtime_",
    "envoy_server_worker_",  # per worker thread
    "envoy_workers_",
    "envoy_thread_local_cluster_manager_",
)


def test_envoy_exports_what_dashboards_and_alerts_read_and_nothing_left_out(stack: Stack) -> None:
    answer = stack.client().chat.completions.create(
        model="model-a", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices
    stack.usage("alice", "model-a")  # the access log has been flushed
    text = httpx.get(f"{stack.local.admin_url}/stats/prometheus", timeout=5).text
    found = families(text)
    missing = [name for name in INCLUDED if name not in found]
    assert not missing
    left_out = [n for n in found if n.startswith(EXCLUDED_PREFIXES)]
    assert not left_out
    assert len(found) < 250  # without the inclusion list, Envoy 1.40 exports about 450 families


Samples = list[tuple[str, dict[str, str], float]]


_SAMPLE = re.compile(r"^(envoy_cluster_\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def cluster_samples(text: str) -> Samples:
    """Every `envoy_cluster_*` sample of Envoy's exposition (not `envoy_cluster_manager_*`), by
    the names Envoy writes (a parser for clients would add `_total` to counters)."""
    out: Samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not match.group(1).startswith("envoy_cluster_manager_"):
            out.append(
                (match.group(1), dict(_LABEL.findall(match.group(2))), float(match.group(3)))
            )
    return out


def envoy_cluster_names(admin_url: str) -> set[str]:
    clusters = httpx.get(f"{admin_url}/clusters?format=json", timeout=5).json()
    return {c["name"] for c in clusters["cluster_statuses"]}


def assert_tagged_by_whole_cluster_names(samples: Samples, clusters: set[str]) -> None:
    """Each cluster series names one of Envoy's clusters, whole, and no metric name holds a
    piece of a cluster name (what the default tag left behind: `envoy_cluster_1_8b_...`)."""
    untagged = [(n, labels) for n, labels, _ in samples if "envoy_cluster_name" not in labels]
    assert not untagged
    assert {labels["envoy_cluster_name"] for _, labels, _ in samples} <= clusters
    polluted = [n for n, _, _ in samples if "1_8b" in n or "llama" in n or "rule" in n]
    assert not polluted


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for n, sample_labels, v in samples if n == name and sample_labels == labels]
    return found[0] if found else None


@pytest.fixture(scope="module")
def dotted_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The local stack with one more model, `llama-3.1-8b`, on an engine of its own."""
    tmp = tmp_path_factory.mktemp("dotted")
    port = free_port()
    with Supervisor(log_dir=tmp / "sim-logs") as sims:
        sim = sims.python("sim-dotted", "launcher.sim", "--port", str(port), "--model", DOTTED)
        wait_http(sim, f"http://127.0.0.1:{port}/health")
        documents = [
            backend("sim-dotted", port),
            endpoint(DOTTED, "sim-dotted"),
            token("carol", [DOTTED], tokenHash=token_digest(CAROL)),
        ]
        with running_stack(tmp / "stack", documents) as stack:
            yield stack


def test_a_dotted_model_keeps_its_name_in_the_local_envoys_cluster_series(
    dotted_stack: Stack, tmp_path: Path
) -> None:
    answer = dotted_stack.client(CAROL).chat.completions.create(
        model=DOTTED, messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices
    admin = dotted_stack.local.admin_url
    samples = cluster_samples(httpx.get(f"{admin}/stats/prometheus", timeout=5).text)
    cluster = f"endpoint/default/{DOTTED}"
    assert value(samples, "envoy_cluster_upstream_rq_total", envoy_cluster_name=cluster) == 1
    # The origin scope (`external.`) is read as part of the stat, not of the name.
    assert (
        value(
            samples,
            "envoy_cluster_external_upstream_rq_xx",
            envoy_response_code_class="2",
            envoy_cluster_name=cluster,
        )
        == 1
    )
    assert (
        value(
            samples,
            "envoy_cluster_upstream_rq",
            envoy_response_code="200",
            envoy_cluster_name=cluster,
        )
        == 1
    )
    assert_tagged_by_whole_cluster_names(samples, envoy_cluster_names(admin))

    # The scrape relabelling (arks.prometheus_config) then gives the ArksEndpoint's name.
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        prom = Prometheus.start_jobs(sup, tmp_path / "prom", [envoy_job([admin.split("//")[1]])])
        found = wait_for(
            lambda: prom.query(f'envoy_cluster_upstream_rq_total{{model="{DOTTED}"}}'),
            lambda result: bool(result),
            timeout=30,
        )
    ((labels, total),) = found
    assert (labels["namespace"], labels["envoy_cluster_name"], total) == ("default", cluster, 1)


ROUTE_CLUSTER = f"httproute/team-a/{DOTTED}/rule/0"  # Envoy Gateway's name for the route's rule


def runnable_eg_bootstrap(admin_port: int, listen_port: int, engine_port: int) -> dict[str, Any]:
    """EG's bootstrap for arks-proxy with the xDS plumbing taken out (no management server here)
    and, in its place, what EG would send: a listener routing to the model's route cluster. The
    node's zone and the engine's are set, so Envoy also counts `zone.<from>.<to>.` stats."""
    config = eg_bootstrap(one("EnvoyProxy", "arks-proxy", INSTALL)["spec"])
    del config["dynamic_resources"], config["cluster_manager"]
    config["node"]["locality"]["zone"] = "zone-a"
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    static = config["static_resources"]
    static["clusters"] = [c for c in static["clusters"] if c["name"] == "prometheus_stats"]
    static["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ]["socket_address"]["port_value"] = admin_port
    route_cluster = eg_route_cluster(ROUTE_CLUSTER, [[("127.0.0.1", engine_port)]], [1])
    route_cluster["load_assignment"]["endpoints"][0]["locality"]["zone"] = "zone-b"
    static["clusters"].append(route_cluster)
    stats_listener = static["listeners"][0]
    stats_listener["address"]["socket_address"].update(address="127.0.0.1", port_value=free_port())
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "http-10080",
            "route_config": {
                "name": "arks-system/arks-gateway/http",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": ROUTE_CLUSTER}}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }
    static["listeners"].append(
        {
            "name": "arks-system/arks-gateway/http",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
            "filter_chains": [{"filters": [hcm]}],
        }
    )
    return config


def test_a_dotted_route_keeps_its_name_under_envoy_gateways_bootstrap(tmp_path: Path) -> None:
    admin_port, listen_port, engine_port = free_port(), free_port(), free_port()
    config_path = tmp_path / "eg-bootstrap.json"
    config_path.write_text(json.dumps(runnable_eg_bootstrap(admin_port, listen_port, engine_port)))
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        sim = sup.python("sim", "launcher.sim", "--port", str(engine_port), "--model", DOTTED)
        wait_http(sim, f"http://127.0.0.1:{engine_port}/health")
        envoy: Child = sup.start(
            "envoy-1.39",
            [str(tool("envoy-1.39")), "-c", str(config_path), "--base-id", str(admin_port)],
        )
        admin = f"http://127.0.0.1:{admin_port}"
        wait_http(envoy, f"{admin}/ready")
        assert httpx.get(f"http://127.0.0.1:{listen_port}/health", timeout=5).status_code == 200
        samples = cluster_samples(httpx.get(f"{admin}/stats/prometheus", timeout=5).text)
        clusters = envoy_cluster_names(admin)
    name = {"envoy_cluster_name": ROUTE_CLUSTER}
    assert value(samples, "envoy_cluster_upstream_rq_total", **name) == 1
    assert value(samples, "envoy_cluster_membership_total", **name) == 1
    # Envoy Gateway's own zone tags stay; their regexes also take the dot after `zone`, hence
    # its `zoneupstream` (the same without our tag).
    zone = {"from_zone": "zone-a", "to_zone": "zone-b"}
    assert (
        value(
            samples,
            "envoy_cluster_zoneupstream_rq_xx",
            envoy_response_code_class="2",
            **zone,
            **name,
        )
        == 1
    )
    assert_tagged_by_whole_cluster_names(samples, clusters)
