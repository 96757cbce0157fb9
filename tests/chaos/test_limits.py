"""Every limit type under 150 concurrent clients, with the admitted count checked exactly, in
memory and in Redis: rpm, rpd, tpm, tpd, concurrency, quota, and all of them on one token. A
request refused by one limit charges nothing to the others (issue 10, defect 1)."""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from arks.api import token_digest
from arks.tokens import BYTES_PER_TOKEN, count_prompt
from tests.chaos.attack import Answer, error_problem, quota_doc, quota_used, wave, within_one_minute
from tests.chaos.figures import Figure, Recorder
from tests.support.objects import token
from tests.support.stack import Stack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

GROUP = "Limits under 150 concurrent clients"
CLIENTS = 150
ADMIT = 30  # of each limit but concurrency
SLOTS = 5
MAX_TOKENS = 20
BODY = {
    "model": "model-a",
    "messages": [{"role": "user", "content": "Count to three."}],
    "max_tokens": MAX_TOKENS,
}
RAW = json.dumps(BODY).encode()
# What admission reserves, deciding on the headers: the prompt estimated from the body's size,
# plus max_tokens. And what each answer really costs: the prompt as the engine counts it, plus
# the max_tokens the engine writes. Waves are slow, so no answer settles while one is decided.
RESERVED = math.ceil(len(RAW) / BYTES_PER_TOKEN) + MAX_TOKENS
COST = count_prompt(BODY) + MAX_TOKENS
SLOW_MS = 2000  # long enough that a wave of 150 is decided while the first answers still run


def limits_of(name: str) -> tuple[list[dict[str, Any]], int | None]:
    """The token's rate limits and its quota's value for each case."""
    r = RESERVED * ADMIT
    return {
        "rpm": ([{"type": "rpm", "value": ADMIT}], COST * 1000),
        "rpd": ([{"type": "rpd", "value": ADMIT}], None),
        "tpm": ([{"type": "tpm", "value": r}], None),
        "tpd": ([{"type": "tpd", "value": r}], None),
        "concurrency": ([{"type": "concurrency", "value": SLOTS}], COST * 1000),
        "quota": ([], r),
        "all": (
            [
                {"type": "concurrency", "value": SLOTS},
                {"type": "rpm", "value": ADMIT},
                {"type": "rpd", "value": ADMIT},
                {"type": "tpm", "value": r},
                {"type": "tpd", "value": r},
            ],
            r,
        ),
    }[name]


CASES = ("rpm", "rpd", "tpm", "tpd", "concurrency", "quota", "all")


def secret_of(case: str) -> str:
    return f"sk-arks-chaos-limit-{case}-0123456789"


@pytest.fixture(scope="module", params=["memory", "redis"])
def limit_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    redis = "redis://127.0.0.1:6379/0" if request.param == "redis" else None
    suffix = uuid.uuid4().hex[:6]  # counters in the shared Redis outlive a run
    documents = []
    for case in CASES:
        rate_limits, quota_value = limits_of(case)
        doc = token(f"{case}-{suffix}", ["model-a"], tokenHash=token_digest(secret_of(case)))
        grant = doc["spec"]["qos"][0]
        if rate_limits:
            grant["rateLimits"] = rate_limits
        if quota_value is not None:
            documents.append(quota_doc(f"{case}-{suffix}", quota_value))
            grant["quota"] = {"name": f"{case}-{suffix}"}
        documents.append(doc)
    with running_stack(tmp_path_factory.mktemp("limits"), documents, redis=redis) as running:
        running.suffix = suffix  # type: ignore[attr-defined]
        running.backend = request.param  # type: ignore[attr-defined]
        yield running


def headers(case: str, slow: bool = False) -> dict[str, str]:
    out = {"authorization": f"Bearer {secret_of(case)}", "x-sim-output-tokens": str(MAX_TOKENS)}
    if slow:
        out["x-sim-ttft-ms"] = str(SLOW_MS)
    return out


def refusal_problems(answers: list[Answer], codes: set[str]) -> list[str]:
    """What is wrong with the 429s: each must be OpenAI-shaped, with one of `codes`, and say
    when to retry."""
    problems = []
    for a in answers:
        if a.status != 429:
            continue
        raw = __import__("json").dumps(a.body).encode()
        shape = error_problem(429, {"content-type": a.headers.get("content-type", "")}, raw)
        if shape or a.code not in codes or "retry-after" not in a.headers:
            problems.append(f"{a.code}: {a.body} {shape or ''}")
    return problems[:3]


