"""Hostile bodies, headers, methods and paths through real Envoy, fuzzed with hypothesis (seeded:
the same cases every run). Whatever arrives: never a 5xx, every error OpenAI-shaped, the
credential never echoed, a client's `x-arks-*` headers never route or bill, usage counters never
go down, and the stack still serves a good request afterwards."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chaos.attack import answer_problem
from tests.chaos.figures import Figure, Recorder
from tests.support.stack import ALICE, BOB, Stack, running_stack

pytestmark = pytest.mark.timeout(240)

GROUP = "Fuzzing (hypothesis, seeded)"
SECRETS = (ALICE, BOB)
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MODELS = ("model-a", "model-b")  # model-down/-empty answer 503 no_backend by design


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,  # the same cases every run
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


@pytest.fixture(scope="module")
def http(fuzz_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_stack.url, timeout=30) as client:
        yield client


class Tally:
    """Cases tried and held, and the first problems found: every case runs even after a failure,
    so one defect does not hide the next (and hypothesis does not spend minutes shrinking)."""

    def __init__(self) -> None:
        self.tried = 0
        self.held = 0
        self.statuses: dict[int, int] = {}
        self.problems: list[str] = []

    def count(self, status: int) -> None:
        self.tried += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def judge(self, problem: str | None) -> None:
        if problem is None:
            self.held += 1
        elif len(self.problems) < 5:
            self.problems.append(problem)


def counters(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        key: value
        for key, value in stack.metrics().items()
        if key[0] in ("arks_usage_tokens_total", "arks_requests_total")
    }


def attack(
    stack: Stack,
    http: httpx.Client,
    figures: Recorder,
    name: str,
    parameters: dict[str, Any],
    run: Callable[[Tally], None],
) -> None:
    """Run one fuzzing attack, record its figure, then check the stack is whole."""
    before = counters(stack)
    tally = Tally()
    try:
        run(tally)
    finally:
        figures.record(
            Figure(
                GROUP,
                name,
                parameters,
                tally.tried,
                tally.held,
                note="statuses: "
                + ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items())),
                extra={"problems": tally.problems},
            )
        )
    after = counters(stack)
    went_down = {k: (before[k], after.get(k)) for k in before if after.get(k, 0) < before[k]}
    assert not went_down, went_down
    good = http.post(
        "/v1/chat/completions",
        json={"model": "model-a", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {ALICE}"},
    )
    assert good.status_code == 200, good.text
    assert tally.held == tally.tried, "\n".join(tally.problems)


def check(tally: Tally, answer: httpx.Response, request: object, extra: str | None = None) -> None:
    tally.count(answer.status_code)
    problem = extra or answer_problem(
        answer.status_code, answer.headers, answer.content, SECRETS, head=False
    )
    tally.judge(None if problem is None else f"{problem}\n  request: {request!r:.400}")


# --- strategies --------------------------------------------------------------------------------

HUGE = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, -1, 0, 2**31, 2**31 - 1, 2**53 + 1])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
DEEP = st.integers(min_value=50, max_value=3000).map(lambda depth: ("[" * depth) + ("]" * depth))
WEIRD = (
    JSON
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=50)
    | st.just("\u0000\ud7ff\ufeff\u202e")
    | st.just({"include_usage": "yes"})
    | st.just({"include_usage": True, "stream_options": {"include_usage": False}})
    | st.just([{"role": "user"}])
    | st.just([{"role": "user", "content": [{"type": "text", "text": 5}]}])
)
FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "temperature",
    "tools",
)


def base_body(path: str, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 4}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif path.endswith("/completions"):
        body["prompt"] = "hi"
    else:
        body = {"model": model, "input": "hi"}
    return body


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid body for its path with one to three fields given a wrong type or odd value (the
    raw JSON of a deep nesting is spliced in, since Python's json cannot write it)."""
    path = draw(st.sampled_from(PATHS))
    body = base_body(path, draw(st.sampled_from(MODELS)))
    deep = None
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            deep = (name, draw(DEEP))
            body[name] = "DEEP"
        else:
            body[name] = draw(WEIRD)
    raw = json.dumps(body)
    if deep is not None:
        raw = raw.replace(f'"{deep[0]}": "DEEP"', f'"{deep[0]}": {deep[1]}', 1)
    return path, raw.encode()


