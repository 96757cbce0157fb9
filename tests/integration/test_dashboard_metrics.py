"""The Envoy names the dashboards query (tests/support/metric_names.ENVOY, an explicit list since
Envoy is not Python) are ones the real Envoy of the local stack exports on /stats/prometheus."""

from __future__ import annotations

import re

import httpx

from arks.dashboards import queries
from tests.support.metric_names import ENVOY
from tests.support.promql import selectors
from tests.support.stack import Stack


def test_envoy_exports_every_envoy_name_the_dashboards_use(stack: Stack) -> None:
    client = stack.client()
    client.chat.completions.create(model="model-a", messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(f"{stack.local.admin_url}/stats/prometheus", timeout=10).text
    families = set(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE))
    exported = {name for name, _ in families}
    exported |= {f"{name}{suffix}" for name, kind in families if kind == "histogram"
                 for suffix in ("_bucket", "_sum", "_count")}  # fmt: skip
    used = {s.metric for q in queries() for s in selectors(q.expr) if s.metric.startswith("envoy_")}
    assert used <= set(ENVOY)
    assert not set(ENVOY) - exported
    # Counters come without `_total` from Envoy; the relabelled engine clusters are there.
    assert re.search(r'^envoy_cluster_upstream_rq_xx\{.*envoy_cluster_name="endpoint/', text, re.M)
