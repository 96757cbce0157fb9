"""The one place that speaks HTTP to the API server: generic REST calls for any kind.

The typed `kubernetes` APIs need one class per group; the machinery works on plain dicts for
every resource, so it builds the URL from (group, version, plural) and goes through the
client's configured `ApiClient` (host, TLS, auth headers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.resources import Resource

Obj = dict[str, Any]

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"


def resource_of(obj: Mapping[str, Any], plural: str) -> Resource:
    """The Resource of an object from its apiVersion (the plural cannot be derived safely)."""
    group, _, version = str(obj["apiVersion"]).rpartition("/")
    return Resource(group, version, plural)


def request(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: Mapping[str, str] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout_s: float = 30.0,
) -> Obj:
    """One API call; the decoded JSON answer, or ApiException for a non-2xx status."""
    response = _send(api_client, method, path, query, body, content_type, timeout_s, stream=False)
    data = response.read()
    if not 200 <= response.status < 300:
        raise ApiException(status=response.status, reason=response.reason, body=data.decode())
    decoded = json.loads(data) if data else {}
    return decoded if isinstance(decoded, dict) else {"value": decoded}


def watch_lines(
    api_client: ApiClient,
    path: str,
    query: Mapping[str, str],
    timeout_s: float,
) -> Iterator[Obj]:
    """Decoded watch events from a `?watch=true` stream, until the server ends it."""
    response = _send(
        api_client, "GET", path, {**query, "watch": "true"}, None, "", timeout_s, stream=True
    )
    raw = response.response
    try:
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=raw.read())
        pending = b""
        for chunk in raw.stream(4096, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)
        if pending.strip():
            yield json.loads(pending)
    finally:
        raw.release_conn()


def _send(
    api_client: ApiClient,
    method: str,
    path: str,
    query: Mapping[str, str] | None,
    body: Any,
    content_type: str,
    timeout_s: float,
    *,
    stream: bool,
) -> Any:
    headers = {"Accept": "application/json"}
    if content_type and body is not None:
        headers["Content-Type"] = content_type
    _, url, header_params, serialized, _ = api_client.param_serialize(
        method,
        path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    # Reads may stream for a long time; the timeout is (connect, read) per chunk.
    timeout = (10.0, timeout_s) if stream else timeout_s
    return api_client.call_api(
        method, url, header_params=header_params, body=serialized, _request_timeout=timeout
    )


def classify(error: ApiException, what: str) -> Exception:
    """Turn an API failure into the retry meaning the runner understands.

    409 (stale resourceVersion or a lost race), 429, 5xx and transport failures are worth
    retrying; other 4xx answers (invalid, forbidden, not found) will not change by themselves.
    """
    status = int(error.status or 0)
    message = f"{what}: {status} {error.reason}"
    if status in (0, 409, 429) or status >= 500:
        return TemporaryError(message)
    return PermanentError(message)


def get_or_none(
    api_client: ApiClient, resource: Resource, namespace: str, name: str
) -> dict[str, Any] | None:
    """The object, or None when it does not exist; other failures classified for retrying."""
    try:
        found: dict[str, Any] = request(api_client, "GET", resource.path(namespace, name))
        return found
    except ApiException as e:
        if e.status == 404:
            return None
        raise classify(e, f"get {resource.plural}/{name}") from e


def serves(api_client: ApiClient, resource: Resource) -> bool:
    """Whether the API server serves `resource` (its CRD is installed), from API discovery."""
    prefix = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
    try:
        listed = request(api_client, "GET", prefix)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return any(r.get("name") == resource.plural for r in listed.get("resources") or [])
