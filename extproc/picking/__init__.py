"""Endpoint picking: extproc chooses the engine for each request of a `least-load` or
`prefix-cache` ArksEndpoint and names it the Gateway API Inference Extension way.

filter -> score -> pick, one small piece per file: `state.py` (the one datastore: engines per
endpoint, their scraped load and our picks in flight), `filters.py`, `scorers.py`, `prefix.py`
(the prompt-prefix index), `picker.py` (combines them, pure), `service.py` (what the servicer
calls: profiles, metrics, fail-open/closed), `scraping.py` (the scrape loop) and `discovery.py`
(in a cluster, which engines each endpoint has: its HTTPRoute's Services' ready endpoints). Only
the last two do I/O.
"""
