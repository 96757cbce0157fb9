"""The prompt-prefix index: which engine most recently served each prefix of a prompt.

An engine with vLLM/SGLang prefix caching keeps the KV cache of the prompts it served, so a
request sharing a long prefix with an earlier one (a system prompt, the earlier turns of a
conversation) is cheaper there. The gateway cannot see engines' caches; it remembers where it
sent what, GIE-style: the prompt text is cut into fixed-size blocks (`block_chars` characters
of the concatenated messages), each block's hash chained with the previous one, so a block
hash stands for the whole prefix up to it. An LRU map holds block hash -> engine. An engine's
match is the number of leading blocks whose latest engine is it. Only whole blocks count: the
growing tail of a conversation is not a prefix yet. The chain starts from the endpoint, so two
models never share entries; hashes are Python's (per process, like the index itself).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prefix_text(body: Mapping[str, Any]) -> str:
    """The prompt as one string: chat messages as `role: content` lines, or the completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(
            f"{m.get('role', '')}: {_content_text(m.get('content'))}\n"
            for m in messages
            if isinstance(m, dict)
        )
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return ""


def block_hashes(
    text: str, seed: str, block_chars: int = 256, max_blocks: int = 256
) -> tuple[int, ...]:
    """Chained hashes of the whole `block_chars` blocks of `text` (at most `max_blocks`)."""
    count = min(len(text) // block_chars, max_blocks)
    out = []
    previous = hash(seed)
    for i in range(count):
        previous = hash((previous, text[i * block_chars : (i + 1) * block_chars]))
        out.append(previous)
    return tuple(out)


@dataclass
class PrefixIndex:
    """Block hash -> the engine that last served a prompt through that block; LRU-bounded."""

    capacity: int = 200_000  # blocks; 256-character blocks make this ~50 MB of prompts' prefixes
    _blocks: OrderedDict[int, str] = field(default_factory=OrderedDict)

    def matches(self, blocks: tuple[int, ...]) -> dict[str, int]:
        """Per engine, how many leading blocks of the prompt it holds."""
        out: dict[str, int] = {}
        for i, block in enumerate(blocks):
            engine = self._blocks.get(block)
            if engine is None:
                break
            out[engine] = i + 1
        return out

    def record(self, blocks: tuple[int, ...], engine: str) -> None:
        """`engine` now serves this prompt: every block of it points there, freshest last."""
        index = self._blocks
        for block in blocks:
            index[block] = engine
            index.move_to_end(block)
        while len(index) > self.capacity:
            index.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)
