"""Tokens never appear in logs, metrics, error bodies or headers sent back."""

from __future__ import annotations

import httpx

from tests.support.stack import ALL_TOKENS, Stack

NEVER_ISSUED = "sk-arks-not-a-real-token-4d3c2b1a"


def test_no_token_text_in_logs_metrics_or_answers(stack: Stack) -> None:
    answers: list[httpx.Response] = []
    with stack.http() as http:
        for secret in (*ALL_TOKENS, NEVER_ISSUED):
            for model in ("model-a", "model-b", "model-ghost"):
                for headers in ({"authorization": f"Bearer {secret}"}, {"x-api-key": secret}):
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    answers.append(http.post("/v1/chat/completions", json=body, headers=headers))
                    answers.append(
                        http.post(
                            "/v1/chat/completions", json={**body, "stream": True}, headers=headers
                        )
                    )
            answers.append(http.get("/v1/models", headers={"authorization": f"Bearer {secret}"}))
            answers.append(
                http.post(
                    "/v1/chat/completions",
                    content=b"{bad",
                    headers={"authorization": f"Bearer {secret}"},
                )
            )
    assert {r.status_code for r in answers} >= {200, 401, 403, 404, 400}
    stack.usage("alice", "model-a")  # wait until every request was charged (and logged)

    exposed = [r.text + str(dict(r.headers)) for r in answers]
    exposed.append(httpx.get(stack.local.metrics_url).text)
    exposed.append(httpx.get(f"{stack.local.admin_url}/stats").text)
    logs = sorted((stack.local.settings.state_dir / "logs").glob("*.log"))
    logs += sorted((stack.policy_path.parent / "logs").glob("*.log"))  # the engines'
    assert {p.name for p in logs} >= {"extproc.log", "envoy.log", "sim-a.log"}
    exposed += [p.read_text(errors="replace") for p in logs]
    for secret in (*ALL_TOKENS, NEVER_ISSUED):
        assert not any(secret in text for text in exposed), "a token leaked"
