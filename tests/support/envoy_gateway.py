"""Envoy Gateway's EnvoyPatchPolicy semantics, for applying our patches to xDS resources shaped
as Envoy Gateway builds them (internal/xds/translator/jsonpatch.go and internal/utils/jsonpatch
in envoyproxy/gateway)."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonpatch
import yaml

from tests.support.paths import REPO

# The bootstrap Envoy Gateway v1.9.0 renders for an EnvoyProxy with telemetry.metrics.matches
# (tests/schemas/SOURCES.md): its own stats_tags, a stats matcher, the xDS and stats plumbing.
EG_BOOTSTRAP = REPO / "tests" / "schemas" / "envoy-gateway" / "bootstrap-custom-stats-matcher.yaml"

_JSON_PATH = re.compile(r"\$\.\.(\w+)\[\?\(@\.name=='([^']+)'\)\](?:\.(\w+))?")


_EVERY = re.compile(r"\$((?:\.\w+\[\*\])+)")


def json_pointers(document: Any, json_path: str) -> list[str]:
    """The JSON pointers EG's JSONPath evaluation yields, for the two forms our patches use:
    `$..KEY[?(@.name=='NAME')]` with an optional `.FIELD` (recursive descent, filter on name),
    and `$.A[*].B[*]...` (every element of nested arrays)."""
    every = _EVERY.fullmatch(json_path)
    if every:
        pointers = [("", document)]
        for key in re.findall(r"\.(\w+)\[\*\]", every.group(1)):
            pointers = [
                (f"{pointer}/{key}/{i}", item)
                for pointer, node in pointers
                if isinstance(node, dict) and isinstance(node.get(key), list)
                for i, item in enumerate(node[key])
            ]
        return [pointer for pointer, _ in pointers]
    match = _JSON_PATH.fullmatch(json_path)
    assert match, f"unsupported JSONPath {json_path}"
    key, name, field = match.groups()
    found: list[str] = []

    def walk(node: Any, pointer: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key and isinstance(v, list):
                    for i, item in enumerate(v):
                        if isinstance(item, dict) and item.get("name") == name:
                            found.append(f"{pointer}/{k}/{i}" + (f"/{field}" if field else ""))
                walk(v, f"{pointer}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{pointer}/{i}")

    walk(document, "")
    return found


def apply_patches(resources: dict[tuple[str, str], Any], policies: list[dict[str, Any]]) -> None:
    """EG's EnvoyPatchPolicy semantics (xds/translator/jsonpatch.go, utils/jsonpatch): policies
    by priority; an `add` with neither path nor jsonPath adds a whole resource; a jsonPath is
    evaluated per patch and `path` appended to each pointer; RFC 6902 applies the rest."""
    for policy in sorted(policies, key=lambda p: p["spec"].get("priority", 0)):
        for patch in policy["spec"]["jsonPatches"]:
            op, key = patch["operation"], (patch["type"], patch["name"])
            if op["op"] == "add" and not op.get("path") and not op.get("jsonPath"):
                assert op["value"]["name"] == patch["name"]
                resources[key] = copy.deepcopy(op["value"])
                continue
            assert key in resources, f"EG has no {key}: the patch would be ResourceNotFound"
            pointers = json_pointers(resources[key], op["jsonPath"]) if "jsonPath" in op else [""]
            assert pointers, f"{op.get('jsonPath')} finds nothing in {key}"
            for pointer in pointers:
                step = {"op": op["op"], "path": pointer + op.get("path", "")}
                if "value" in op:
                    step["value"] = copy.deepcopy(op["value"])
                resources[key] = jsonpatch.apply_patch(resources[key], [step])


def eg_route_cluster(
    name: str, localities: list[list[tuple[str, int]]], weights: list[int]
) -> dict[str, Any]:
    """An HTTPRoute rule's cluster as Envoy Gateway builds it (its translator's golden output
    `internal/xds/translator/testdata/out/xds-ir/http-route-weighted-backend.clusters.yaml` at
    commit d32f282, in proto field names as EG marshals it before patching): one locality per
    backendRef, weighted by it, balanced by locality-weighted least request.

    EG sends the endpoints by EDS; here they are inline (`STATIC`), so the cluster runs without a
    management server. What the picking patch touches, `load_balancing_policy`, is as EG has it."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "per_connection_buffer_limit_bytes": 32768,
        "dns_lookup_family": "V4_PREFERRED",
        "ignore_health_on_host_removal": True,
        "circuit_breakers": {"thresholds": [{"max_retries": 1024}]},
        "common_lb_config": {},
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.least_request",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                            "locality_lb_config": {"locality_weighted_lb_config": {}},
                        },
                    }
                }
            ]
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "locality": {"region": f"{name}/backend/{i}"},
                    "load_balancing_weight": weight,
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": ip, "port_value": port}}
                            },
                            "load_balancing_weight": 1,
                        }
                        for ip, port in hosts
                    ],
                }
                for i, (hosts, weight) in enumerate(zip(localities, weights, strict=True))
            ],
        },
    }


_EG_MATCH_KINDS = {"Exact": "exact", "Prefix": "prefix", "Suffix": "suffix"}


def eg_stats_matcher(matches: list[dict[str, str]]) -> dict[str, Any]:
    """EnvoyProxy `telemetry.metrics.matches` as EG's bootstrap template renders them
    (internal/xds/bootstrap/bootstrap.yaml.tpl: exact, prefix, suffix, then RE2 regexes)."""
    patterns: list[dict[str, Any]] = []
    for kind in ("Exact", "Prefix", "Suffix"):
        patterns += [{_EG_MATCH_KINDS[kind]: m["value"]} for m in matches if m["type"] == kind]
    patterns += [
        {"safe_regex": {"google_re2": {}, "regex": m["value"]}}
        for m in matches
        if m["type"] == "RegularExpression"
    ]
    return {"inclusion_list": {"patterns": patterns}}


def eg_bootstrap(proxy_spec: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap EG gives the Envoys of an EnvoyProxy with `proxy_spec`: its rendered default
    with the spec's stats matches, then `spec.bootstrap` applied the way ApplyBootstrapConfig does
    for type JSONPatch (internal/xds/bootstrap/util.go: RFC 6902 on the rendered document, each
    operation's `path` a JSON pointer)."""
    rendered: dict[str, Any] = yaml.safe_load(EG_BOOTSTRAP.read_text())
    matches = proxy_spec.get("telemetry", {}).get("metrics", {}).get("matches")
    if matches:
        rendered["stats_config"]["stats_matcher"] = eg_stats_matcher(matches)
    else:
        del rendered["stats_config"]["stats_matcher"]
    bootstrap = proxy_spec.get("bootstrap")
    if bootstrap is None:
        return rendered
    assert bootstrap["type"] == "JSONPatch", "only the JSONPatch form is modelled"
    ops = [
        {k: op[k] for k in ("op", "path", "value") if k in op} for op in bootstrap["jsonPatches"]
    ]
    assert all("jsonPath" not in op for op in bootstrap["jsonPatches"])
    patched: dict[str, Any] = jsonpatch.apply_patch(rendered, ops)
    return patched
