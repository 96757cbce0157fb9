"""`make bench`'s usage-estimates section: how far an estimate lands from the engine's own count.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only estimates

Through the real local stack (real Envoy, extproc, the engine simulator): every request is sent
twice, once with usage withheld (`x-sim-omit-usage`, a client's `include_usage: false`, or the
engine cutting the stream) and once with the engine reporting it; the gateway's charges
(`arks_usage_tokens_total`) of the two are compared, per request kind. Takes seconds.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.bench import report
from tests.support.stack import ALICE, Stack, Usage, running_stack

BEGIN = "<!-- estimates-bench: begin (python -m tests.bench.gateway --only estimates replaces this section) -->"
END = "<!-- estimates-bench: end -->"

PROSE = (
    "The gateway admits each request against its tenant's budgets before the engine sees it, "
    "and charges the tokens the engine reports once the answer ends. "
)
CODE = (
    "def settle(charges: list[Charge]) -> None:\n    for c in charges:\n        add(c.key, c.n)\n"
)
ACCENTED = "Crème brûlée, façade, naïve café — déjà vu à São Paulo; 東京の天気は晴れです。 "
PROMPTS = {"short": "Hello, world!", "1 KB": PROSE * 7 + CODE, "20 KB": (PROSE + ACCENTED) * 80}
ANSWERS = {"short": 16, "long": 1000}


@dataclass(frozen=True)
class Kind:
    """One request kind: its path, its body for a prompt, and how its usage is withheld."""

    name: str
    path: str
    stream: bool = False
    withheld: tuple[tuple[str, str], ...] = (("x-sim-omit-usage", "1"),)
    cut: bool = False  # the engine drops the connection: the reported twin sends as many tokens
    declines: bool = False  # the client sends `include_usage: false`

    def body(self, prompt: str, declined: bool = False) -> dict[str, Any]:
        if self.path.endswith("/embeddings"):
            return {"model": "model-a", "input": [prompt, "second input"]}
        if self.path.endswith("/chat/completions"):
            body: dict[str, Any] = {
                "model": "model-a",
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": prompt},
                ],
            }
        else:
            body = {"model": "model-a", "prompt": [prompt, "Once upon a time"]}
        if self.stream:
            body["stream"] = True
            if declined:
                body["stream_options"] = {"include_usage": False}
        return body


CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
KINDS = (
    Kind("chat", CHAT),
    Kind("chat, streamed", CHAT, stream=True),
    Kind("chat, streamed, client declines usage", CHAT, stream=True, withheld=(), declines=True),
    Kind("chat, stream cut by the engine", CHAT, stream=True, cut=True),
    Kind("completions, two prompts", COMPLETIONS),
    Kind("completions, streamed", COMPLETIONS, stream=True),
    Kind("embeddings", EMBEDDINGS),
)


@dataclass
class Errors:
    prompt: list[float] = field(default_factory=list)
    completion: list[float] = field(default_factory=list)


def _error(estimated: int, reported: int) -> float | None:
    return None if reported == 0 else (estimated - reported) / reported


def _send(stack: Stack, path: str, body: dict[str, Any], headers: dict[str, str]) -> Usage:
    before = stack.usage("alice", "model-a")
    with stack.http() as http:
        try:
            http.post(path, json=body, headers={"authorization": f"Bearer {ALICE}", **headers})
        except httpx.HTTPError:
            pass  # a stream the engine cut
    return stack.wait_usage("alice", "model-a", before)


def measure(stack: Stack, kinds: Sequence[Kind] = KINDS) -> dict[str, Errors]:
    results: dict[str, Errors] = {}
    for kind in kinds:
        errors = results[kind.name] = Errors()
        for prompt in PROMPTS.values():
            for tokens in ANSWERS.values() if not kind.path.endswith("/embeddings") else (0,):
                sent = tokens // 2 if kind.cut else tokens
                headers = {"x-sim-output-tokens": str(tokens), **dict(kind.withheld)}
                if kind.cut:
                    headers["x-sim-disconnect-after"] = str(sent)
                withheld = _send(
                    stack, kind.path, kind.body(prompt, declined=kind.declines), headers
                )
                reported = _send(
                    stack, kind.path, kind.body(prompt), {"x-sim-output-tokens": str(sent)}
                )
                if (withheld.estimated, reported.estimated) != (1, 0):
                    raise RuntimeError(f"{kind.name}: usage was not withheld, or not reported")
                for values, estimate, truth in (
                    (errors.prompt, withheld.prompt, reported.prompt),
                    (errors.completion, withheld.completion, reported.completion),
                ):
                    if (error := _error(estimate, truth)) is not None:
                        values.append(error)
    return results


def _cells(values: list[float]) -> list[str]:
    if not values:
        return ["—", "—"]
    worst = max(values, key=abs)
    return [f"{statistics.fmean(abs(v) for v in values):.1%}", f"{worst:+.1%}"]


def section(results: dict[str, Errors], command: str) -> str:
    rows = [
        [name, str(len(e.prompt)), *_cells(e.prompt), *_cells(e.completion)]
        for name, e in results.items()
    ]
    header = [
        "request kind",
        "pairs sent",
        "prompt: mean abs. error",
        "prompt: worst",
        "completion: mean abs. error",
        "completion: worst",
    ]
    return "\n".join(
        [
            BEGIN,
            "## Usage estimates",
            "",
            f"`{command}`",
            "",
            "Each request is sent twice through the local stack: with the engine withholding usage",
            "(`x-sim-omit-usage`, the client's `include_usage: false`, or the engine cutting the",
            "stream at half), and with the engine reporting it; error = (estimated - reported) ÷",
            "reported tokens, as charged by the gateway. Prompts: "
            + ", ".join(PROMPTS)
            + " (prose, code, accented and CJK text); answers: "
            + ", ".join(f"{n} tokens" for n in ANSWERS.values())
            + ' (the simulator always answers " hello", one token per SSE event).',
            "The estimates are counted at settlement from the samples Envoy's usage.lua keeps (the",
            "body's first 8 KiB, an answer's head or tail), only for a request without usage.",
            "",
            report.markdown_table(header, rows),
            "",
            END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)


def run_section(*, quick: bool, command: str) -> str:
    """`quick` changes nothing: the section takes seconds either way."""
    with tempfile.TemporaryDirectory(prefix="arks-bench-estimates-") as tmp:
        with running_stack(Path(tmp)) as stack:
            results = measure(stack)
    for name, e in results.items():
        print(f"{name}: prompt {_cells(e.prompt)}, completion {_cells(e.completion)}", flush=True)
    return section(results, command)
