"""xDS resources as plain JSON and a snapshot of them: one listener (RDS over ADS), one route
configuration, EDS clusters `a` and `b` and their load assignments."""

from __future__ import annotations

from typing import Any

from controller.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot, snapshot_from_json

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def listener(name: str = "ingress", port: int = 10000) -> dict[str, Any]:
    hcm = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "rds": {"route_config_name": "local", "config_source": {"ads": {}}},
        "http_filters": [
            {
                "name": "router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
    }


def cluster(name: str) -> dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}


def assignment(name: str, port: int, weight: int = 1) -> dict[str, Any]:
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint, "load_balancing_weight": weight}]}],
    }


def snapshot(version: str = "v1", weight: int = 1, **overrides: list[dict[str, Any]]) -> Snapshot:
    resources = {
        LISTENER: [listener()],
        ROUTE: [{"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"]}]}],
        CLUSTER: [cluster("a"), cluster("b")],
        ENDPOINT: [assignment("a", 1001, weight), assignment("b", 1002)],
    }
    for key, value in overrides.items():
        resources[
            {"listeners": LISTENER, "routes": ROUTE, "clusters": CLUSTER, "endpoints": ENDPOINT}[
                key
            ]
        ] = value
    return snapshot_from_json(version, resources)
