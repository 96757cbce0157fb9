"""ArksEndpoint, ArksToken and ArksQuota: the objects the gateway reads (see `arks/api.py`).

Field names, enums and defaults follow the parsers in `arks/api.py`, so one policy file is
valid both locally and in a cluster; `tests/unit/arks/crds/test_crds.py` guards that they agree.
"""

from __future__ import annotations

from arks.api import QUOTA_PERIODS, QUOTA_TYPES, RATE_LIMIT_TYPES, WEIGHTED, WEIGHTINGS
from arks.crds.render import Column, Kind
from arks.crds.schema import (
    NAME_PATTERN,
    array,
    boolean,
    conditions,
    integer,
    name,
    number,
    obj,
    object_ref,
    observed_generation,
    passthrough,
    rule,
    secret_key_ref,
    string,
)

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
_GROUP_PATTERN = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND_PATTERN = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"

EXACTLY_ONE_TOKEN_SOURCE = "(has(self.tokenHash) ? 1 : 0) + (has(self.tokenSecretRef) ? 1 : 0) + (has(self.token) ? 1 : 0) == 1"
ONE_QOS_PER_ENDPOINT = (
    "self.all(a, self.filter(b, b.arksEndpoint.name == a.arksEndpoint.name).size() == 1)"
)
SERVICE_NEEDS_PORT = "self.group != '' || self.kind != 'Service' || has(self.port)"

# --- ArksEndpoint ---------------------------------------------------------------------------

route_config = obj(
    {
        "group": string(
            "API group of the backend; empty for core Services.",
            pattern=_GROUP_PATTERN,
            max_length=253,
            default="",
        ),
        "kind": string(
            "Kind of the backend: Service, or gateway.envoyproxy.io Backend.",
            pattern=_KIND_PATTERN,
            max_length=63,
            default="Service",
        ),
        "name": name("Name of the backend."),
        "namespace": string(
            "Namespace of the backend; defaults to the endpoint's.",
            pattern=NAME_PATTERN,
            max_length=63,
        ),
        "port": integer("Port of a Service backend.", minimum=1, maximum=65535),
        "weight": integer(
            "Share of the traffic, relative to the other backends.",
            minimum=0,
            maximum=1000000,
            default=1,
        ),
    },
    "A static backend (a Gateway API backendRef with a weight).",
    required=["name"],
    rules=[
        rule(
            SERVICE_NEEDS_PORT,
            "port is required for a Service backend",
            reason="FieldValueRequired",
        )
    ],
)

endpoint_spec = obj(
    {
        "routeConfigs": array(
            route_config, "Static backends, in addition to discovered applications.", max_items=64
        ),
        "defaultWeight": integer(
            "Weight of each discovered application.", minimum=0, maximum=1000000, default=5
        ),
        "gatewayRef": obj(
            {
                "group": string(
                    "API group of the parent.",
                    pattern=_GROUP_PATTERN,
                    default="gateway.networking.k8s.io",
                ),
                "kind": string("Kind of the parent.", pattern=_KIND_PATTERN, default="Gateway"),
                "name": name("Name of the Gateway."),
                "namespace": string(
                    "Namespace of the Gateway.", pattern=NAME_PATTERN, max_length=63
                ),
                "sectionName": string("Listener of the Gateway.", pattern=NAME_PATTERN),
                "port": integer("Port of the listener.", minimum=1, maximum=65535),
            },
            "The Gateway the HTTPRoute attaches to (a Gateway API parentRef).",
            required=["name"],
        ),
        "matchConfigs": array(
            passthrough("A Gateway API HTTPRouteMatch."),
            "Extra request matches of the route, besides the model name.",
            max_items=8,
        ),
        "maxTokens": integer(
            "The most tokens one answer of this model may hold: the engine's context length "
            "(vLLM --max-model-len, SGLang --context-length) or a lower cap it enforces. "
            "Admission reserves it, against token limits and quotas, for each answer of a "
            "request that names no max_tokens, and caps a larger max_tokens to it. Unset: the "
            "gateway's --quota-default-max-tokens.",
            minimum=1,
        ),
        "weighting": string(
            "How requests are spread over the engines: static (the routeConfigs' weights), weighted "
            "(those weights times each engine's weight from its live load), least-load or "
            "prefix-cache (the gateway picks the engine for each request).",
            enum=WEIGHTINGS,
            default=WEIGHTED,
        ),
    },
    "A public model name (the object's name) and the backends serving it.",
)

