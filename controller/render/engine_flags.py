"""Which flags each engine's command line accepts, per released version; checks argv against them.

The tables (`engine_flag_tables/<runtime>-<version>.txt`, one flag a line, each headed by
where it was read) were extracted from the engines' own argument parsers in their released
packages by `tests/support/extract_engine_flags.py`. A command line is checked against the
table of the image's version when there is one, else against every table of the runtime: a
flag none of them accepts is reported. Also here: the spelling of a common flag in each engine
(`--max-model-len` in vLLM is `--context-length` in SGLang), translated rather than refused.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

_TABLE_DIR = "engine_flag_tables"


@dataclass(frozen=True)
class FlagTable:
    """The flags one version of one runtime accepts."""

    runtime: str
    version: str
    flags: frozenset[str]
    underscores: bool  # vLLM's FlexibleArgumentParser reads --a_b as --a-b
    abbreviations: bool  # argparse's default: an unambiguous prefix of a flag is that flag

    def accepts(self, flag: str) -> bool:
        name = _normalize(flag, self.underscores)
        if name in self.flags:
            return True
        if not name.startswith("--") and name[:2] in self.flags:  # -O3: a short flag with value
            return True
        if self.abbreviations and name.startswith("--"):
            return sum(1 for f in self.flags if f.startswith(name)) == 1
        return False


# runtime -> (version, underscores, abbreviations), oldest first.
_VERSIONS: Mapping[str, tuple[tuple[str, bool, bool], ...]] = {
    "vllm": (("0.8.5", True, True), ("0.16.0", True, True)),
    "sglang": (("0.4.6", False, True), ("0.5.9", False, True)),
    # dynamo.vllm's own parser has allow_abbrev=False; vLLM's engine args come after it.
    "dynamo": (("1.0.0", True, False),),
    # Routers: their images are the engine's, whose tag says nothing of the router's version.
    "sglang-router": (("0.3.2", False, True),),
    "dynamo-frontend": (("1.0.0", False, True),),
}

# A common flag as another engine spells it: (runtime, flag) -> the runtime's own flag.
FLAG_ALIASES: Mapping[str, Mapping[str, str]] = {
    "sglang": {"--max-model-len": "--context-length"},
    "vllm": {"--context-length": "--max-model-len"},
    "dynamo": {"--context-length": "--max-model-len"},
}


def _normalize(flag: str, underscores: bool) -> str:
    name = flag.split("=", 1)[0]
    if underscores and name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
    return name


@functools.cache
def _read(runtime: str, version: str) -> frozenset[str]:
    text = (
        resources.files("controller.render")
        .joinpath(f"{_TABLE_DIR}/{runtime}-{version}.txt")
        .read_text()
    )
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def tables(runtime: str) -> list[FlagTable]:
    """Every table of `runtime`, oldest version first ([] for a runtime without tables)."""
    return [
        FlagTable(runtime, version, _read(runtime, version), underscores, abbreviations)
        for version, underscores, abbreviations in _VERSIONS.get(runtime, ())
    ]


def table(runtime: str, version: str) -> FlagTable:
    found = [t for t in tables(runtime) if t.version == version]
    if not found:
        raise KeyError(f"no flag table for {runtime} {version}")
    return found[0]


def image_version(image: str) -> str:
    """The version an image tag names (`vllm/vllm-openai:v0.8.5` -> "0.8.5"), else ""."""
    tag = image.split("@", 1)[0].rpartition("/")[2].partition(":")[2]
    m = re.fullmatch(r"v?(\d+\.\d+\.\d+)(?:[-.+].*)?", tag)
    return m.group(1) if m else ""


def tables_for_image(runtime: str, image: str) -> list[FlagTable]:
    """The table of the image's version if there is one, else every table of the runtime."""
    every = tables(runtime)
    version = image_version(image)
    exact = [t for t in every if t.version == version]
    return exact or every


_NUMBER = re.compile(r"-\.?\d")


def flags_in(argv: Iterable[str]) -> list[str]:
    """The option words of `argv` (`--flag`, `--flag=value`, `-x`), without their values."""
    return [
        a.split("=", 1)[0] for a in argv if a.startswith("-") and a != "-" and not _NUMBER.match(a)
    ]


def unknown_flags(argv: Sequence[str], candidates: Sequence[FlagTable]) -> list[str]:
    """The flags of `argv` that none of `candidates` accepts (none when there is no table)."""
    if not candidates:
        return []
    return [f for f in flags_in(argv) if not any(t.accepts(f) for t in candidates)]


def translate_args(runtime: str, args: Sequence[str]) -> list[str]:
    """`args` with flags spelled for another engine renamed to `runtime`'s own spelling."""
    aliases = FLAG_ALIASES.get(runtime, {})
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        out.append(aliases[name] + eq + value if name in aliases else arg)
    return out


def describe(candidates: Sequence[FlagTable]) -> str:
    return ", ".join(f"{t.runtime} {t.version}" for t in candidates)
