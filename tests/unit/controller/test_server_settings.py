"""The controller's flags reach what it renders: Dynamo's platform addresses and the images of
the model Jobs and cache pods."""

from __future__ import annotations

import pytest

from controller.render.model import DOWNLOADER_IMAGE, ModelDefaults
from controller.server import Settings


def test_dynamo_platform_addresses_are_flags_unset_by_default() -> None:
    assert Settings.from_args([]).render_defaults().dynamo_etcd_endpoints == ""
    settings = Settings.from_args(
        [
            "--dynamo-etcd-endpoints=http://etcd.dynamo:2379",
            "--dynamo-nats-server=nats://nats.dynamo:4222",
        ]
    )
    defaults = settings.render_defaults()
    assert defaults.dynamo_etcd_endpoints == "http://etcd.dynamo:2379"
    assert defaults.dynamo_nats_server == "nats://nats.dynamo:4222"


def test_every_model_image_is_a_flag() -> None:
    assert Settings.from_args([]).model_defaults() == ModelDefaults()
    assert ModelDefaults().huggingface_image == DOWNLOADER_IMAGE
    args = [
        f"--{s}-image=mirror.example/{s}:1"
        for s in ("huggingface", "modelscope", "s3", "url", "cache")
    ]
    d = Settings.from_args(args).model_defaults()
    images = (d.huggingface_image, d.modelscope_image, d.s3_image, d.url_image, d.cache_image)
    assert images == tuple(
        f"mirror.example/{s}:1" for s in ("huggingface", "modelscope", "s3", "url", "cache")
    )


def test_the_cache_namespace_and_reserve_are_flags() -> None:
    d = Settings.from_args(["--cache-namespace=gpu-cache", "--cache-reserve-bytes=1024"])
    assert d.model_defaults().cache_namespace == "gpu-cache"
    assert d.model_defaults().cache_reserve_bytes == 1024
    assert Settings.from_args([]).model_defaults().cache_namespace == "arks-cache"


def test_cache_roots_reach_both_renderers() -> None:
    settings = Settings.from_args(["--cache-root=/var/lib/arks/models", "--cache-root=/mnt/nvme"])
    roots = ("/var/lib/arks/models", "/mnt/nvme")
    assert settings.model_defaults().cache_roots == roots
    assert settings.render_defaults().cache_roots == roots
    assert Settings.from_args([]).model_defaults().cache_roots == ("/var/lib/arks/models",)


@pytest.mark.parametrize(
    "roots",
    [("/var/lib/arks/models", "/var/lib/arks/models/b"), ("/mnt/nvme/x/", "/mnt/nvme")],
)
def test_a_cache_root_inside_another_is_refused(
    roots: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Namespace a's copies under /r/b would be /r/b/a/…: model a of namespace b under /r.
    with pytest.raises(SystemExit):
        Settings.from_args([f"--cache-root={r}" for r in roots])
    assert "lies inside" in capsys.readouterr().err


def test_side_by_side_cache_roots_are_accepted() -> None:
    roots = ["/var/lib/arks/models", "/var/lib/arks/models2", "/var/lib/arks/models"]
    settings = Settings.from_args([f"--cache-root={r}" for r in roots])
    assert settings.model_defaults().cache_roots == tuple(roots)
