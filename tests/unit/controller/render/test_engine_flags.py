"""Every engine command line Arks renders uses only flags the engine's argument parser accepts.

The flag tables (`controller/render/engine_flag_tables/`) were read from the released packages'
argparse definitions (see each table's header and golden/SOURCES.md); here every golden render
and every runtime's rendered command lines, for every table version, are checked against them,
exactly (no abbreviations, no underscores): Arks's own flags must be spelled as the engine does.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.render import render_application
from controller.render.application import application_args_problems
from controller.render.disaggregated import disaggregated_args_problems, render_disaggregated
from controller.render.engine_flags import (
    FlagTable,
    flags_in,
    image_version,
    table,
    tables,
    tables_for_image,
    translate_args,
    unknown_flags,
)
from controller.render.engines import UnsupportedApplication
from tests.support.objects import RENDER_DEFAULTS, model_on_claim
from tests.unit.controller.render.test_render_application import make_app
from tests.unit.controller.render.test_render_disaggregated import make_dapp

GOLDEN = Path(__file__).parent / "golden"

# How each program is started -> the table that describes it.
PROGRAMS = {
    ("vllm", "serve"): "vllm",
    ("python3", "-m", "sglang.launch_server"): "sglang",
    ("python3", "-m", "dynamo.vllm"): "dynamo",
    ("python3", "-m", "sglang_router.launch_router"): "sglang-router",
    ("python3", "-m", "dynamo.frontend"): "dynamo-frontend",
}


def program_argv(command: list[str]) -> tuple[str, list[str]] | None:
    """(table runtime, argv from the program on) of a container command; None for others
    (Ray workers). `sh -c` scripts are split into words; the program runs last (`exec`)."""
    words = shlex.split(command[2]) if command[:2] == ["sh", "-c"] else list(command)
    for start in range(len(words)):
        for program, runtime in PROGRAMS.items():
            if tuple(words[start : start + len(program)]) == program:
                return runtime, words[start + len(program) :]
    return None


def strict_unknown(argv: list[str], t: FlagTable) -> list[str]:
    return [f for f in flags_in(argv) if f.split("=", 1)[0] not in t.flags]


def containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for obj in objects:
        spec = obj.get("spec") or {}
        templates = [spec.get("template")]
        lwt = spec.get("leaderWorkerTemplate") or {}
        templates += [lwt.get("leaderTemplate"), lwt.get("workerTemplate")]
        for template in templates:
            if template:
                found += template["spec"]["containers"]
    return found


def golden_files() -> list[Path]:
    return sorted((GOLDEN / "application").glob("*.yaml")) + sorted(
        (GOLDEN / "disaggregated").glob("*.yaml")
    )


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_golden_command_line_uses_only_flags_its_engine_accepts(path: Path) -> None:
    objects = list(yaml.safe_load_all(path.read_text()))
    checked = 0
    for c in containers(objects):
        found = program_argv(c["command"])
        if found is None:
            assert "ray start" in c["command"][-1], c["command"]  # a Ray worker, no engine
            continue
        runtime, argv = found
        (t,) = tables_for_image(runtime, c["image"])[-1:]  # the image's version, else the newest
        if image_version(c["image"]) and runtime in ("vllm", "sglang", "dynamo"):
            assert t.version == image_version(c["image"]), "a table for the golden's image"
        assert strict_unknown(argv, t) == [], f"{c['name']} in {path.name} ({t.version})"
        checked += 1
    assert checked >= 1


RUNTIME_IMAGES = {
    runtime: [f"{repo}:{prefix}{t.version}" for t in tables(runtime)]
    for runtime, repo, prefix in (
        ("vllm", "vllm/vllm-openai", "v"),
        ("sglang", "lmsysorg/sglang", "v"),
        ("dynamo", "nvcr.io/nvidia/ai-dynamo/vllm-runtime", ""),
    )
}
CASES = [(r, i, s) for r, images in RUNTIME_IMAGES.items() for i in images for s in (1, 2)]


@pytest.mark.parametrize(("runtime", "image", "size"), CASES)
def test_our_flags_are_in_every_version_of_each_engine(runtime: str, image: str, size: int) -> None:
    app = make_app(runtime, size, image=image, runtimeCommonArgs=[], autoscaling=None)
    objects = render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    if runtime in ("sglang", "dynamo"):
        dapp = make_dapp(runtime, size, image=image)
        for mode in ("prefill", "decode"):
            dapp["spec"][mode]["runtimeCommonArgs"] = []
        dapp["spec"]["router"]["args"] = []
        objects += render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    t = table(runtime, image_version(image))
    for c in containers(objects):
        found = program_argv(c["command"])
        if found is None:
            continue
        program, argv = found
        program_table = t if program == runtime else tables(program)[-1]
        assert strict_unknown(argv, program_table) == [], (program, program_table.version)


def test_sglang_gets_its_own_spelling_of_the_context_length() -> None:
    app = make_app("sglang", 1, runtimeCommonArgs=["--max-model-len", "8192"])
    argv = render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS)[0]["spec"][
        "template"
    ]["spec"]["containers"][0]["command"]
    assert "--max-model-len" not in argv
    assert argv[-2:] == ["--context-length", "8192"]
    assert application_args_problems(app) == []
    assert translate_args("sglang", ["--max-model-len=4096"]) == ["--context-length=4096"]
    assert translate_args("vllm", ["--context-length", "4096"]) == ["--max-model-len", "4096"]
    assert translate_args("vllm", ["--max-model-len", "4096"]) == ["--max-model-len", "4096"]


@pytest.mark.parametrize(
    ("runtime", "image", "args", "unknown"),
    [
        ("vllm", "vllm/vllm-openai:v0.8.5", ["--max_model_len", "8192"], []),  # underscores
        ("vllm", "vllm/vllm-openai:v0.8.5", ["--no-enable-prefix-caching"], []),
        ("vllm", "vllm/vllm-openai:v0.8.5", ["-O3", "--seed", "-1"], []),
        ("vllm", "vllm/vllm-openai:v0.8.5", ["--async-scheduling"], ["--async-scheduling"]),
        ("vllm", "vllm/vllm-openai:latest", ["--async-scheduling"], []),  # in 0.16.0
        ("vllm", "vllm/vllm-openai:latest", ["--max-num-seq", "4"], []),  # an abbreviation
        ("sglang", "lmsysorg/sglang:v0.4.6", ["--tp", "2", "--mem-fraction-static=0.8"], []),
        ("sglang", "lmsysorg/sglang:v0.4.6", ["--max_model_len", "1"], ["--max_model_len"]),
        ("sglang", "lmsysorg/sglang:v0.5.9", ["--disaggregation-ib-device", "mlx5_0"], []),
        ("sglang", "lmsysorg/sglang:dev", ["--enable-prefix-caching"], ["--enable-prefix-caching"]),
        (
            "dynamo",
            "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
            ["--max-num-seq", "4"],
            ["--max-num-seq"],
        ),
    ],
)
def test_user_flags_are_checked_against_the_images_version(
    runtime: str, image: str, args: list[str], unknown: list[str]
) -> None:
    assert unknown_flags(args, tables_for_image(runtime, image)) == unknown
    app = make_app(runtime, 1, image=image, runtimeCommonArgs=args)
    problems = application_args_problems(app)
    if not unknown:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith(f"runtimeCommonArgs: {unknown[0]} not accepted by {runtime} ")


def test_an_image_without_a_known_version_is_checked_against_every_table() -> None:
    assert image_version("lmsysorg/sglang:v0.4.6-cu124") == "0.4.6"
    assert image_version("registry:5000/vllm:0.16.0") == "0.16.0"
    assert image_version("vllm/vllm-openai:latest") == ""
    assert image_version("vllm/vllm-openai@sha256:abc") == ""
    assert [t.version for t in tables_for_image("vllm", "vllm/vllm-openai:latest")] == [
        "0.8.5",
        "0.16.0",
    ]


def test_disaggregated_groups_and_router_args_are_checked() -> None:
    dapp = make_dapp("sglang", 1)
    assert disaggregated_args_problems(dapp) == []
    dapp["spec"]["decode"]["runtimeCommonArgs"] = ["--nonesuch"]
    dapp["spec"]["router"]["args"] = ["--policy", "cache_aware", "--bogus-router-flag"]
    assert disaggregated_args_problems(dapp) == [
        "decode.runtimeCommonArgs: --nonesuch not accepted by sglang 0.4.6",
        "router.args: --bogus-router-flag not accepted by sglang-router 0.3.2",
    ]


def test_both_halves_of_a_pair_use_one_transfer_backend() -> None:
    def backends(dapp: dict[str, Any]) -> set[str]:
        objects = render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS)
        found = set()
        for c in containers(objects):
            argv = c["command"]
            if "--disaggregation-transfer-backend" in argv:
                found.add(argv[argv.index("--disaggregation-transfer-backend") + 1])
        return found

    dapp = make_dapp("sglang", 1)  # prefill's args give nixl, decode's nothing
    assert backends(dapp) == {"nixl"}
    dapp["spec"]["prefill"]["runtimeCommonArgs"] = []
    assert backends(dapp) == {"mooncake"}, "SGLang's default, on both"
    dapp["spec"]["decode"]["runtimeCommonArgs"] = ["--disaggregation-transfer-backend=nixl"]
    assert backends(dapp) == {"nixl"}
    dapp["spec"]["prefill"]["runtimeCommonArgs"] = ["--disaggregation-transfer-backend", "mooncake"]
    with pytest.raises(UnsupportedApplication, match="same --disaggregation-transfer-backend"):
        render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS)


def test_default_images_are_versions_with_a_flag_table() -> None:
    from controller.render.engines import ENGINES

    for runtime, engine in ENGINES.items():
        version = image_version(engine.default_image)
        assert version and table(runtime, version).version == version, engine.default_image
