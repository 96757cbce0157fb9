"""`arks usage` says what the quota status says, for the same tenants and period, through the
real stack: Envoy, extproc settling each request into both the ArksQuota budgets (the quota
status, `quota-state.json` locally) and the usage ledger (its writer; SQLite, then PostgreSQL),
and the simulated engines. Both must also equal the usage the engine reported in the answers."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from arks.api import token_digest
from tests.support.objects import token
from tests.support.postgres import private_database
from tests.support.stack import Stack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
FIRST, SECOND = "sk-arks-test-usage-vs-quota-01", "sk-arks-test-usage-vs-quota-02"
INPUT, OUTPUT = 10, 20  # the price table: micro-units per prompt and completion token
MICRO = 1_000_000
# Answers of these many completion tokens, alternating between the two tokens and both models.
ANSWERS = [3, 17, 40, 1, 25, 9, 12, 30]


def documents(suffix: str) -> list[dict[str, Any]]:
    team = f"team-{suffix}"
    quota = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": team, "namespace": "default"},
        "spec": {
            "quotas": [
                {"type": "total", "value": 10_000_000, "period": "month"},
                {"type": "cost", "value": 1000.0, "period": "month"},
            ],
            "prices": [
                {"model": model, "input": INPUT, "output": OUTPUT}
                for model in ("model-a", "model-b")
            ],
        },
    }
    tokens = []
    for user, secret in ((f"first-{suffix}", FIRST), (f"second-{suffix}", SECOND)):
        doc = token(user, ["model-a", "model-b"], tokenHash=token_digest(secret))
        for grant in doc["spec"]["qos"]:
            grant["quota"] = {"name": team}
        tokens.append(doc)
    return [quota, *tokens]


def traffic(stack: Stack) -> list[dict[str, int]]:
    """The requests, and the usage each answer reported."""
    usages = []
    for i, completion in enumerate(ANSWERS):
        answer = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={
                "model": ("model-a", "model-b")[i % 2],
                "messages": [{"role": "user", "content": f"question number {i}"}],
                "max_tokens": 64,
            },
            headers={
                "authorization": f"Bearer {(FIRST, SECOND)[i % 2]}",
                "x-sim-output-tokens": str(completion),
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        usages.append(answer.json()["usage"])
    return usages


def quota_used(stack: Stack, suffix: str) -> dict[str, int]:
    """The quota status's used figures of the team's quota, by type (its state file)."""
    state = stack.local.settings.state_dir / "quota-state.json"
    used = json.loads(state.read_text())["used"] if state.exists() else {}
    prefix = f"quota/default/team-{suffix}/"  # then <type>/month-<start>
    return {
        kind: sum(v for k, v in used.items() if k.startswith(f"{prefix}{kind}/"))
        for kind in ("total", "cost")
    }


def arks_usage(ledger: str, suffix: str) -> dict[str, Any]:
    """`arks usage` for the team's two tokens over this month (its default range, the quotas'
    period), all in one row."""
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "usage", "--ledger", ledger,
         "--user", f"first-{suffix}", "--user", f"second-{suffix}",
         "--by", "none", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    return rows[0] if rows else {"requests": 0}


def check_agreement(stack: Stack, ledger: str, suffix: str) -> None:
    usages = traffic(stack)
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    cost = sum(u["prompt_tokens"] * INPUT + u["completion_tokens"] * OUTPUT for u in usages)
    report = wait_for(
        lambda: arks_usage(ledger, suffix), lambda r: r["requests"] == len(ANSWERS), timeout=30
    )
    status = wait_for(lambda: quota_used(stack, suffix), lambda u: u["total"] >= tokens, timeout=30)
    assert status == {"total": tokens, "cost": cost}  # the quota status: the answers' usage
    assert report["total_tokens"] == status["total"]
    assert report["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert abs(report["cost"] - status["cost"] / MICRO) <= 1e-6
    assert report["estimated_requests"] == 0


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:6]


def test_sqlite_ledger_matches_the_quota_status(tmp_path: Path, suffix: str) -> None:
    with running_stack(
        tmp_path, documents(suffix), ledger="sqlite:///{state_dir}/usage.db"
    ) as stack:
        url = f"sqlite:///{stack.local.settings.state_dir / 'usage.db'}"
        check_agreement(stack, url, suffix)


def test_postgresql_ledger_matches_the_quota_status(tmp_path: Path, suffix: str) -> None:
    with private_database() as url, running_stack(tmp_path, documents(suffix), ledger=url) as stack:
        check_agreement(stack, url, suffix)
