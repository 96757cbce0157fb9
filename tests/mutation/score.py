"""The mutation score of `make mutation`, read from the state `mutmut run` leaves in mutants/.

A mutant counts as detected when a test failed on it (killed) or it hung past mutmut's time
limit (timeout). Survivors and mutants no unit test reaches both count against the score.

Message-text mutants are left out of the score: a mutant whose function differs from the
original only inside prose — a str literal whose original text holds a space, or an f-string
with such a literal part — changed, or replaced by None, where it is not an operand of a
comparison. Prose is a sentence people read (an error message, a log line, a problem in a
list); its exact words are not behaviour. Header names, codes, JSON keys, metric labels and
bytes bodies hold no space, or are bytes, so mutants of them stay in.

Run from the repository root after `mutmut run`: `python -m tests.mutation.score [--show]`.
It exits 1 when the score is below MINIMUM.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import (
    get_diff_for_mutant,
    read_functions_from_index,
    read_mutant_function,
    read_mutants_module,
    read_original_function,
)
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

MINIMUM = 0.95
DETECTED = frozenset({"killed", "timeout"})
_PROSE = "«prose»"


@dataclass
class Tally:
    detected: int = 0
    total: int = 0
    excluded: int = 0  # message-text mutants, not in `total`
    missed: list[tuple[str, str]] = field(default_factory=list)  # (mutant, its status)

    def score(self) -> float:
        return self.detected / self.total if self.total else 1.0


def _function_sources(name: str, path: Path) -> tuple[str, str]:
    """The original and the mutated function, as source text."""
    pair = read_functions_from_index(name, path)
    if pair is None:
        module = read_mutants_module(path)
        pair = (read_original_function(module, name), read_mutant_function(module, name))
    original, mutated = (cst.Module(body=[f]).code for f in pair)
    return original, mutated


class _BlankProse(ast.NodeTransformer):
    """Makes every prose literal, every f-string with prose in it, and every None equal: a
    message replaced by None is a message-text mutant too. Comparison operands stay as they are.
    """

    def visit_Compare(self, node: ast.Compare) -> ast.Compare:
        return node  # `kind == "some words"` decides something: never blanked

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.expr:
        if any(_is_prose(part) for part in node.values):
            return ast.Constant(_PROSE)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant(_PROSE) if node.value is None or _is_prose(node) else node


def _is_prose(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value


def message_only(name: str, path: Path) -> bool:
    """Whether the mutant changes nothing but the text of prose str literals."""
    original, mutated = (ast.parse(source) for source in _function_sources(name, path))
    if ast.dump(original) == ast.dump(mutated):
        return False  # no change mutmut's own view cannot see: judge it as any other
    blank = _BlankProse()
    return ast.dump(blank.visit(original)) == ast.dump(blank.visit(mutated))


def tallies() -> Iterator[tuple[str, Tally, Tally]]:
    """Per mutated file: the tally without and with the message-text exclusion."""
    for path in sorted(walk_mutatable_files()):
        data = SourceFileMutationData(path=path)
        data.load()
        raw, scored = Tally(), Tally()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            found = status in DETECTED
            raw.total += 1
            raw.detected += found
            if message_only(name, path):
                scored.excluded += 1
                continue
            scored.total += 1
            scored.detected += found
            if not found:
                scored.missed.append((name, status))
        yield str(path), raw, scored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print the diff of every miss")
    show = parser.parse_args().show
    overall_raw, overall = Tally(), Tally()
    print(f"{'module':40} {'detected/total':>15} {'excluded':>9} {'score':>7}")
    for path, raw, scored in tallies():
        for tally, part in ((overall_raw, raw), (overall, scored)):
            tally.detected += part.detected
            tally.total += part.total
            tally.excluded += part.excluded
        print(
            f"{path:40} {scored.detected:>7}/{scored.total:<7} {scored.excluded:>9} "
            f"{scored.score():>7.1%}"
        )
        for name, status in scored.missed if show else ():
            print(f"  {name}: {status}")
            print("    " + "\n    ".join(get_diff_for_mutant(name, path=path).splitlines()[2:]))
    print(
        f"overall: {overall.detected}/{overall.total} = {overall.score():.1%} "
        f"({overall.excluded} message-text mutants excluded; "
        f"{overall_raw.detected}/{overall_raw.total} = {overall_raw.score():.1%} with them)"
    )
    if overall.score() < MINIMUM:
        print(f"below the minimum of {MINIMUM:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