def record(
    figures: Recorder, stack: Stack, case: str, answers: list[Answer], expected: int, held: bool
) -> None:
    statuses = Counter(a.status for a in answers)
    figures.record(
        Figure(
            GROUP,
            f"{case} ({stack.backend})",  # type: ignore[attr-defined]
            {"clients": CLIENTS, "limits": limits_of(case)[0], "quota": limits_of(case)[1]},
            len(answers),
            len(answers) if held else 0,
            note=f"admitted {statuses[200]} (expected {expected}), refused {statuses[429]}",
        )
    )


@pytest.mark.parametrize("case", ["rpm", "rpd", "tpm", "tpd", "quota"])
def test_a_wave_of_150_admits_exactly_the_limit(
    limit_stack: Stack, figures: Recorder, case: str
) -> None:
    within_one_minute(8)
    answers = wave(limit_stack.url, CLIENTS, RAW, headers(case, slow=True))
    admitted = sum(a.status == 200 for a in answers)
    codes = {"quota": {"insufficient_quota"}}.get(case, {"rate_limit_exceeded"})
    problems = refusal_problems(answers, codes)
    others = [a.status for a in answers if a.status not in (200, 429)]
    record(
        figures,
        limit_stack,
        case,
        answers,
        ADMIT,
        not problems and not others and admitted == ADMIT,
    )
    assert not others, others
    assert admitted == ADMIT, Counter((a.status, str(a.body)[:150]) for a in answers)
    assert not problems, problems
    if case == "rpm":  # the 120 refused reserved nothing that stays: the quota holds 30 answers
        s = limit_stack.suffix  # type: ignore[attr-defined]
        limit_stack.usage(f"rpm-{s}", "model-a")
        used = wait_for(lambda: quota_used(limit_stack, f"rpm-{s}"), lambda u: u >= ADMIT * COST)
        assert used == ADMIT * COST


def test_a_wave_of_150_gets_exactly_the_concurrency_slots(
    limit_stack: Stack, figures: Recorder
) -> None:
    answers = wave(limit_stack.url, CLIENTS, RAW, headers("concurrency", slow=True))
    admitted = sum(a.status == 200 for a in answers)
    problems = refusal_problems(answers, {"rate_limit_exceeded"})
    record(figures, limit_stack, "concurrency", answers, SLOTS, not problems and admitted == SLOTS)
    assert admitted == SLOTS, Counter(a.status for a in answers)
    assert not problems, problems
    s = limit_stack.suffix  # type: ignore[attr-defined]
    limit_stack.usage(f"concurrency-{s}", "model-a")
    used = wait_for(
        lambda: quota_used(limit_stack, f"concurrency-{s}"), lambda u: u >= SLOTS * COST
    )
    assert used == SLOTS * COST  # the 145 refused for a slot left no reservation behind


def test_refusals_for_concurrency_use_up_none_of_the_other_limits(
    limit_stack: Stack, figures: Recorder
) -> None:
    """One token with every limit: 150 slow clients get the 5 slots; the 145 refused charge
    nothing, so the minute and the day still hold exactly 25 more answers (the token rates and
    the quota, of 30 reservations, have room for them too, as answers cost less than they
    reserve), and then rpm refuses."""
    within_one_minute(15)
    first = wave(limit_stack.url, CLIENTS, RAW, headers("all", slow=True))
    s = limit_stack.suffix  # type: ignore[attr-defined]
    limit_stack.usage(f"all-{s}", "model-a")
    rest: list[Answer] = []
    for _ in range((ADMIT - SLOTS) // SLOTS):
        rest += wave(limit_stack.url, SLOTS, RAW, headers("all"))
        limit_stack.usage(f"all-{s}", "model-a")  # settled: the slots are free again
    over = wave(limit_stack.url, 1, RAW, headers("all"))
    answers = first + rest + over
    admitted_first = sum(a.status == 200 for a in first)
    admitted_rest = sum(a.status == 200 for a in rest)
    held = admitted_first == SLOTS and admitted_rest == ADMIT - SLOTS and over[0].status == 429
    record(figures, limit_stack, "all", answers, ADMIT, held)
    assert admitted_first == SLOTS, Counter(a.status for a in first)
    assert admitted_rest == ADMIT - SLOTS, [a.body for a in rest if a.status != 200][:3]
    assert over[0].status == 429 and "rpm" in str(over[0].body), over[0].body
    assert not refusal_problems(answers, {"rate_limit_exceeded"})
