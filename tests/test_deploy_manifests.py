"""The KubeRay RayService and the image's Dockerfile: generated from and consistent with the serve
config the tests deploy, valid for Serve and for the app builder (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.settings import AppArgs

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_manifest_is_what_the_script_writes_from_serve_config():
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_rayservice.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    embedded = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    source = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for app in (*embedded["applications"], *source["applications"]):
        app["args"].pop("checkpoint")  # the one difference: the checkpoint lives on the volume
    assert embedded == source


def test_the_embedded_config_validates_for_serve_and_the_app_builder():
    spec = _manifest()["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    [app] = embedded["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.checkpoint.startswith("/models/") and args.text.num_gpus > 0
    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # Ray's token auth, as the README's commands
    [gpu] = cluster["workerGroupSpecs"]
    pods = [cluster["headGroupSpec"]["template"], gpu["template"]]
    [worker] = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no towers on the head
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
        [mount] = container["volumeMounts"]
        assert args.checkpoint.startswith(mount["mountPath"] + "/") and mount["readOnly"]
        [volume] = pod["spec"]["volumes"]
        assert volume["name"] == mount["name"] and "persistentVolumeClaim" in volume


def test_the_dockerfile_installs_every_package_under_the_constraints():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for top in {p.split(".")[0] for p in packages}:
        assert f"COPY {top} {top}" in dockerfile, top
    assert "-c constraints.txt ." in dockerfile and "COPY pyproject.toml constraints.txt" in dockerfile
    assert "RAY_AUTH_MODE=token" in dockerfile
