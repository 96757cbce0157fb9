"""The prompt-prefix index: prompt text, chained block hashes, longest held prefix, LRU."""

from __future__ import annotations

from extproc.picking.prefix import PrefixIndex, block_hashes, prefix_text

SYSTEM = "You are a careful assistant. " * 40  # ~1,100 characters: 4 blocks of 256


def chat(*turns: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
    ]
    return prefix_text({"messages": messages})


def test_prompt_text_of_chat_completions_and_embeddings() -> None:
    parts = [
        {"type": "text", "text": "look at "},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "this"},
    ]

    assert prefix_text(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": parts},
            ]
        }
    ) == ("system: be brief\nuser: look at this\n")
    assert prefix_text({"prompt": "once upon"}) == "once upon"
    assert prefix_text({"prompt": ["a", "b"]}) == "a\nb"
    assert prefix_text({"input": "embed me"}) == "embed me"
    assert prefix_text({"prompt": [1, 2, 3]}) == ""  # token ids: nothing to match on
    assert prefix_text({"messages": "nonsense"}) == ""


def test_blocks_are_whole_chained_and_seeded() -> None:
    text = "x" * 600

    blocks = block_hashes(text, "default/qwen", block_chars=256)

    assert len(blocks) == 2  # the 88-character tail is not a block yet
    assert blocks[0] != blocks[1]  # same characters, different prefixes
    assert block_hashes(text, "default/llama", block_chars=256) != blocks
    assert block_hashes(text, "default/qwen", block_chars=256, max_blocks=1) == blocks[:1]
    assert block_hashes("short", "default/qwen") == ()


def test_a_later_turn_of_a_conversation_matches_all_earlier_blocks() -> None:
    index = PrefixIndex()
    first = block_hashes(chat("what is a monad?"), "m")
    index.record(first, "A")

    later = block_hashes(chat("what is a monad?", "a monoid in ...", "and a functor?" * 30), "m")

    assert later[: len(first)] == first
    assert index.matches(later) == {"A": len(first)}


def test_conversations_sharing_a_system_prompt_each_hold_their_own_longer_prefix() -> None:
    index = PrefixIndex()
    one = block_hashes(chat("question one " * 40), "m")
    two = block_hashes(chat("question two " * 40), "m")
    index.record(one, "A")
    index.record(two, "B")  # the shared system-prompt blocks now point at B

    shared = len(block_hashes(chat(), "m"))
    assert shared >= 3
    assert index.matches(one) == {"B": shared, "A": len(one)}
    assert index.matches(two) == {"B": len(two)}


def test_a_different_beginning_matches_nothing() -> None:
    index = PrefixIndex()
    index.record(block_hashes("a" * 1024, "m"), "A")

    assert index.matches(block_hashes("b" + "a" * 1023, "m")) == {}


def test_the_index_forgets_the_least_recently_used_blocks() -> None:
    index = PrefixIndex(capacity=4)
    old = block_hashes("o" * 1024, "m")  # 4 blocks
    index.record(old, "A")
    new = block_hashes("n" * 512, "m")  # 2 blocks
    index.record(new, "B")

    assert len(index) == 4
    assert index.matches(old) == {}  # its first blocks went first
    assert index.matches(new) == {"B": 2}
