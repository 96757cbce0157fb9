"""The wire contract: every name another program (Envoy, the API server, a client) sees, once.

Metadata namespaces and headers between Envoy and the gateway; labels, annotations, finalizers
and the field manager on what the controller writes; label-safe values.
"""

from __future__ import annotations

import hashlib
import re

# --- Envoy: dynamic metadata namespaces ------------------------------------------------------
METADATA_NAMESPACE = "io.arks"  # identity, limits, reservation and usage of one request
REQUEST_METADATA_NAMESPACE = (
    "io.arks.request"  # body fields json_to_metadata reads ahead of ext_proc
)
# the request body's head, kept by usage.lua for the prompt's estimate (extproc/estimate.py);
# not sent to ext_proc, it reaches Python in the access log, blanked when usage came back
PROMPT_METADATA_NAMESPACE = "io.arks.prompt"
# set by the credentials Lua filter on a request whose body may be large: its credential is
# judged on the headers (ext_authz), before the body is read
AUTH_METADATA_NAMESPACE = "io.arks.auth"
DESTINATION_METADATA_NAMESPACE = "envoy.lb"  # the picked engines (Gateway API Inference Extension)

# --- HTTP paths ------------------------------------------------------------------------------
# Envoy's health answer, asked of the gateway's decision service: 200 while it answers, 503
# gateway_unavailable while it is away (a load balancer should stop sending then).
HEALTH_PATH = "/healthz"

# --- xDS ------------------------------------------------------------------------------------
# envoyproxy/ratelimit's configuration resource (CONFIG_TYPE=GRPC_XDS_SOTW): the controller's xDS
# server serves it, the rate-limit service subscribes to it (rls_protos holds its message)
RATE_LIMIT_CONFIG_TYPE = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig"

# --- HTTP headers ---------------------------------------------------------------------------
MODEL_HEADER = "x-arks-model"
NAMESPACE_HEADER = "x-arks-namespace"
USER_HEADER = "x-arks-user"
ROUTING_HEADERS = (MODEL_HEADER, NAMESPACE_HEADER, USER_HEADER)  # set by extproc only
DESTINATION_HEADER = "x-gateway-destination-endpoint"  # the picked engines, `ip:port[,ip:port]`
AUTHORIZATION_HEADER = "authorization"  # `Bearer <token>`
API_KEY_HEADER = "x-api-key"  # `<token>`, as some OpenAI-compatible clients send it
CREDENTIAL_HEADERS = (AUTHORIZATION_HEADER, API_KEY_HEADER)

# --- Kubernetes -----------------------------------------------------------------------------
FIELD_MANAGER = "arks-controller"  # server-side apply
# Applies only a field the controller stops applying, so it keeps its value until its new owner
# (the HPA) writes it: server-side apply's "transferring ownership".
HANDOVER_FIELD_MANAGER = "arks-handover-to-hpa"
EVENT_COMPONENT = "arks-controller"  # the source of the controller's Events
# Envoy Gateway's GatewayClass controllerName (manifests/gateway/gateway.yaml): the only writer of
# an HTTPRoute's `status.parents[]` the controller believes about the Arks Gateway.
ENVOY_GATEWAY_CONTROLLER = "gateway.envoyproxy.io/gatewayclass-controller"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "arks"  # its value on everything the controller creates
LABEL_APPLICATION = "arks.ai/application"
LABEL_MODEL = "arks.ai/model"
LABEL_SERVED_NAME = "arks.ai/served-model-name"
LABEL_ROLE = "arks.ai/role"
LABEL_COMPONENT = "arks.ai/component"
LABEL_ENDPOINT = "arks.ai/endpoint"
LABEL_ENDPOINT_NAMESPACE = "arks.ai/endpoint-namespace"
LABEL_ENDPOINT_UID = "arks.ai/endpoint-uid"
# On a Namespace (the cluster admin's): the Arks Gateway's listener takes its HTTPRoutes
# (manifests/gateway/gateway.yaml, allowedRoutes).
LABEL_TENANT = "arks.ai/tenant"
ANNOTATION_SERVED_NAME = "arks.ai/served-model-name"
ANNOTATION_MODEL = "arks.ai/model"
ANNOTATION_SOURCE_ID = "arks.ai/source-id"
# The node cache lives in its own namespace: its objects name their model by these, not by an
# owner reference (which cannot cross namespaces).
LABEL_MODEL_NAMESPACE = "arks.ai/model-namespace"
ANNOTATION_MODEL_NAMESPACE = "arks.ai/model-namespace"
ANNOTATION_CACHE_ROOT = "arks.ai/cache-root"  # the host directory a cache DaemonSet fills
NODE_CACHE_FINALIZER = "arks.ai/node-cache"  # held until the model's host copies are deleted
ANNOTATION_ENDPOINT = "arks.ai/endpoint"  # "<namespace>/<name>", exact
PICKING_FINALIZER = "arks.ai/picking-policy"
# On a Secret holding an ArksToken's token (tokenSecretRef): the controller watches only the
# Secrets with this label (any value), and only in namespaces that let it read Secrets.
LABEL_TOKEN_SECRET = "arks.ai/token-secret"
ANNOTATION_DEMO = "arks.ai/demo"  # "true" on the demo policy's Secret: `arks up` may print it

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """`value` if it is a valid label value, else a readable form with a hash suffix.

    Served names such as `meta-llama/Llama-3.1-8B` contain `/`; the exact name is kept in
    an annotation, the label only has to be stable and equal for equal names.
    """
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:52].strip("-_.")
    return f"{readable}-{digest}" if readable else digest
