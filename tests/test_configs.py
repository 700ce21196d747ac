"""Every shipped serve config is valid: its app args pass the strict settings model and build an app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import load_script

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
        build_app(app.get("args") or {})  # AppArgs has extra="forbid": a typo or bad value raises here


def test_gpu_config_puts_every_tower_on_the_gpu():
    config = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    settings = AppArgs.model_validate(config["applications"][0]["args"])
    shares = [settings.tower(t).num_gpus * settings.tower(t).max_replicas for t in settings.towers]
    assert all(share > 0 for share in shares)
    assert sum(shares) <= 1.0, "the towers must fit one GPU"


def test_conv_layout_defaults():
    from audioclip.factory import conv_layout

    assert conv_layout("audio", "cpu", None, None, "running") == (True, True)
    assert conv_layout("image", "cpu", None, None, "running") == (False, False)
    assert conv_layout("image", "cuda", None, None, "running") == (True, True)
    assert conv_layout("image", "cpu", True, False, "running") == (True, False)
    assert conv_layout("audio", "cpu", None, None, "per_clip") == (True, False)
    assert conv_layout("text", "cpu", None, None, "running") == (False, False)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"text": {"channels_last": True}}, "image and audio"),
        ({"text": {"fold_batchnorm": True}}, "image and audio"),
        ({"audio_norm": "per_clip", "audio": {"fold_batchnorm": True}}, "per_clip"),
        ({"audio": {"backend": "onnxruntime"}}, "onnxruntime runs fp32 for image, text, not the audio"),
        ({"audio": {"backend": "onnxruntime", "int8": True}}, "int8 for image, text, not the audio"),
        ({"text": {"int8": True}}, "eager runs int8 for no tower"),
        ({"text": {"backend": "openvino", "num_gpus": 0.5}}, "runs on the CPU: no num_gpus"),
        (
            {"image": {"backend": "onnxruntime", "dtype": "fp16"}},
            "runs the image tower in fp32 or int8, not fp16",
        ),
        ({"text": {"backend": "openvino", "dtype": "fp16"}}, "runs the text tower in fp32 or bf16, not fp16"),
        (
            {"audio": {"backend": "onnxruntime", "dtype": "fp16"}},
            "onnxruntime runs the audio tower in no precision, not fp16",
        ),
        ({"image": {"backend": "onnxruntime", "dtype": "bf16"}}, "onnxruntime runs bf16 for no tower"),
        (
            {"audio": {"backend": "openvino", "dtype": "bf16"}},
            "openvino runs bf16 for image, text, not the audio",
        ),
        (
            {"text": {"backend": "onnxruntime", "int8": True, "dtype": "bf16"}},
            "in fp32 or int8, not int8 and bf16",
        ),
        ({"text": {"int8": True, "dtype": "fp16"}}, "eager runs int8 for no tower"),
        ({"audio_norm": "per_clip", "audio": {"backend": "openvino"}}, "needs audio_norm 'running'"),
    ],
)
def test_layout_settings_that_cannot_apply_are_refused_when_the_app_is_built(args, message):
    with pytest.raises(ValueError, match=message):
        build_app(args)


def test_bf16_on_openvino_is_a_precision_of_the_graph_not_of_pytorch():
    """``dtype: bf16`` with OpenVINO (text, image) builds the fp32 model with a bf16 graph."""
    args = AppArgs.model_validate({"text": {"backend": "openvino", "dtype": "bf16"}})
    assert args.text.build(args.audio_norm).precision == "bf16"
    assert AppArgs().text.build("running").precision == "fp32"


def test_the_cluster_config_ships_the_code_and_every_dependency_but_the_runtime():
    """configs/cluster.yaml: serve_config.yaml's app, plus the runtime_env that serve deploy ships."""
    import tomllib

    cluster = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    [app] = cluster["applications"]
    runtime_env = app.pop("runtime_env")
    settings = AppArgs.model_validate(app["args"])
    for override in app.pop("deployments"):  # the batching the args set, as overrides from the start
        tower = settings.tower(override["name"].removesuffix("Encoder").lower())
        assert override["user_config"] == {
            "max_batch_size": tower.max_batch_size,
            "batch_wait_timeout_s": tower.batch_wait_timeout_s,
        }
    assert runtime_env["working_dir"].endswith("audioclip-serve-app.zip")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # what every node of a Ray cluster already runs (grpcio and protobuf come with ray[serve])
    runtime = ("torch", "torchvision", "ray", "grpcio", "protobuf")
    expected = sorted(d.split(";")[0].strip() for d in declared if not d.startswith(runtime))
    assert sorted(runtime_env["pip"]["packages"]) == expected
    [production] = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    assert {**app, "args": {**app["args"], "checkpoint": None}} == {
        **production,
        "args": {**production["args"], "checkpoint": None},
    }


def test_export_script_defaults_are_the_cpu_configs_backends():
    """`scripts/export_graphs.py` with no --tower fills an image's cache with the graphs the CPU
    configs load; a config that changes a tower's backend must change the script with it."""
    defaults = dict(default.partition("=")[::2] for default in load_script("export_graphs").DEFAULTS)
    for name in ("demo.yaml", "cpu.yaml", "secured.yaml"):
        args = yaml.safe_load((ROOT / "configs" / name).read_text())["applications"][0]["args"]
        backends = {tower: args[tower]["backend"] for tower in ("text", "image", "audio")}
        assert backends == defaults, f"{name} runs {backends}, export_graphs.py exports {defaults}"
