"""Pure renderers: an Arks custom resource in, the Kubernetes objects it needs out.

One module per kind (`application`, `disaggregated`, `endpoint`; an ArksModel's objects are
spread over `model`, `model_download` and `model_cache`), plus the engine-workload building
blocks the two application kinds share (`workload`), engine command lines per runtime
(`engines`) and the EnvoyPatchPolicy of picking endpoints (`picking`). Labels: `arks.wire`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arks.wire import label_value
from controller.render.application import render_application
from controller.render.model import ModelDefaults, render_pvc
from controller.render.model_cache import render_cache_daemonset, render_cache_source
from controller.render.model_download import render_download_job
from controller.render.workload import RenderDefaults

__all__ = ["RenderDefaults", "label_value", "render_application", "render_model"]


def render_model(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> list[dict[str, Any]]:
    """Every object the model may need: PVC, download Job, the cache source (Deployment,
    Service, NetworkPolicy) and the cache DaemonSet (in the cache namespace), those that apply.

    The reconciler applies the cache objects only once the download is complete.
    """
    rendered = (
        render_pvc(model, defaults),
        render_download_job(model, defaults),
        *render_cache_source(model, defaults),
        render_cache_daemonset(model, defaults),
    )
    return [obj for obj in rendered if obj is not None]
