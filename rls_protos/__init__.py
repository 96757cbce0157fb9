"""envoyproxy/ratelimit's configuration API (`ratelimit.config.ratelimit.v3`), generated protobuf
messages committed with their source (`rls_conf.proto`; provenance in `rls_conf_pb2.py`).

A top-level package of its own, as `envoy` is xds-protos's: the proto package's own import path
(`ratelimit.config…`) would clash with our `ratelimit` service, and both the rate-limit service
(the xDS client) and the controller (the xDS server) read it.
"""
