"""Audio transcriptions and translations through real Envoy and extproc to the simulated engines,
with the official openai client.

The upload is multipart/form-data: arks.form_to_metadata (Envoy) lifts its `model` field, the
file never leaves Envoy. Its answer's usage is a duration (vLLM's `{"type": "duration",
"seconds": S}`; the simulator reads the file as 16 kHz 16-bit mono PCM: bytes / 32000, rounded
up), charged to a cost quota at the price per second (`perSecond`), exactly; or tokens, charged
as tokens. Bodies up to 25 MiB pass on these two paths; every other path keeps the 4 MiB limit.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from arks.api import token_digest
from tests.support.objects import token
from tests.support.stack import BOB, Stack, Usage, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
LISTENER = "sk-arks-test-listener-51a7"  # a cost quota priced per second of audio
PER_SECOND = 0.0001  # $0.006 a minute, OpenAI's whisper-1 price
INPUT, OUTPUT = 2.5, 10.0  # per million tokens, for the answers that report tokens
BYTES_PER_SECOND = 32000  # the simulator's reading of the file
AUDIO_PATHS = ["/v1/audio/transcriptions", "/v1/audio/translations"]
MIB = 1024 * 1024


def documents() -> list[dict[str, Any]]:
    quota = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "listeners", "namespace": "default"},
        "spec": {
            "quotas": [{"type": "cost", "value": 100, "period": "month"}],
            "prices": [
                {"model": "model-a", "input": INPUT, "output": OUTPUT, "perSecond": PER_SECOND}
            ],
        },
    }
    listener = token("listener", ["model-a"], tokenHash=token_digest(LISTENER))
    listener["spec"]["qos"][0]["quota"] = {"name": "listeners"}
    return [quota, listener]


@pytest.fixture(scope="module")
def audio_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("audio"), documents(), ledger="sqlite:///{state_dir}/usage.db"
    ) as running:
        yield running


def cost_used(stack: Stack) -> int:
    """Micro-units charged to the cost quota."""
    state = stack.local.settings.state_dir / "quota-state.json"
    used = json.loads(state.read_text())["used"] if state.exists() else {}
    return sum(v for k, v in used.items() if k.startswith("quota/default/listeners/cost/"))


def ledger_cost(stack: Stack) -> tuple[int, float]:
    """`arks usage` for the listener over this month: its requests and its cost."""
    url = f"sqlite:///{stack.local.settings.state_dir / 'usage.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "usage",
            "--ledger",
            url,
            "--user",
            "listener",
            "--by",
            "none",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    return (rows[0]["requests"], rows[0]["cost"] or 0.0) if rows else (0, 0.0)


def wav(size: int) -> tuple[str, bytes, str]:
    return ("speech.wav", b"RIFF" + bytes(size - 4), "audio/wav")


def charged_once(stack: Stack, before: tuple[Usage, int, tuple[int, float]]) -> tuple[int, float]:
    """The usage metrics show one more request; the quota's and the ledger's cost charges."""
    usage, cost, (requests, _) = before
    stack.wait_usage("listener", "model-a", usage)
    micros = wait_for(lambda: cost_used(stack), lambda used: used > cost) - cost
    ledger = wait_for(lambda: ledger_cost(stack), lambda row: row[0] > requests, timeout=30)
    return micros, ledger[1] - before[2][1]


def snapshot(stack: Stack) -> tuple[Usage, int, tuple[int, float]]:
    return stack.usage("listener", "model-a"), cost_used(stack), ledger_cost(stack)


@pytest.mark.parametrize("size", [96_000, 100_001, 20 * 1000 * 1000])
def test_a_transcription_is_charged_its_seconds_at_the_price_per_second(
    audio_stack: Stack, size: int
) -> None:
    """20 MB passes (the audio paths' limit is 25 MiB); its seconds cost exactly their price."""
    before = snapshot(audio_stack)

    answer = audio_stack.client(LISTENER, timeout=60).audio.transcriptions.create(
        model="model-a", file=wav(size)
    )

    seconds = math.ceil(size / BYTES_PER_SECOND)
    assert answer.text == f"{seconds} seconds of audio."
    assert answer.usage is not None and answer.usage.type == "duration"
    assert answer.usage.seconds == seconds
    micros, cost = charged_once(audio_stack, before)
    assert micros == math.ceil(seconds * PER_SECOND * 1_000_000)
    assert cost == pytest.approx(seconds * PER_SECOND)
    usage = audio_stack.usage("listener", "model-a") - before[0]
    assert usage == Usage(requests=1, prompt=0, completion=0, estimated=0)  # no tokens


def test_a_translation_reporting_tokens_is_charged_its_tokens(audio_stack: Stack) -> None:
    before = snapshot(audio_stack)

    answer = audio_stack.client(LISTENER).audio.translations.create(
        model="model-a", file=wav(64_000), extra_headers={"x-sim-audio-tokens": "120,30"}
    )

    assert answer.text == "2 seconds of audio."
    micros, cost = charged_once(audio_stack, before)
    assert micros == math.ceil(120 * INPUT + 30 * OUTPUT)
    assert cost == pytest.approx((120 * INPUT + 30 * OUTPUT) / 1_000_000)
    usage = audio_stack.usage("listener", "model-a") - before[0]
    assert usage == Usage(requests=1, prompt=120, completion=30, estimated=0)


def test_the_model_field_may_follow_the_file(audio_stack: Stack) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="model"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode()
        + bytes(32_000)
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        f"model-a\r\n--{boundary}--\r\n".encode()
    )
    with audio_stack.http() as http:
        answer = http.post(
            AUDIO_PATHS[0],
            content=body,
            headers={
                "authorization": f"Bearer {LISTENER}",
                "content-type": f"multipart/form-data; boundary={boundary}",
            },
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"] == {"type": "duration", "seconds": 1}


def test_bodies_over_the_limits_are_413(audio_stack: Stack) -> None:
    """26 MiB on an audio path, 5 MB on any other (announced in Content-Length)."""
    with pytest.raises(openai.APIStatusError) as refused:
        audio_stack.client(LISTENER, timeout=60).audio.transcriptions.create(
            model="model-a", file=wav(26 * MIB)
        )
    assert refused.value.status_code == 413
    big = {"model": "model-a", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    headers = {"authorization": f"Bearer {LISTENER}", "content-type": "application/json"}
    raw = json.dumps(big).encode()
    with audio_stack.http() as http:
        announced = http.post("/v1/chat/completions", content=raw, headers=headers)
    assert announced.status_code == 413, announced.text[:200]
    assert announced.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as form:  # a 5 MB form elsewhere: still 4 MiB
        audio_stack.client(LISTENER).post(
            "/embeddings",
            cast_to=object,
            body={"model": "model-a"},
            files=[("file", wav(5_000_000))],
            options={"headers": {"content-type": "multipart/form-data"}},
        )
    assert form.value.status_code == 413


def post_form(stack: Stack, path: str, body: bytes, content_type: str, key: str = LISTENER) -> Any:
    with stack.http() as http:
        return http.post(
            path,
            content=body,
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        )


FORM = "multipart/form-data; boundary=xyz"
BAD_FORMS = [
    # (content type, body, status, code)
    ("application/json", b'{"model": "model-a"}', 400, "invalid_content_type"),
    ("multipart/form-data", b"--xyz\r\n\r\n--xyz--", 400, "invalid_content_type"),  # no boundary
    (FORM, b"not a form at all", 400, "invalid_multipart"),
    (FORM, b"--xyz\r\nContent-Disposition: form-data; name=", 400, "invalid_multipart"),
    (
        FORM,
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nmodel-a',
        400,
        "invalid_multipart",
    ),
    (
        FORM,
        b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc\r\n--xyz--\r\n',
        400,
        "missing_model",
    ),
    (
        FORM,
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\n\r\n--xyz--\r\n',
        400,
        "missing_model",
    ),
    (
        FORM,
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nghost\r\n--xyz--\r\n',
        404,
        "model_not_found",
    ),
    (
        FORM,
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + b"m" * 5000
        + b"\r\n--xyz--\r\n",
        404,
        "model_not_found",
    ),
]


@pytest.mark.parametrize("path", AUDIO_PATHS)
@pytest.mark.parametrize(("content_type", "body", "status", "code"), BAD_FORMS)
def test_bad_uploads_are_openai_shaped_4xx(
    audio_stack: Stack, path: str, content_type: str, body: bytes, status: int, code: str
) -> None:
    answer = post_form(audio_stack, path, body, content_type)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


def test_an_upload_needs_a_granted_model_and_a_key(audio_stack: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        audio_stack.client(BOB).audio.transcriptions.create(model="model-b", file=wav(1000))
    with pytest.raises(openai.AuthenticationError):
        audio_stack.client("sk-wrong").audio.transcriptions.create(model="model-a", file=wav(1000))
    answer = post_form(audio_stack, AUDIO_PATHS[0], b"", FORM)
    assert answer.status_code == 400  # no body at all
