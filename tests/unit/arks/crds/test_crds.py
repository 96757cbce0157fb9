"""The arks.ai/v1 CRDs: generated from arks/crds, structural, and in agreement with the samples,
the demo policy and the gateway's own parser (arks/api.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from arks import api
from arks.crds import KINDS, chart_files, files, render
from arks.crds.__main__ import CHART_OUT, DEFAULT_OUT, drift, main
from tests.support.paths import DEMO_POLICY, REPO

SAMPLES = REPO / "manifests" / "samples"
FIXTURES = Path(__file__).resolve().parent / "crd_fixtures"

CRDS: dict[str, dict[str, Any]] = {kind.kind: render(kind) for kind in KINDS}


def root_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# --- a validator for CRD schemas: structural pruning means unknown fields are errors ----------

_FORMATS = jsonschema.FormatChecker(formats=())


def _date_time(value: object) -> bool:
    if not isinstance(value, str) or "T" not in value.upper():
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


_FORMATS.checks("date-time", raises=ValueError)(_date_time)


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 CRD schema as JSON Schema: x-kubernetes-* dropped, unknown fields forbidden."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("format", "default"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if node.get("format") == "date-time":
        out["format"] = "date-time"
    if (
        node.get("type") == "object"
        and "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def where(path: Iterator[Any] | Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "."


def list_map_problems(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """x-kubernetes-list-type: map — entries must be unique by their keys (JSON Schema can't say)."""
    problems: list[str] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                problems += list_map_problems(
                    schema["properties"][key], sub, f"{path}.{key}" if path else key
                )
    elif isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen = set()
            for i, item in enumerate(value):
                ident = tuple(
                    item.get(k, schema["items"]["properties"][k].get("default")) for k in keys
                )
                if ident in seen:
                    problems.append(
                        f"{path}[{i}]: duplicate entry for {dict(zip(keys, ident, strict=True))}"
                    )
                seen.add(ident)
        for i, item in enumerate(value):
            problems += list_map_problems(schema["items"], item, f"{path}[{i}]")
    return problems


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one custom resource, each as 'path: problem'."""
    schema = root_schema(obj["kind"])
    validator = jsonschema.Draft7Validator(to_json_schema(schema), format_checker=_FORMATS)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{where(e.absolute_path)}: {e.message}" for e in errors] + list_map_problems(
        schema, obj
    )


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The object as the API server stores it: defaults filled in where a field is absent."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(schema["items"], item) for item in value]
    return value


# --- a checker of the Kubernetes structural-schema rules ------------------------------------


def structural_problems(node: dict[str, Any], path: str = "") -> list[str]:
    here = path or "<root>"
    problems: list[str] = []
    passthrough = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not passthrough and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{here}: no type")
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        if junctor in node:
            problems.append(f"{here}: {junctor} is not used by these schemas (keep them simple)")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{here}: properties and additionalProperties together")
    if node.get("type") == "object":
        if not (
            "properties" in node
            or "additionalProperties" in node
            or passthrough
            or path == "metadata"
        ):
            problems.append(f"{here}: object with no fields would be pruned to {{}}")
    if node.get("type") == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{here}: array without one items schema")
    if "default" in node:
        errors = list(
            jsonschema.Draft7Validator(to_json_schema(node), format_checker=_FORMATS).iter_errors(
                node["default"]
            )
        )
        problems += [f"{here}: default {node['default']!r} is invalid: {e.message}" for e in errors]
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            sub = item.get("properties", {}).get(key)
            if sub is None or (key not in item.get("required", []) and "default" not in sub):
                problems.append(f"{here}: list-map key {key} must be a required or defaulted field")
    for key in node.get("required", []):
        if key not in node.get("properties", {}):
            problems.append(f"{here}: required {key} is not a property")
    for key, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


def at(kind: str, path: str) -> dict[str, Any]:
    """The schema node of a field path such as `spec.qos[].rateLimits[].type`."""
    found = dict(nodes(root_schema(kind)))
    assert path in found, f"{kind} has no field {path}"
    return found[path]


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


# --- (a) one source of truth ---------------------------------------------------------------


def test_committed_crds_are_what_the_python_generates() -> None:
    assert drift(DEFAULT_OUT) == [], "run `python -m arks.crds`"


def test_the_helm_charts_crds_are_the_same_without_the_kustomization() -> None:
    """Helm applies every file of a chart's crds/ as is: the CRDs, nothing else."""
    assert drift(CHART_OUT, chart_files()) == [], "run `python -m arks.crds`"
    assert set(files()) - set(chart_files()) == {"kustomization.yaml"}
    for name, text in chart_files().items():
        assert files()[name] == text


def test_check_flag_fails_on_drift(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    victim = tmp_path / "arks.ai_arkstokens.yaml"
    victim.write_text(victim.read_text().replace("rpm", "rph"))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    (tmp_path / "arks.ai_stale.yaml").write_text("{}\n")
    assert any("stale" in p for p in drift(tmp_path))


def test_kustomization_lists_every_crd() -> None:
    kustomization = yaml.safe_load(files()["kustomization.yaml"])
    assert kustomization["resources"] == [f"arks.ai_{kind.plural}.yaml" for kind in KINDS]


# --- (b) the CRDs themselves ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CRDS))
def test_crd_is_a_valid_kubernetes_object(kind: str) -> None:
    kubernetes_validate.validate(CRDS[kind], "1.33.0", strict=True)


@pytest.mark.parametrize("kind", list(CRDS))
def test_schema_is_structural(kind: str) -> None:
    assert structural_problems(root_schema(kind)) == []


@pytest.mark.parametrize("kind", list(CRDS))
def test_every_field_is_described_for_kubectl_explain(kind: str) -> None:
    undescribed = [
        p
        for p, n in nodes(root_schema(kind))
        if p.startswith(("spec", "status"))
        and not p.endswith(("{}", "[]"))
        and "description" not in n
    ]
    assert undescribed == []


def test_names_scope_and_subresources() -> None:
    short = {kind: crd["spec"]["names"]["shortNames"] for kind, crd in CRDS.items()}
    assert short == {
        "ArksModel": ["am"],
        "ArksApplication": ["arkapp"],
        "ArksDisaggregatedApplication": ["arkdapp"],
        "ArksEndpoint": ["aep"],
        "ArksToken": ["atk"],
        "ArksQuota": ["aq"],
    }
    for crd in CRDS.values():
        assert crd["spec"]["group"] == "arks.ai" and crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["categories"] == ["arks"]
        [version] = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
        assert "status" in version["subresources"]
    scale = CRDS["ArksApplication"]["spec"]["versions"][0]["subresources"]["scale"]
    assert at("ArksApplication", scale["specReplicasPath"][1:])["type"] == "integer"


@pytest.mark.parametrize("kind", list(CRDS))
def test_printer_columns_point_at_declared_fields(kind: str) -> None:
    for column in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]:
        path = re.sub(r"\[\?.*?\]", "[]", column["jsonPath"])[1:]
        if path != "metadata.creationTimestamp":
            at(kind, path)


# --- (c) samples, (f) the demo policy ------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.yaml")))
def test_sample_is_valid(sample: str) -> None:
    obj = load(SAMPLES / sample)
    assert obj["apiVersion"] == "arks.ai/v1"
    assert validation_errors(obj) == []


def test_there_is_a_sample_of_every_kind() -> None:
    assert sorted(load(p)["kind"] for p in SAMPLES.glob("*.yaml")) == sorted(CRDS)


def demo_objects() -> list[dict[str, Any]]:
    return [
        d
        for d in yaml.safe_load_all(DEMO_POLICY.read_text())
        if d and d["apiVersion"] == "arks.ai/v1"
    ]


@pytest.mark.parametrize(
    "obj", demo_objects(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_demo_policy_object_is_valid_in_a_cluster(obj: dict[str, Any]) -> None:
    assert validation_errors(obj) == []


def test_gateway_samples_parse_locally_too() -> None:
    """The samples of the gateway's kinds are also valid local policy (the formats agree)."""
    api.parse_endpoint(load(SAMPLES / "arksendpoint.yaml"))
    api.parse_token(load(SAMPLES / "arkstoken.yaml"))
    api.parse_quota(load(SAMPLES / "arksquota.yaml"))


# --- (d) negative fixtures -----------------------------------------------------------------

SCHEMA_ERRORS = {
    "token_bad_hash.yaml": ("spec.tokenHash", "does not match"),
    "token_bad_rate_limit_type.yaml": ("spec.qos[0].rateLimits[0].type", "'rph' is not one of"),
    "token_unknown_field.yaml": ("spec.qos[0]", "'rateLimit' was unexpected"),
    "quota_missing_value.yaml": ("spec.quotas[0]", "'value' is a required property"),
    "quota_bad_period.yaml": ("spec.quotas[0].period", "'year' is not one of"),
    "application_bad_runtime.yaml": ("spec.runtime", "'tgi' is not one of"),
    "application_empty_metrics.yaml": ("spec.autoscaling.metrics", "should be non-empty"),
    "application_bad_provider.yaml": ("spec.autoscaling.provider", "'knative' is not one of"),
    "application_zero_min_replicas.yaml": (
        "spec.autoscaling.minReplicas",
        "less than the minimum",
    ),
    "application_bad_engine_version.yaml": ("spec.autoscaling.engineVersion", "does not match"),
    "application_bad_scale_down_policy.yaml": (
        "spec.autoscaling.behavior.scaleDown.policies[0].type",
        "'Replicas' is not one of",
    ),
    "model_bad_size.yaml": ("spec.storage.size", "does not match"),
    "endpoint_negative_weight.yaml": ("spec.routeConfigs[0].weight", "less than the minimum"),
}


@pytest.mark.parametrize("fixture", sorted(SCHEMA_ERRORS))
def test_bad_object_is_rejected_with_its_path(fixture: str) -> None:
    path, problem = SCHEMA_ERRORS[fixture]
    errors = validation_errors(load(FIXTURES / fixture))
    assert len(errors) == 1 and errors[0].startswith(f"{path}: ") and problem in errors[0], errors


def test_autoscaling_defaults_to_an_hpa_on_waiting_requests() -> None:
    """No metrics given: waiting requests, never the HPA's CPU fallback."""
    obj = load(FIXTURES / "application_min_above_max.yaml")
    obj["spec"]["autoscaling"] = {"maxReplicas": 3}
    scaling = defaulted_spec(obj)["autoscaling"]
    assert scaling["provider"] == "hpa" and scaling["minReplicas"] == 1
    assert scaling["metrics"] == [{"type": "waitingRequests", "target": 5}]


def test_duplicate_rate_limit_type_is_rejected() -> None:
    token = load(SAMPLES / "arkstoken.yaml")
    token["spec"]["qos"][0]["rateLimits"].append({"type": "rpm", "value": 1})
    assert validation_errors(token) == [
        "spec.qos[0].rateLimits[3]: duplicate entry for {'type': 'rpm'}"
    ]


def test_every_fixture_is_covered() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.yaml")) == sorted([*SCHEMA_ERRORS, *CEL_ERRORS])


# --- (e) CEL rules: present where expected; their intent checked in Python --------------------


def rules(kind: str) -> dict[str, list[str]]:
    return {
        p: [r["rule"] for r in n["x-kubernetes-validations"]]
        for p, n in nodes(root_schema(kind))
        if "x-kubernetes-validations" in n
    }


def test_cel_rules_are_where_they_belong() -> None:
    exactly_one = "(has(self.tokenHash) ? 1 : 0) + (has(self.tokenSecretRef) ? 1 : 0) + (has(self.token) ? 1 : 0) == 1"
    assert exactly_one in rules("ArksToken")["spec"]
    assert any("arksEndpoint.name" in r for r in rules("ArksToken")["spec.qos"])
    assert rules("ArksModel")["spec.source"] == [
        "(has(self.huggingface) ? 1 : 0) + (has(self.modelscope) ? 1 : 0) + (has(self.s3) ? 1 : 0)"
        " + (has(self.url) ? 1 : 0) + (has(self.pvc) ? 1 : 0) == 1"
    ]
    assert "self.source == oldSelf.source" in rules("ArksModel")["spec"]
    spread = "(self.tensorParallelSize * self.pipelineParallelSize) % self.size == 0"
    assert rules("ArksApplication")["spec"] == [spread]
    assert rules("ArksApplication")["spec.autoscaling"] == ["self.minReplicas <= self.maxReplicas"]
    assert rules("ArksApplication")["spec.autoscaling.metrics[]"] == [
        "!(self.type in ['kvCacheUsage', 'cpu']) || self.target <= 100",
        "!has(self.quantile) || self.type in ['timeToFirstToken', 'timePerOutputToken']",
    ]
    assert rules("ArksDisaggregatedApplication")["spec.prefill"] == [spread]
    assert rules("ArksDisaggregatedApplication")["spec.decode"] == [spread]
    assert "has(self.port)" in rules("ArksEndpoint")["spec.routeConfigs[]"][0]


def test_cel_rules_are_balanced_and_name_only_declared_fields() -> None:
    for kind in CRDS:
        for path, exprs in rules(kind).items():
            node = at(kind, path)
            fields = set(node.get("properties", {})) | set(
                node.get("items", {}).get("properties", {})
            )
            for expr in exprs:
                assert expr.count("(") == expr.count(")"), expr
                for field in re.findall(r"\b(?:self|a|b)\.(\w+)\b(?!\()", expr):
                    assert field in fields, f"{kind} {path}: {expr} names unknown field {field}"


def token_sources_ok(spec: dict[str, Any]) -> bool:
    """ArksToken spec rule, in Python: exactly one of tokenHash, tokenSecretRef, token."""
    return sum(key in spec for key in ("tokenHash", "tokenSecretRef", "token")) == 1


def application_ok(spec: dict[str, Any]) -> bool:
    """ArksApplication rules, in Python, over the defaulted spec."""
    spread = (spec["tensorParallelSize"] * spec["pipelineParallelSize"]) % spec["size"] == 0
    scaling = spec.get("autoscaling")
    if scaling is None:
        return spread
    metrics_ok = all(
        (m["type"] not in ("kvCacheUsage", "cpu") or m["target"] <= 100)
        and ("quantile" not in m or m["type"] in ("timeToFirstToken", "timePerOutputToken"))
        for m in scaling["metrics"]
    )
    return spread and scaling["minReplicas"] <= scaling["maxReplicas"] and metrics_ok


def model_source_ok(spec: dict[str, Any]) -> bool:
    """ArksModel source rule, in Python: exactly one source."""
    return (
        sum(key in spec["source"] for key in ("huggingface", "modelscope", "s3", "url", "pvc")) == 1
    )


CEL_ERRORS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "token_two_sources.yaml": token_sources_ok,
    "application_uneven_ranks.yaml": application_ok,
    "application_min_above_max.yaml": application_ok,
    "application_quantile_on_queue.yaml": application_ok,
    "application_kv_cache_over_100.yaml": application_ok,
    "model_two_sources.yaml": model_source_ok,
}


def defaulted_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = with_defaults(root_schema(obj["kind"]), obj)["spec"]
    return spec


@pytest.mark.parametrize("fixture", sorted(CEL_ERRORS))
def test_cel_only_mistakes_pass_the_schema_but_break_the_rule(fixture: str) -> None:
    obj = load(FIXTURES / fixture)
    assert validation_errors(obj) == []
    assert not CEL_ERRORS[fixture](defaulted_spec(obj))


def test_samples_and_demo_satisfy_the_rules() -> None:
    objects = [load(p) for p in SAMPLES.glob("*.yaml")] + demo_objects()
    for obj in objects:
        if obj["kind"] == "ArksToken":
            assert token_sources_ok(defaulted_spec(obj)), obj["metadata"]["name"]
        if obj["kind"] == "ArksApplication":
            assert application_ok(defaulted_spec(obj)), obj["metadata"]["name"]


# --- (g) every field the gateway's parser reads exists in the CRD ----------------------------

# What arks/api.py reads (parse_endpoint, parse_token, parse_quota). Update both together.
GATEWAY_FIELDS = {
    "ArksEndpoint": [
        "spec.routeConfigs[].group",
        "spec.routeConfigs[].kind",
        "spec.routeConfigs[].name",
        "spec.routeConfigs[].namespace",
        "spec.routeConfigs[].port",
        "spec.routeConfigs[].weight",
        "spec.defaultWeight",
        "spec.gatewayRef",
        "spec.matchConfigs",
        "spec.weighting",
        "spec.maxTokens",
    ],
    "ArksToken": [
        "spec.tokenHash",
        "spec.tokenSecretRef.name",
        "spec.tokenSecretRef.key",
        "spec.token",
        "spec.expiresAt",
        "spec.disabled",
        "spec.qos[].arksEndpoint.name",
        "spec.qos[].rateLimits[].type",
        "spec.qos[].rateLimits[].value",
        "spec.qos[].quota.name",
        "status.tokenHash",  # published by the controller, read by the gateway
        "status.tokenHashSecret.name",
        "status.tokenHashSecret.key",
    ],
    "ArksQuota": [
        "spec.quotas[].type",
        "spec.quotas[].value",
        "spec.quotas[].period",
        "spec.prices[].model",
        "spec.prices[].input",
        "spec.prices[].output",
        "spec.prices[].perSecond",
    ],
}


@pytest.mark.parametrize(("kind", "path"), [(k, p) for k, ps in GATEWAY_FIELDS.items() for p in ps])
def test_crd_has_every_field_the_gateway_reads(kind: str, path: str) -> None:
    at(kind, path)


def test_gateway_field_list_covers_every_crd_spec_leaf() -> None:
    """The other direction: a spec field the CRD adds must be one the parser reads."""
    for kind, listed in GATEWAY_FIELDS.items():
        leaves = {
            p
            for p, n in nodes(root_schema(kind))
            if p.startswith("spec.")
            and not p.endswith("[]")
            and "properties" not in n
            and "properties" not in n.get("items", {})
        }
        assert leaves - set(listed) <= {p for p in leaves if p.startswith("spec.gatewayRef.")}, kind


def test_enums_and_defaults_match_the_parser() -> None:
    assert at("ArksToken", "spec.qos[].rateLimits[].type")["enum"] == list(api.RATE_LIMIT_TYPES)
    assert at("ArksQuota", "spec.quotas[].type")["enum"] == list(api.QUOTA_TYPES)
    assert at("ArksQuota", "spec.quotas[].period")["enum"] == list(api.QUOTA_PERIODS)
    assert at("ArksQuota", "spec.quotas[].period")["default"] == "none"
    assert at("ArksToken", "spec.tokenHash")["pattern"] == api._DIGEST.pattern
    assert at("ArksToken", "spec.tokenSecretRef.key")["default"] == api.SecretRef("x").key
    ref = api.BackendRef(name="x", namespace="y")
    assert at("ArksEndpoint", "spec.routeConfigs[].kind")["default"] == ref.kind
    assert at("ArksEndpoint", "spec.routeConfigs[].group")["default"] == ref.group
    assert at("ArksEndpoint", "spec.routeConfigs[].weight")["default"] == ref.weight
    assert (
        at("ArksEndpoint", "spec.defaultWeight")["default"]
        == api.ArksEndpoint.__dataclass_fields__["default_weight"].default
    )


def test_expiry_must_be_a_full_rfc3339_time() -> None:
    """YAML reads `2030-01-01` as a date locally; in a cluster it must be a full timestamp."""
    token = load(SAMPLES / "arkstoken.yaml")
    token["spec"]["expiresAt"] = "2030-01-01"
    assert validation_errors(token) == ["spec.expiresAt: '2030-01-01' is not a 'date-time'"]
