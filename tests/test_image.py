"""The image of ``deploy/Dockerfile``, built and run with podman as an operator would: the demo
config served from the container, ready and answering with the demo checkpoint's vectors.

Needs root, podman with runc, and debootstrap (no registry is reachable here, so the base image is a
Debian bookworm made by debootstrap, with Python 3.11); the build takes this machine's pip settings
and local wheel folders as read-only mounts. Elsewhere the module skips and says what to install.
``.ci/run`` does not install them: the image build (torch's wheels into the image) does not fit
CI's time; run it with ``pytest tests/test_image.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from serve_support import free_port, wait_ready

pytestmark = [pytest.mark.serve, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/audioclip-base:bookworm"
IMAGE = "localhost/audioclip-serve:test"
# the host's pip settings and local wheel folders, read-only, for the build's pip
MOUNTS = ("/opt/wheels", "/opt/pypi", "/opt/pypi-more", "/etc/xdg/pip", "/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = (
    '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n\n[containers]\ndefault_ulimits = []\n'
)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(
            f"the image test needs root and {missing or 'root'}: apt-get install podman runc debootstrap"
        )
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(*args: str, timeout: float = 1800, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    if run("image", "exists", BASE).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
             str(rootfs), "http://deb.debian.org/debian"],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = run("import", "-", BASE, stdin=tar.stdout)
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    return run


def test_the_image_builds_and_serves_the_demo(podman, tmp_path):
    volumes = [arg for path in MOUNTS if Path(path).exists() for arg in ("-v", f"{path}:{path}:ro")]
    build = podman(
        "build", "-f", "deploy/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE}",
        "--build-arg", "TORCH_INDEX=file:///opt/pypi-more/simple", *volumes, "-t", IMAGE, ".",
        cwd=ROOT,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "audioclip-serve installed" in build.stdout
    port = free_port()
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["http_options"]["port"] = port
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    name = f"audioclip-test-{port}"
    started = podman(
        "run", "-d", "--name", name, "--network=host", "--shm-size=2g", "-v", f"{tmp_path}:/cfg:ro",
        IMAGE, "serve", "run", "/cfg/demo.yaml",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        print(f"\ncontainer ready {wait_ready(url, timeout_s=600):.1f} s after the first probe")
        r = httpx.post(f"{url}/v1/embed/text", json={"texts": ["a dog barking"]}, timeout=120)
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 1024
        from audioclip.factory import load_weights

        assert r.headers["x-checkpoint-sha256"] == load_weights("synthetic:demo")[1].sha256
        assert httpx.get(f"{url}/v1/models", timeout=60).json()["weights"] == "synthetic"
    finally:
        logs = podman("logs", name).stdout
        podman("rm", "-f", name, timeout=120)
    assert "Traceback" not in logs, logs[-2000:]