endpoint_status = obj(
    {
        "observedGeneration": observed_generation(),
        "conditions": conditions(),
        "backends": integer("Backends the route currently spreads traffic over.", minimum=0),
        "routes": array(
            obj(
                {
                    "group": string("The backend's API group; empty for the core group."),
                    "kind": string("The backend's kind: Service or an Envoy Gateway Backend."),
                    "name": string("The backend's name."),
                    "namespace": string("The backend's namespace."),
                    "port": integer("The backend's port.", minimum=1),
                    "weight": integer("Its weight on the route.", minimum=0),
                    "share": integer("Its share of the traffic, in percent.", minimum=0),
                },
                "One backend of the route.",
                required=("name",),
            ),
            "The route's backends as the controller last wrote them, with their weights.",
            max_items=64,
        ),
    },
    "Observed state, written by the controller. Conditions: Ready (the route has backends with "
    "weight and the Gateway has not refused it), RouteAccepted (the Accepted condition Envoy "
    "Gateway wrote into the HTTPRoute's status for the Arks Gateway; False with reason "
    "NotAllowedByListeners when the namespace is not labelled arks.ai/tenant=true; Unknown "
    "with reason Pending until it reports) and Picking (endpoints that pick per request).",
)

ENDPOINT = Kind(
    kind="ArksEndpoint",
    plural="arksendpoints",
    short_names=("aep",),
    description="ArksEndpoint publishes a model name: its gateway, matches, backends and weighting.",
    spec=endpoint_spec,
    status=endpoint_status,
    columns=(
        Column("Backends", ".status.backends", "integer"),
        Column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        Column("Accepted", '.status.conditions[?(@.type=="RouteAccepted")].status'),
        Column("Reason", '.status.conditions[?(@.type=="RouteAccepted")].reason', priority=1),
        Column("Weighting", ".spec.weighting", priority=1),
    ),
)

# --- ArksToken ------------------------------------------------------------------------------

qos = obj(
    {
        "arksEndpoint": object_ref("The ArksEndpoint (public model name) this entry grants."),
        "rateLimits": array(
            obj(
                {
                    "type": string("What is counted.", enum=RATE_LIMIT_TYPES),
                    "value": integer(
                        "Limit per window (or in flight, for concurrency).",
                        minimum=0,
                        format="int64",
                    ),
                },
                "One rate limit.",
                required=["type", "value"],
            ),
            "Rate limits on this endpoint; at most one per type.",
            map_keys=["type"],
            max_items=len(RATE_LIMIT_TYPES),
        ),
        "quota": object_ref("The ArksQuota this usage is charged to."),
    },
    "Access to one endpoint and its limits.",
    required=["arksEndpoint"],
)

token_spec = obj(
    {
        "tokenHash": string(
            'Digest of the token: "sha256:" and 64 lowercase hex digits.', pattern=DIGEST_PATTERN
        ),
        "tokenSecretRef": secret_key_ref("Secret key holding the token.", "token"),
        "token": string(
            "Deprecated: the token in plain text. Use tokenHash or tokenSecretRef.", min_length=1
        ),
        "expiresAt": string("When the token stops working (RFC 3339).", format="date-time"),
        "disabled": boolean("Reject the token without deleting it.", default=False),
        "qos": array(
            qos,
            "Endpoints the token may call, one entry each.",
            max_items=128,
            rules=[
                rule(ONE_QOS_PER_ENDPOINT, "each arksEndpoint may appear in only one qos entry")
            ],
        ),
    },
    "An API token (by digest or Secret, never stored in plain text) and what it may call.",
    rules=[
        rule(
            EXACTLY_ONE_TOKEN_SOURCE,
            "exactly one of tokenHash, tokenSecretRef or token is required",
        )
    ],
)

