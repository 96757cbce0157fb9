"""Controller machinery with no Arks-specific logic: watch → per-object queue → reconcile.

Layering: `errors`, `queue` and `conditions` are pure; `rest` is the only module that speaks
HTTP to the API server; `watch`, `apply`, `events`, `leader` and `runner` build on it.
"""
