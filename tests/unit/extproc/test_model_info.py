"""Reading `max_model_len` out of an engine's /v1/models answer (vLLM's ModelCard)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.model_info import max_model_len

VLLM = {
    "object": "list",
    "data": [
        {"id": "qwen", "object": "model", "root": "Qwen/Qwen2.5-7B", "parent": None,
         "max_model_len": 32768, "permission": []},
        {"id": "qwen-lora", "object": "model", "parent": "qwen", "max_model_len": 32768},
    ],
}  # fmt: skip


def test_the_models_entry_gives_its_max_model_len() -> None:
    assert max_model_len(VLLM, "qwen") == 32768


@pytest.mark.parametrize(
    "listing",
    [
        None,
        [],
        {"data": "x"},
        {"data": [{"id": "other", "max_model_len": 4096}]},
        {"data": [{"id": "qwen"}]},
        {"data": [{"id": "qwen", "max_model_len": "4096"}]},
        {"data": [{"id": "qwen", "max_model_len": True}]},
        {"data": [{"id": "qwen", "max_model_len": 0}]},
    ],
)
def test_no_entry_or_no_positive_integer_is_unknown(listing: Any) -> None:
    assert max_model_len(listing, "qwen") is None
