"""Pure renderers: an Arks custom resource in, the Kubernetes objects it needs out."""

from controller.render.application import RenderDefaults, label_value, render_application

__all__ = ["RenderDefaults", "label_value", "render_application"]
