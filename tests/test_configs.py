"""Every shipped serve config is valid: its app args pass the strict settings model and build an app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.app import build_app
from deployments.settings import AppArgs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([ROOT / "serve_config.yaml", *(ROOT / "configs").glob("*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    config = yaml.safe_load(path.read_text())
    apps = config["applications"]
    assert apps, f"{path.name} declares no application"
    for app in apps:
        assert app["import_path"] == "deployments.app:build_app"
        settings = AppArgs.model_validate(app.get("args") or {})  # extra="forbid": typos fail here
        application = build_app(app.get("args") or {})
        assert application is not None
        for tower in settings.towers:
            assert settings.tower(tower).max_batch_size >= 1


def test_gpu_config_puts_every_tower_on_the_gpu():
    config = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    settings = AppArgs.model_validate(config["applications"][0]["args"])
    shares = [settings.tower(t).num_gpus * settings.tower(t).num_replicas for t in settings.towers]
    assert all(share > 0 for share in shares)
    assert sum(shares) <= 1.0, "the towers must fit one GPU"


def test_conv_layout_defaults_and_refusals():
    from deployments.settings import conv_layout

    assert conv_layout("audio", "cpu", None, None, "running") == (True, True)
    assert conv_layout("image", "cpu", None, None, "running") == (False, False)
    assert conv_layout("image", "cuda", None, None, "running") == (True, True)
    assert conv_layout("image", "cpu", True, False, "running") == (True, False)
    assert conv_layout("audio", "cpu", None, None, "per_clip") == (True, False)
    assert conv_layout("text", "cpu", None, None, "running") == (False, False)
    with pytest.raises(ValueError, match="per_clip"):
        conv_layout("audio", "cpu", None, True, "per_clip")
    with pytest.raises(ValueError, match="image and audio"):
        conv_layout("text", "cpu", None, True, "running")
