"""Kubernetes machinery with no Arks-specific logic: informers, and watch → per-object queue →
reconcile for the controller.

Layering: `errors`, `queue` and `conditions` are pure; `rest` is the only module that speaks
HTTP to the API server; `watch`, `apply`, `events`, `leader` and `runner` build on it; `client`
makes the API client every service uses.
"""