AUTH_VALUES = st.sampled_from(
    [
        f"Bearer {ALICE}",
        f"bearer {ALICE}",
        f"Bearer  {ALICE}",
        f"Bearer {ALICE} ",
        f"Bearer {ALICE}x",
        f"Bearer {ALICE[:-1]}",
        f"Basic {ALICE}",
        f"{ALICE}",
        "Bearer ",
        "Bearer",
        "",
        f"Bearer {BOB}",
        f"Bearer {ALICE},Bearer {BOB}",
        "Bearer sk-arks-" + "x" * 5000,
    ]
) | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
SPOOFED = st.sampled_from(
    [
        ("x-arks-user", "bob"),
        ("x-arks-user", "alice"),
        ("x-arks-namespace", "other"),
        ("x-arks-model", "model-b"),
        ("x-arks-model", "model-down"),
        ("x-arks-endpoint", "127.0.0.1:1"),
        ("x-gateway-destination-endpoint", "127.0.0.1:1"),
        ("x-api-key", BOB),
        ("x-api-key", "nonsense"),
        ("content-type", "text/plain"),
        ("content-type", "multipart/form-data; boundary=x"),
        ("content-encoding", "gzip"),
        ("transfer-encoding", "identity"),
        ("expect", "100-continue"),
        ("host", "evil.example"),
        ("x-forwarded-for", "10.0.0.1"),
    ]
)


@st.composite
def header_set(draw: st.DrawFn) -> list[tuple[str, str]]:
    headers = [("authorization", value) for value in draw(st.lists(AUTH_VALUES, max_size=3))]
    headers += draw(st.lists(SPOOFED, max_size=4))
    return headers


METHODS = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO"]
)
PATH_PIECES = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/model-a",
        "//v1/chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions?x=1",
        "/v1/./chat/completions",
        "/v1/chat/../completions",
        "/v1/%63hat/completions",
        "/V1/CHAT/COMPLETIONS",
        "/healthz",
        "/metrics",
        "/stats",
        "*",
        "/" + "a" * 9000,
        "/v1/chat/completions#frag",
        "/%00",
        "http://evil.example/v1/models",
        "127.0.0.1:1",
    ]
) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
).map(lambda p: "/" + p)


def raw_exchange(port: int, request: bytes, head: bool) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes (what no HTTP client would send) and read one answer: its headers, then
    its body by content-length or chunks (Envoy delays its close by a second after answering)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""

        def more() -> bool:
            nonlocal data
            chunk = sock.recv(65536)
            data += chunk
            return bool(chunk)

        while b"\r\n\r\n" not in data:
            if not more():
                return 0, {}, data
        header_part, _, body = data.partition(b"\r\n\r\n")
        lines = header_part.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head or status in (204, 304):
            return status, headers, b""
        chunked = headers.get("transfer-encoding") == "chunked"
        length = int(headers.get("content-length", "-1"))
        while not (
            (chunked and body.endswith(b"0\r\n\r\n"))
            or (not chunked and length >= 0 and len(body) >= length)
        ):
            before = len(data)
            if not more():
                break
            body += data[before:]
    return status, headers, dechunk(body) if chunked else body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


# --- the attacks -------------------------------------------------------------------------------


def test_random_json_bodies(fuzz_stack: Stack, http: httpx.Client, figures: Recorder) -> None:
    examples = 700

    def run(tally: Tally) -> None:
        @fuzz_settings(examples)
        @given(path=st.sampled_from(PATHS), body=JSON)
        def case(path: str, body: Any) -> None:
            answer = http.post(
                path,
                content=json.dumps(body).encode(),
                headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
            )
            check(tally, answer, (path, body))

        case()

    attack(fuzz_stack, http, figures, "random JSON bodies", {"examples": examples}, run)


