"""core/v1 Events about the objects a controller manages, so `kubectl describe` explains it."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import format_time
from arks.adapters.kube.rest import Obj
from arks.resources import EVENTS


def event_name(involved: Mapping[str, Any], type_: str, reason: str, message: str) -> str:
    """A stable name per (object, type, reason, message), so repeats aggregate into one Event."""
    meta = involved["metadata"]
    digest = hashlib.sha256(
        f"{meta.get('uid')}\0{type_}\0{reason}\0{message}".encode()
    ).hexdigest()[:10]
    return f"{meta['name']}.{digest}"


def record_event(
    api_client: ApiClient,
    involved_object: Mapping[str, Any],
    type_: str,
    reason: str,
    message: str,
    component: str,
    now: datetime.datetime | None = None,
) -> Obj:
    """Create an Event (or bump `count` of the identical one); failures are raised as is.

    Callers usually treat a failed event as non-fatal: events are best-effort diagnostics.
    """
    meta = involved_object["metadata"]
    namespace = meta.get("namespace") or "default"
    name = event_name(involved_object, type_, reason, message)
    stamp = format_time(now or datetime.datetime.now(datetime.UTC))
    try:
        existing = rest.request(api_client, "GET", EVENTS.path(namespace, name))
    except ApiException as e:
        if e.status != 404:
            raise
    else:
        return rest.request(
            api_client,
            "PATCH",
            EVENTS.path(namespace, name),
            body={
                "count": int(existing.get("count") or 1) + 1,
                "lastTimestamp": stamp,
                "metadata": {"resourceVersion": existing["metadata"]["resourceVersion"]},
            },
            content_type=rest.MERGE_PATCH,
        )
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {
            "apiVersion": involved_object.get("apiVersion"),
            "kind": involved_object.get("kind"),
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message,
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    return rest.request(api_client, "POST", EVENTS.path(namespace), body=event)
