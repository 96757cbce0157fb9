"""The Kubernetes control plane: reconcilers per kind, renderers, engine load and weights, and the xDS server."""