def test_near_valid_bodies_with_wrong_types(
    fuzz_stack: Stack, http: httpx.Client, figures: Recorder
) -> None:
    examples = 1200

    def run(tally: Tally) -> None:
        @fuzz_settings(examples)
        @given(case=near_valid())
        def one(case: tuple[str, bytes]) -> None:
            path, raw = case
            answer = http.post(
                path,
                content=raw,
                headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
            )
            unusable = None
            if answer.status_code == 200 and answer.headers.get("content-type", "").startswith(
                "application/json"
            ):
                if "usage" not in answer.json():
                    unusable = f"200 without usage: {answer.text[:200]}"
            check(tally, answer, case, unusable)

        one()

    parameters = {"examples": examples, "fields": ", ".join(FIELDS)}
    attack(fuzz_stack, http, figures, "near-valid bodies, wrong types", parameters, run)


def test_bytes_that_are_no_json(fuzz_stack: Stack, http: httpx.Client, figures: Recorder) -> None:
    examples = 300

    def run(tally: Tally) -> None:
        @fuzz_settings(examples)
        @given(
            path=st.sampled_from(PATHS),
            content=st.binary(max_size=300)
            | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
            content_type=st.sampled_from(
                ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
            ),
        )
        def case(path: str, content: bytes, content_type: str) -> None:
            answer = http.post(
                path,
                content=content,
                headers={"authorization": f"Bearer {ALICE}", "content-type": content_type},
            )
            check(tally, answer, (path, content, content_type))

        case()

    attack(fuzz_stack, http, figures, "non-JSON bytes", {"examples": examples}, run)


def test_header_tricks(fuzz_stack: Stack, http: httpx.Client, figures: Recorder) -> None:
    """Duplicate and odd credentials and spoofed routing headers: a request is served only on
    one valid credential, by the engine of the body's model, and charged to that token's user."""
    examples = 400
    models_by_engine = {"model-a": "sim-a", "model-b": "sim-b"}

    def run(tally: Tally) -> None:
        @fuzz_settings(examples)
        @given(headers=header_set(), model=st.sampled_from(MODELS))
        def case(headers: list[tuple[str, str]], model: str) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            try:
                answer = http.post(
                    "/v1/chat/completions", content=json.dumps(body).encode(), headers=headers
                )
            except (httpx.LocalProtocolError, UnicodeEncodeError):
                tally.count(0)  # the client itself refuses to send it: nothing to attack
                tally.held += 1
                return
            served_by = answer.headers.get("x-sim-instance")
            misrouted = None
            if answer.status_code == 200 and served_by != models_by_engine[model]:
                misrouted = f"{model} served by {served_by}"
            check(tally, answer, (headers, model), misrouted)

        case()

    attack(fuzz_stack, http, figures, "header tricks", {"examples": examples}, run)


def test_odd_methods_and_paths(fuzz_stack: Stack, http: httpx.Client, figures: Recorder) -> None:
    examples = 400
    port = int(fuzz_stack.url.rsplit(":", 1)[1])

    def run(tally: Tally) -> None:
        @fuzz_settings(examples)
        @given(
            method=METHODS,
            path=PATH_PIECES,
            version=st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/9"]),
            body=st.sampled_from([b"", b'{"model": "model-a", "messages": []}', b"{"]),
            auth=st.booleans(),
        )
        def case(method: str, path: str, version: str, body: bytes, auth: bool) -> None:
            lines = [f"{method} {path} {version}", "host: localhost", "connection: close"]
            if auth:
                lines.append(f"authorization: Bearer {ALICE}")
            lines.append(f"content-length: {len(body)}")
            request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
            status, headers, content = raw_exchange(port, request, head=method == "HEAD")
            tally.count(status)
            problem = "no HTTP answer" if status == 0 else None
            problem = problem or answer_problem(
                status, headers, content, SECRETS, head=method == "HEAD"
            )
            tally.judge(None if problem is None else f"{problem}\n  request: {request[:300]!r}")

        case()

    attack(fuzz_stack, http, figures, "odd methods, paths, versions", {"examples": examples}, run)
