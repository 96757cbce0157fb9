"""Reconcilers: the Arks-specific logic run by the `controller.kube` machinery."""
