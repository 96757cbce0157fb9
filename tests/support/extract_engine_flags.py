"""Read the flags an engine's argument parser accepts from its source files (ast, no import).

How the tables in `controller/render/engine_flags/` were made, from the released packages
(`pip download --no-deps <pkg>==<version>`, then unzip the files named in each table's header):

    python -m tests.support.extract_engine_flags FILE... > table.txt

Collected: option strings given to `add_argument` (positional strings starting with `-`, with
sglang-router's `{prefix}` empty as `launch_router` uses it, and
Dynamo's `flag_name=` / `obsolete_flag=` keywords), `--no-<flag>` for BooleanOptionalAction and
Dynamo's negatable booleans, and the fields of config dataclasses a parser turns into flags one
by one (`f"--{key.replace('_', '-')}"` over a class's fields, as vLLM's FrontendArgs does).
vLLM's `get_kwargs(SomeConfig)` makes every `bool` field negatable: with `--config-dir DIR` (the
package's config module or directory), `add_argument("--x", **some_kwargs["field"])` also gives
`--no-x` when `SomeConfig.field` is annotated `bool`.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

_DATACLASS_FLAG_CLASSES = ("FrontendArgs", "BaseFrontendArgs")


def _option_string(arg: ast.expr) -> str:
    """A literal option string; in an f-string, `{prefix}` is "" (sglang-router's own flags)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        parts = []
        for value in arg.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif not (
                isinstance(value, ast.FormattedValue)
                and isinstance(value.value, ast.Name)
                and value.value.id == "prefix"
            ):
                return ""
        return "".join(parts)
    return ""


def _negatable(call: ast.Call) -> bool:
    if isinstance(call.func, ast.Name | ast.Attribute):
        name = call.func.id if isinstance(call.func, ast.Name) else call.func.attr
        if name == "add_negatable_bool_argument":
            return True
    for kw in call.keywords:
        if kw.arg == "action" and "BooleanOptionalAction" in ast.unparse(kw.value):
            return True
    return False


def _class_fields(tree: ast.Module, wanted: Iterable[str]) -> set[str]:
    flags: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in wanted:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if item.target.id.startswith("_"):
                        continue
                    flag = "--" + item.target.id.replace("_", "-")
                    flags.add(flag)
                    if ast.unparse(item.annotation) == "bool":
                        flags.add("--no-" + flag[2:])
    return flags


def _is_bool(annotation: ast.expr) -> bool:
    """`bool`, or a union with `bool` as a member (`Optional[bool]`, `bool | None`)."""
    text = ast.unparse(annotation).replace(" ", "")
    if text.startswith(("Optional[", "Union[")):
        text = text[text.index("[") + 1 : -1].replace(",", "|")
    return "bool" in text.split("|")


def bool_fields(sources: Iterable[str]) -> dict[str, set[str]]:
    """{class name: its fields annotated `bool`} over the given config sources."""
    out: dict[str, set[str]] = {}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, set()).update(
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)
                    and _is_bool(item.annotation)
                )
    return out


def _kwargs_classes(tree: ast.Module) -> dict[str, str]:
    """{variable: config class} for `x_kwargs = get_kwargs(SomeConfig)`."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", "") == "get_kwargs"
            and node.value.args
            and isinstance(node.value.args[0], ast.Name)
        ):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.args[0].id
    return out


def _bool_from_config(call: ast.Call, classes: dict[str, str], bools: dict[str, set[str]]) -> bool:
    for kw in call.keywords:
        if kw.arg is not None:
            continue
        for value in ast.walk(kw.value):  # also `**{**x_kwargs["field"], ...}`
            if (
                isinstance(value, ast.Subscript)
                and isinstance(value.value, ast.Name)
                and isinstance(value.slice, ast.Constant)
                and value.value.id in classes
            ):
                return str(value.slice.value) in bools.get(classes[value.value.id], set())
    return False


def flags_of(source: str, bools: dict[str, set[str]] | None = None) -> set[str]:
    tree = ast.parse(source)
    classes = _kwargs_classes(tree)
    flags: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in ("add_argument", "add_negatable_bool_argument"):
            continue
        names = [n for a in node.args if (n := _option_string(a)).startswith("-")]
        names += [
            kw.value.value
            for kw in node.keywords
            if kw.arg in ("flag_name", "obsolete_flag")
            and isinstance(kw.value, ast.Constant)
            and isinstance(kw.value.value, str)
        ]
        flags.update(names)
        if _negatable(node) or _bool_from_config(node, classes, bools or {}):
            flags.update("--no-" + n[2:] for n in names if n.startswith("--"))
    if "key.replace('_', '-')" in source or 'key.replace("_", "-")' in source:
        flags |= _class_fields(tree, _DATACLASS_FLAG_CLASSES)
    return flags


def main(argv: list[str]) -> None:
    bools: dict[str, set[str]] = {}
    if argv[:1] == ["--config-dir"]:
        config = Path(argv[1])
        files = sorted(config.rglob("*.py")) if config.is_dir() else [config]
        bools = bool_fields(f.read_text() for f in files)
        argv = argv[2:]
    flags: set[str] = set()
    for path in argv:
        flags |= flags_of(Path(path).read_text(), bools)
    sys.stdout.write("".join(f + "\n" for f in sorted(flags)))


if __name__ == "__main__":
    main(sys.argv[1:])
