"""The Kubernetes control plane: reconcilers per kind, their machinery, renderers, and (later) the xDS server."""
