"""Pure renderers: an Arks custom resource in, the Kubernetes objects it needs out."""

from controller.render.application import RenderDefaults, render_application
from controller.render.labels import label_value

__all__ = ["RenderDefaults", "label_value", "render_application"]
