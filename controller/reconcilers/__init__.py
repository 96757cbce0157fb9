"""Reconcilers: the Arks-specific logic run by the `arks.adapters.kube` machinery."""
