"""Elastic serving on a real cluster started as a user starts one (`ray start`, `serve deploy` through
the dashboard address): autoscaling under a burst and back, scale to zero, and config updates while
traffic flows, with no failed request and no answer mixing two checkpoints.

One cluster for the module; the tests run in order and share its state.
"""

from __future__ import annotations

import base64
import collections
import copy
import os
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import yaml
from conftest import INPUTS, row_cosines
from ray import serve
from serve_support import free_port, wait_ready

from audioclip.factory import build_tower, load_weights
from audioclip.pipeline import pipelines

pytestmark = [pytest.mark.serve, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
QUERY = "a dog barking in the rain"


@dataclass
class Cluster:
    url: str
    dashboard: str
    config: dict
    workdir: Path
    env: dict

    def deploy(self, config: dict, name: str) -> None:
        """``serve deploy`` of ``config`` through the dashboard address, as a user runs it."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [str(BIN / "serve"), "deploy", str(path), "-a", self.dashboard],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=120,
        )

    def models(self) -> dict:
        return httpx.get(f"{self.url}/v1/models", timeout=60).json()


# Left out of the nodes' Python: the cluster config's runtime_env `pip` list has to bring it, or the
# routers cannot tokenize and the app never becomes ready.
SHIPPED_BY_PIP = "ftfy"


def bare_python(workdir: Path) -> Path:
    """A Python with the project's dependencies but neither the project nor ``SHIPPED_BY_PIP``: a
    venv whose one ``.pth`` line adds a folder of links to this venv's site-packages, all but that
    package's (Python runs no ``.pth`` file found there, so the project's editable-install hook never
    loads), as a node image with Ray and torch but no audioclip."""
    bare = workdir / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    dependencies = workdir / "dependencies"
    dependencies.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].lower() != SHIPPED_BY_PIP:
            (dependencies / entry.name).symlink_to(entry)
    site = next((bare / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(f"{dependencies}\n")
    python = bare / "bin" / "python"
    probe = (
        "import ray, torch, av\n"
        f"for name in ('audioclip', '{SHIPPED_BY_PIP}'):\n"
        "    try:\n        __import__(name)\n    except ImportError:\n        print('absent', name)"
    )
    result = subprocess.run(
        [str(python), "-c", probe], cwd=workdir, capture_output=True, text=True, timeout=120, env=_node_env()
    )
    assert result.stdout.split("\n")[:2] == ["absent audioclip", f"absent {SHIPPED_BY_PIP}"], (
        result.stdout + result.stderr
    )
    return python


def shipped_runtime_env(app_zip: Path) -> dict:
    """``configs/cluster.yaml``'s runtime_env as shipped (its ``pip`` list), with the test's zip as
    the working_dir."""
    cluster_config = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    runtime_env = cluster_config["applications"][0]["runtime_env"]
    assert any(p.startswith(SHIPPED_BY_PIP) for p in runtime_env["pip"]["packages"])
    return {**runtime_env, "working_dir": app_zip.as_uri()}


def _node_env() -> dict:
    """The environment a node starts in: nothing that would put the project on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "RAY_SERVE_SLOW_STARTUP_WARNING_S": "120"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start --head`` from a Python without the project and one of its dependencies; ``serve
    deploy`` ships the code (a working_dir zip made by ``scripts/package_app.py``) and installs the
    missing dependency (the cluster config's ``pip`` list) through the config's ``runtime_env``."""
    workdir = tmp_path_factory.mktemp("elastic")
    python = bare_python(workdir)
    app_zip = workdir / "audioclip-serve-app.zip"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package_app.py"), "-o", str(app_zip)],
        check=True,
        timeout=120,
    )
    # Token auth, as the README's cluster commands run it: the token file serves `ray start`, the
    # serve CLI and this test's driver.
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60
    )
    env = _node_env()  # token auth: from conftest
    gcs, dashboard, http_port = free_port(), free_port(), free_port()
    start = [
        str(python), "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}", "--num-cpus=4",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180, cwd=workdir)
    config = yaml.safe_load((ROOT / "configs" / "autoscale.yaml").read_text())
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    app["runtime_env"] = shipped_runtime_env(app_zip)
    # With an application runtime_env, Serve keeps a deployment's replicas through a later
    # `deployments:` override only if that deployment was overridden from the first deploy on.
    app["deployments"] = [
        {"name": "TextEncoder", "user_config": {"max_batch_size": 32, "batch_wait_timeout_s": 0.002}}
    ]
    found = Cluster(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{dashboard}", config, workdir, env)
    assert os.environ["RAY_AUTH_MODE"] == "token"  # set by conftest before Ray was imported
    try:
        found.deploy(config, "autoscale")
        print(f"\nautoscale.yaml ready {wait_ready(found.url, timeout_s=300):.1f} s after serve deploy")
        ray.init(address=f"127.0.0.1:{gcs}", namespace="elastic-tests", log_to_driver=False)
        yield found
    finally:
        # serve.shutdown first: the driver's handles keep a metrics thread that would otherwise
        # reconnect on its own, and exit this process once `ray stop` took the cluster away.
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@dataclass
class Load:
    """Closed-loop clients sending ``request(client)`` until stopped; every answer is recorded."""

    request: Callable[[httpx.Client], httpx.Response]
    clients: int
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, checkpoint)
    checks: list[str] = field(default_factory=list)  # wrong answers, described
    check: Callable[[httpx.Response], str | None] | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = self.request(client)
                    status, sha = r.status_code, r.headers.get("x-checkpoint-sha256", "")
                    problem = self.check(r) if self.check and status == 200 else None
                except httpx.HTTPError as err:
                    status, sha, problem = -1, "", f"{type(err).__name__}: {err}"
                self.answers.append((time.monotonic(), status, sha))
                if problem:
                    self.checks.append(problem)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def failed(self, allowed: tuple[int, ...] = ()) -> list[int]:
        return [status for _, status, _ in self.answers if status != 200 and status not in allowed]


def _replicas(cluster: Cluster, tower: str) -> int:
    return cluster.models()["towers"][tower]["replicas"]


def _tower_stats(deployment: str, calls: int = 24) -> dict[int, dict]:
    """stats() of each replica reached by ``calls`` handle calls, by pid."""
    handle = serve.get_deployment_handle(deployment, "audioclip")
    return {s["pid"]: s for s in (handle.stats.remote().result(timeout_s=60) for _ in range(calls))}


def _without_the_token(tmp: Path) -> dict:
    """A caller's environment without Ray's token: no token variables, and a home with no token file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    return {**env, "HOME": str(tmp)}


def test_the_control_plane_refuses_callers_without_the_token(cluster, tmp_path):
    """Token auth (the README's cluster commands): without the token, the dashboard's job and Serve
    APIs answer 401 and the CLIs are refused; with it, the documented deploy works (the fixture's)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    bearer = {"authorization": f"Bearer {token}"}
    attempts = {
        "GET /api/jobs/": lambda h: httpx.get(f"{cluster.dashboard}/api/jobs/", headers=h),
        "POST /api/jobs/": lambda h: httpx.post(
            f"{cluster.dashboard}/api/jobs/", json={"entrypoint": "touch /tmp/pwned"}, headers=h
        ),
        "GET /api/serve/applications/": lambda h: httpx.get(
            f"{cluster.dashboard}/api/serve/applications/", headers=h
        ),
        "PUT /api/serve/applications/": lambda h: httpx.put(
            f"{cluster.dashboard}/api/serve/applications/", json={"applications": []}, headers=h
        ),
    }
    refused = {name: call({}).status_code for name, call in attempts.items()}
    wrong_token = attempts["GET /api/jobs/"]({"authorization": "Bearer not-the-token"}).status_code
    print(f"\nwithout the token: {refused}; a wrong token: {wrong_token}")
    assert set(refused.values()) == {401} and wrong_token == 403  # no token: 401; a wrong one: 403
    assert attempts["GET /api/jobs/"](bearer).status_code == 200
    assert attempts["GET /api/serve/applications/"](bearer).status_code == 200
    outsider = _without_the_token(tmp_path)
    path = cluster.workdir / "outsider.yaml"
    path.write_text(yaml.safe_dump(cluster.config))
    for command in (
        [str(BIN / "serve"), "deploy", str(path), "-a", cluster.dashboard],
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--", "touch", "/tmp/pwned"],
    ):
        result = subprocess.run(command, env=outsider, capture_output=True, text=True, timeout=120)
        print(f"{Path(command[0]).name} {command[1]} without the token: exit {result.returncode}")
        assert result.returncode != 0, result.stdout[-500:]
    assert not Path("/tmp/pwned").exists()
    assert httpx.get(f"{cluster.url}/readyz", timeout=30).status_code == 200  # the app kept serving


def test_text_tower_scales_up_under_a_burst_and_back_down(cluster):
    store = serve.get_deployment_handle("WeightStore", "audioclip")
    before = store.info.remote().result(timeout_s=60)
    timeline: list[tuple[float, int]] = []
    started = time.monotonic()
    with Load(lambda c: c.post(f"{cluster.url}/v1/embed/text", json={"texts": [QUERY]}), clients=8) as load:
        while time.monotonic() - started < 120 and (not timeline or timeline[-1][1] < 2):
            timeline.append((round(time.monotonic() - started, 1), _replicas(cluster, "text")))
            time.sleep(1)
        time.sleep(8)  # the new replica takes part in batching
        per_replica = _tower_stats("TextEncoder")
    burst_answers = len(load.answers)
    while time.monotonic() - started < 300 and timeline[-1][1] > 1:
        timeline.append((round(time.monotonic() - started, 1), _replicas(cluster, "text")))
        time.sleep(2)
    after = store.info.remote().result(timeout_s=60)
    print(f"\ntext replicas over time (s, replicas): {timeline}")
    print(f"{burst_answers} requests in the burst, {len(load.failed())} failed; batches per replica: "
          f"{ {pid: s['batch_sizes'][-8:] for pid, s in per_replica.items()} }")  # fmt: skip
    assert max(r for _, r in timeline) >= 2 and timeline[-1][1] == 1, timeline
    assert not load.failed(), collections.Counter(load.failed())
    assert len(per_replica) >= 2 and all(max(s["batch_sizes"] or [0]) > 1 for s in per_replica.values())
    # The new replica took the store's reference: the checkpoint was not read again.
    assert (after["pid"], after["loads"]) == (before["pid"], 1)
    assert after["refs_given"]["text"] > before["refs_given"]["text"]


def test_audio_tower_sleeps_at_zero_and_cold_starts_on_demand(cluster):
    ready = httpx.get(f"{cluster.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["scaled_to_zero"] == ["audio"], ready.text
    assert cluster.models()["towers"]["audio"] == {"state": "scaled_to_zero", "replicas": 0,
                                                   "min_replicas": 0, "max_replicas": 1}  # fmt: skip
    wav = (INPUTS / "chord_44k.wav").read_bytes()
    started = time.monotonic()
    r = httpx.post(
        f"{cluster.url}/v1/embed/audio", content=wav, headers={"content-type": "audio/wav"}, timeout=180
    )
    cold_start = time.monotonic() - started
    assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 1024, r.text
    started = time.monotonic()
    again = httpx.post(
        f"{cluster.url}/v1/embed/audio", content=wav, headers={"content-type": "audio/wav"}, timeout=60
    )
    warm = time.monotonic() - started
    print(f"\naudio cold start: first request {cold_start:.1f} s, the next {warm:.2f} s")
    assert again.status_code == 200 and again.json()["embeddings"] == r.json()["embeddings"]
    # The state comes from the controller, refreshed within about a second of a probe that finds it old.
    awake = _wait(
        lambda: (
            httpx.get(f"{cluster.url}/readyz", timeout=10).json()["scaled_to_zero"] == []
            and _replicas(cluster, "audio") == 1
        ),
        30,
        "/readyz and /v1/models reporting the audio replica",
    )
    print(f"readiness reported the awake audio tower {awake:.1f} s after its answer")


def _expected_text(checkpoint: str) -> np.ndarray:
    arrays, _ = load_weights(checkpoint)
    model = build_tower(arrays, "text")
    text = pipelines()["text"]
    return text.embed(model, [text.decode(QUERY)])[0]


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` holds; a probe that fails (a router being replaced) is a no."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        assert time.monotonic() - started < timeout_s, f"{what}: not after {timeout_s} s"
        time.sleep(1)


def test_updates_under_load_fail_nothing_and_never_mix_checkpoints(cluster):
    expected = {}
    for checkpoint in ("synthetic:demo", "synthetic:rollout"):
        vector = _expected_text(checkpoint)
        expected[load_weights(checkpoint)[1].sha256] = vector
    old_sha = cluster.models()["checkpoint_sha256"]
    assert old_sha in expected

    def check_text(r: httpx.Response) -> str | None:
        sha = r.headers["x-checkpoint-sha256"]
        cos = row_cosines(np.asarray(r.json()["embeddings"], np.float32), expected[sha])[0]
        return None if cos > 0.99999 else f"vector not the one of checkpoint {sha[:12]} (cosine {cos:.5f})"

    photo = base64.b64encode((INPUTS / "rocket.jpg").read_bytes()).decode()
    rank_body = {"query": {"image": photo}, "candidates": [{"text": "a rocket"}, {"text": QUERY}]}

    def check_rank(r: httpx.Response) -> str | None:
        body = r.json()
        return (
            None
            if body["checkpoint_sha256"] == r.headers["x-checkpoint-sha256"]
            else "rank names two checkpoints"
        )

    figures = {}
    config = copy.deepcopy(cluster.config)
    texts = Load(_text_at(cluster.url), clients=3, check=check_text)
    ranks = Load(lambda c: c.post(f"{cluster.url}/v1/rank", json=rank_body), clients=1, check=check_rank)
    with texts, ranks:
        time.sleep(3)
        old_pids = set(_tower_stats("TextEncoder"))
        # 1. batch settings, in place: Serve's per-deployment override -> reconfigure, no restart
        config["applications"][0]["deployments"] = [
            {"name": "TextEncoder", "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}}
        ]
        mark = len(texts.answers)
        cluster.deploy(config, "batch")
        seconds = _wait(lambda: cluster.models()["towers"]["text"]["max_batch_size"] == 16, 120, "batch size")
        assert old_pids <= set(_tower_stats("TextEncoder")), "a text replica restarted"
        figures["batch settings"] = (seconds, texts.answers[mark:])
        # 2. a replica count
        config["applications"][0]["deployments"].append({"name": "ImageEncoder", "num_replicas": 2})
        mark = len(texts.answers)
        cluster.deploy(config, "replicas")
        seconds = _wait(lambda: _replicas(cluster, "image") == 2, 240, "two image replicas")
        figures["image replicas 1 -> 2"] = (seconds, texts.answers[mark:])
        # 3. a new checkpoint rolls out (an args change: every deployment gets new replicas)
        config["applications"][0]["args"]["checkpoint"] = "synthetic:rollout"
        mark = len(texts.answers)
        cluster.deploy(config, "rollout")

        def rolled() -> bool:
            models = cluster.models()
            shas = {t["checkpoint_sha256"] for t in models["towers"].values() if "checkpoint_sha256" in t}
            return models["checkpoint_sha256"] != old_sha and shas == {models["checkpoint_sha256"]}

        seconds = _wait(rolled, 400, "the new checkpoint everywhere")
        time.sleep(5)
        figures["checkpoint rollout"] = (seconds, texts.answers[mark:])
    for name, (seconds, answers) in figures.items():
        failed = [a for a in answers if a[1] != 200]
        print(f"\n{name}: done in {seconds:.0f} s, {len(answers)} requests under load, {len(failed)} failed")
    shas = collections.Counter(sha[:12] for _, status, sha in texts.answers if status == 200)
    rank_statuses = collections.Counter(status for _, status, _ in ranks.answers)
    print(f"answers by checkpoint: {dict(shas)}; rank statuses: {dict(rank_statuses)}")
    assert not texts.failed(), collections.Counter(texts.failed())
    assert not texts.checks and not ranks.checks, (texts.checks[:3], ranks.checks[:3])
    assert not ranks.failed(allowed=(503,)), rank_statuses  # mid-rollout a rank waits or says retry
    assert len(shas) == 2, shas  # answers from both checkpoints, each its own checkpoint's vector
    assert rank_statuses[200] > 0
    through_handle = serve.get_app_handle("audioclip").embed.remote("text", [QUERY]).result(timeout_s=120)
    new_sha = cluster.models()["checkpoint_sha256"]
    assert through_handle.checkpoint_sha256 == new_sha != old_sha  # the handle API names it too
    assert row_cosines(through_handle.vectors, expected[new_sha])[0] > 0.99999


def _text_at(url: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda client: client.post(f"{url}/v1/embed/text", json={"texts": [QUERY]})