token_status = obj(
    {
        "phase": string(
            "Whether the token works now.", enum=["Active", "Disabled", "Expired", "Invalid"]
        ),
        "observedGeneration": observed_generation(),
        "endpoints": integer("Number of endpoints granted.", minimum=0),
        "quotas": integer("Number of quotas charged.", minimum=0),
        "tokenHash": string(
            "Digest of the token tokenSecretRef names, as the controller last read it (the gateway "
            "reads no Secrets; it uses this digest while tokenHashSecret matches the spec).",
            pattern=DIGEST_PATTERN,
        ),
        "tokenHashSecret": secret_key_ref("The Secret key tokenHash was read from.", "token"),
        "conditions": conditions(),
    },
    "Observed state, written by the controller.",
)

TOKEN = Kind(
    kind="ArksToken",
    plural="arkstokens",
    short_names=("atk",),
    description="ArksToken is an API token of one user with per-endpoint rate limits and quotas.",
    spec=token_spec,
    status=token_status,
    columns=(
        Column("Phase", ".status.phase"),
        Column("Endpoints", ".status.endpoints", "integer"),
        Column("Quotas", ".status.quotas", "integer"),
        Column("Expires", ".spec.expiresAt", "date"),
        Column("Disabled", ".spec.disabled", "boolean", priority=1),
    ),
)

# --- ArksQuota ------------------------------------------------------------------------------

quota_spec = obj(
    {
        "quotas": array(
            obj(
                {
                    "type": string(
                        "What is counted: tokens (prompt, response, total) or cost.",
                        enum=QUOTA_TYPES,
                    ),
                    "value": number(
                        "Budget per period: tokens, or currency units for cost.", minimum=0
                    ),
                    "period": string("When the budget resets.", enum=QUOTA_PERIODS, default="none"),
                },
                "One budget.",
                required=["type", "value"],
            ),
            "Budgets; each (type, period) at most once.",
            min_items=1,
            map_keys=["type", "period"],
            max_items=len(QUOTA_TYPES) * len(QUOTA_PERIODS),
        ),
        "prices": array(
            obj(
                {
                    "model": string("Public model name (ArksEndpoint name).", min_length=1),
                    "input": number("Price per million prompt tokens.", minimum=0, default=0),
                    "output": number("Price per million response tokens.", minimum=0, default=0),
                    "perSecond": number(
                        "Price per second of audio (transcriptions, translations: engines"
                        " report their duration).",
                        minimum=0,
                        default=0,
                    ),
                },
                "Prices of one model.",
                required=["model"],
            ),
            "Price table for cost budgets.",
            map_keys=["model"],
        ),
    },
    "Token or cost budgets, shared by the tokens that reference this quota.",
    required=["quotas"],
)

quota_status = obj(
    {
        "observedGeneration": observed_generation(),
        "quotaStatus": array(
            obj(
                {
                    "type": string("The budget's type.", enum=QUOTA_TYPES),
                    "period": string("The budget's period.", enum=QUOTA_PERIODS),
                    "used": number("Used in the current window.", minimum=0),
                    "windowStart": string("Start of the current window.", format="date-time"),
                },
                "Usage of one budget.",
                required=["type", "period"],
            ),
            "Usage per budget.",
            map_keys=["type", "period"],
        ),
        "conditions": conditions(),
    },
    "Observed state, written by the controller.",
)

QUOTA = Kind(
    kind="ArksQuota",
    plural="arksquotas",
    short_names=("aq",),
    description="ArksQuota is a set of token or cost budgets with reset periods and a price table.",
    spec=quota_spec,
    status=quota_status,
)
