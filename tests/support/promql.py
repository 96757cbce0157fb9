"""The series selectors of a PromQL expression, by a small scanner: enough to list the metrics a
query reads and the label matchers it applies, and to reject unbalanced brackets or a malformed
matcher. Not a parser: `promtool check rules` (tests/unit/arks/test_dashboards.py) is the real
one; this one also works on the expressions before Grafana's variables are substituted."""

from __future__ import annotations

import re
from dataclasses import dataclass

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip
# Aggregation operators: followed by `by (...)` as often as by their parenthesis.
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_PAIRS = {"(": ")", "{": "}", "[": "]"}


class PromQLError(ValueError):
    pass


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


def _string_end(expr: str, start: int) -> int:
    """Index after the string literal opening at `start`."""
    quote = expr[start]
    i = start + 1
    while i < len(expr):
        if expr[i] == "\\":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise PromQLError(f"unterminated string at {start}: {expr!r}")


def _split_matchers(body: str) -> list[str]:
    parts, depth_start, i = [], 0, 0
    while i < len(body):
        if body[i] in "\"'":
            i = _string_end(body, i)
            continue
        if body[i] == ",":
            parts.append(body[depth_start:i])
            depth_start = i + 1
        i += 1
    parts.append(body[depth_start:])
    return [p for p in parts if p.strip()]


def _matchers(body: str) -> tuple[tuple[str, str, str], ...]:
    out = []
    for part in _split_matchers(body):
        match = _MATCHER.fullmatch(part)
        if not match:
            raise PromQLError(f"not a label matcher: {part!r}")
        out.append((match.group(1), match.group(2), match.group(3)))
    return tuple(out)


def _next_nonspace(expr: str, i: int) -> str:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return expr[i] if i < len(expr) else ""


def selectors(expr: str) -> list[Selector]:
    """Every series selector of `expr`; PromQLError when brackets do not balance, a string does
    not end, or a `{...}` holds something other than label matchers."""
    out: list[Selector] = []
    stack: list[str] = []
    i = 0
    grouping_next = False
    while i < len(expr):
        c = expr[i]
        if c in "\"'":
            i = _string_end(expr, i)
            continue
        if c == "{":
            close = i + 1
            while close < len(expr) and expr[close] != "}":
                close = _string_end(expr, close) if expr[close] in "\"'" else close + 1
            if close >= len(expr):
                raise PromQLError(f"unclosed {{ at {i}: {expr!r}")
            out.append(Selector("", _matchers(expr[i + 1 : close])))  # a bare {...} selector
            i = close + 1
            continue
        if c == "[":
            close = expr.find("]", i)
            if close < 0:
                raise PromQLError(f"unclosed [ at {i}: {expr!r}")
            i = close + 1
            continue
        if c in "(":
            if grouping_next:  # by (a, b): label names, not metrics
                close = expr.find(")", i)
                if close < 0:
                    raise PromQLError(f"unclosed ( at {i}: {expr!r}")
                i, grouping_next = close + 1, False
                continue
            stack.append(c)
        elif c in ")}]":
            if not stack or _PAIRS[stack.pop()] != c:
                raise PromQLError(f"unbalanced {c} at {i}: {expr!r}")
        elif c.isdigit() or (c == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            number = _NUMBER.match(expr, i)
            i = number.end() if number else i + 1
            continue
        else:
            ident = _IDENT.match(expr, i)
            if ident:
                word, end = ident.group(0), ident.end()
                after = _next_nonspace(expr, end)
                if word in GROUPING:
                    grouping_next = after == "("
                elif word.lower() in KEYWORDS | AGGREGATIONS or after == "(":
                    pass  # an operator, or a function / aggregation
                elif after == "{":
                    start = expr.index("{", end)
                    close = start + 1
                    while close < len(expr) and expr[close] != "}":
                        close = _string_end(expr, close) if expr[close] in "\"'" else close + 1
                    if close >= len(expr):
                        raise PromQLError(f"unclosed {{ at {start}: {expr!r}")
                    out.append(Selector(word, _matchers(expr[start + 1 : close])))
                    end = close + 1
                else:
                    out.append(Selector(word, ()))
                i = end
                continue
        i += 1
    if stack:
        raise PromQLError(f"unclosed {stack[-1]} in {expr!r}")
    return out
