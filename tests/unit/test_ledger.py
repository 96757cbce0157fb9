"""The memory ledger: totals per (namespace, user, model), estimates counted apart."""

from __future__ import annotations

from extproc.ledger import MemoryLedger, Totals
from extproc.usage import Usage


def test_charges_add_up_per_namespace_user_and_model() -> None:
    ledger = MemoryLedger()

    ledger.charge(Usage("default", "alice", "qwen", 10, 20))
    ledger.charge(Usage("default", "alice", "qwen", 1, 2, estimated="no_usage_reported"))
    ledger.charge(Usage("default", "alice", "llama", 5, 5))
    ledger.charge(Usage("team-b", "alice", "qwen", 7, 0, estimated="access_log_lost"))

    assert ledger.totals == {
        ("default", "alice", "qwen"): Totals(
            requests=2, prompt_tokens=11, completion_tokens=22, estimated_requests=1
        ),
        ("default", "alice", "llama"): Totals(
            requests=1, prompt_tokens=5, completion_tokens=5, estimated_requests=0
        ),
        ("team-b", "alice", "qwen"): Totals(
            requests=1, prompt_tokens=7, completion_tokens=0, estimated_requests=1
        ),
    }


def test_a_new_ledger_is_empty() -> None:
    assert MemoryLedger().totals == {}
