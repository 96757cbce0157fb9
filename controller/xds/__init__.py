"""The controller's xDS server: Envoy's listeners, routes, clusters and endpoints over ADS.

`cache` holds immutable snapshots of the resources (a default plus optional per-node ones),
`stream` (state of the world) and `delta` decide what one ADS stream is owed (pure), `server` is
the thin gRPC servicer.
"""
