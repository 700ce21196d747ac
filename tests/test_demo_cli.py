"""`serve run configs/demo.yaml`, as a user runs it, reaches /readyz and answers.

As `make demo` does, it runs on a lean Ray head of its own (``audioclip_serve.local_head``: free
ports, no dashboard, log monitor or autoscaler monitor), beside any other cluster in the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from audioclip_serve.bench.serveapp import ServeApp, free_port, wait_ready, write_config
from audioclip_serve.local_head import LocalHead, ray_cli
from audioclip_serve.procfs import cmdline, descendants, start_time

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.serve, pytest.mark.slow]


def readme_snippets() -> list[tuple[str, str]]:
    """(language, code) of every ``bash`` and ``python`` block of the README, in order."""
    blocks = re.findall(r"^```(bash|python)\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    assert len(blocks) >= 6, "the README lost its examples"
    return blocks


def run_readme_snippets(port: int, grpc_target: str, tmp_path: Path) -> None:
    """Run the README's examples as a user would, against the demo on ``port`` (HTTP) and
    ``grpc_target`` (its gRPC ingress)."""
    printed = []
    for n, (language, code) in enumerate(readme_snippets()):
        code = code.replace("localhost:8000", f"127.0.0.1:{port}").replace("localhost:9000", grpc_target)
        code = code.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        code = re.sub(r" -o (\S+)", lambda m: f" -o {tmp_path / m.group(1)}", code)  # outputs go to tmp
        if language == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:
            script = tmp_path / f"snippet_{n}.py"
            script.write_text(code)
            cmd = [sys.executable, str(script)]
        result = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0, (
            f"README block {n} ({language}) failed:\n{code}\n{result.stderr[-2000:]}"
        )
        assert '"error"' not in result.stdout, f"README block {n} answered an error:\n{result.stdout[:500]}"
        printed.append(result.stdout)
    out = "".join(printed)
    assert "(2, 1024) 1" in out  # the gRPC block: two texts, one photo
    assert "INVALID_ARGUMENT undecodable at item 1" in out  # and its refused photo
    assert np.load(tmp_path / "emb.npy").shape == (1, 1024)
    inputs = ROOT / "tests" / "data" / "golden" / "inputs"
    photos = sorted(p for p in inputs.iterdir() if p.suffix in (".jpg", ".png"))
    assert np.load(tmp_path / "photos.npy").shape == (len(photos), 1024)  # audioclip-embed, --server
    sources = (tmp_path / "photos.txt").read_text().split()
    assert sources == [p.name for p in photos]
    assert np.load(tmp_path / "clips.npy").shape[1] == 1024  # audioclip-embed, in-process
    assert np.load(tmp_path / "photo_bits.npy").dtype == np.uint8  # embedding_dtype=ubinary
    assert np.load(tmp_path / "photo_bits.npy").shape == (1, 128)
    windows = (tmp_path / "windows.txt").read_text().splitlines()  # audioclip-embed --window
    assert np.load(tmp_path / "windows.npy").shape == (len(windows), 1024)
    # 12 s of sound in 4-s windows; AAC's decoded length may pass 12 s by a few milliseconds
    of_scene = [
        [float(x) for x in line.split("\t")[1:]] for line in windows if line.startswith("scene.m4a\t")
    ]
    assert np.allclose(of_scene, [[0, 4], [4, 8], [8, 12]], atol=0.05), of_scene
    assert sum(line.startswith("memo.webm\t") for line in windows) == 3
    assert len(json.loads((tmp_path / "windowed.json").read_text())["windows"]) == 3
    timeline = json.loads((tmp_path / "timeline.json").read_text())["timeline"]
    spans = [(w["start_s"], w["end_s"]) for w in timeline]
    assert np.allclose(spans, [(0, 4), (4, 8), (8, 12)], atol=0.05), spans
    corpus = pq.read_table(tmp_path / "photos_parquet")  # audioclip-embed --ray local
    assert sorted(Path(s).name for s in corpus.column("source").to_pylist()) == [p.name for p in photos]
    assert corpus.column("error").null_count == len(photos)


# Processes of a default head that the lean head leaves out.
LEFT_OUT = (
    "ray/_private/log_monitor.py",
    "autoscaler/_private/monitor.py",
    "ray-dashboard-",
)


def test_serve_run_demo_config(tmp_path):
    app = ServeApp(ROOT / "configs" / "demo.yaml", tmp_path, ready_timeout_s=300)
    app.start()  # fails fast, with the log's tail, if serve run exits before /readyz answers
    try:
        print(f"\ndemo ready {app.ready_s:.1f} s after the first probe")
        family = {pid: cmdline(pid) for pid in app.head.pids()}
        assert any("ServeReplica:audioclip:TextEncoder" in c for c in family.values())  # under the head
        assert any("gcs_server" in c for c in family.values())
        assert not [c for c in family.values() if any(mark in c for mark in LEFT_OUT)]
        r = httpx.post(
            f"{app.url}/v1/embed/text", json={"texts": ["a dog barking"], "normalize": True}, timeout=60
        )
        assert r.status_code == 200
        body = r.json()
        assert body["model"] == "audioclip-demo" and len(body["embeddings"][0]) == 1024
        assert httpx.get(f"{app.url}/v1/models", timeout=60).json()["weights"] == "synthetic"
        assert app.grpc_target is not None, "the demo config lost its gRPC ingress"
        run_readme_snippets(app.port, app.grpc_target, tmp_path)
        bad = httpx.post(f"{app.url}/v1/embed/text", json={"texts": ["ok", 5]}, timeout=60)
        assert bad.status_code == 422
        # The refusal is in the router's log file at once, not held in Serve's throughput-mode buffer.
        log_dirs = {m.group(1) for c in family.values() if (m := re.search(r"--log_dir=(\S+)", c))}
        assert len(log_dirs) == 1, f"the GCS and raylet name one log folder, not {log_dirs}"
        [logs] = log_dirs
        router_logs = list((Path(logs) / "serve").glob("replica_audioclip_Router_*.log"))
        assert router_logs
        text = "".join(f.read_text() for f in router_logs)
        assert "refused: 422 not_a_string" in text, "the router's refusal did not reach its log file"
    finally:
        app.stop()


def test_make_demo_launcher_serves_and_stops_its_head(tmp_path):
    """`make demo`'s command (``python -m audioclip_serve.local_head CONFIG``) serves the config, and
    Ctrl-C stops Serve, then every process of its head."""
    port = free_port()
    config, _ = write_config(ROOT / "configs" / "demo.yaml", port, tmp_path, free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "audioclip_serve.local_head", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "launcher.log").open("wb"),
    )
    family: dict[int, int | None] = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=300, proc=proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed/text", json={"texts": ["rain"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 1024
        family = {pid: start_time(pid) for pid in descendants(proc.pid)}
        assert len(family) > 5  # the head, its GCS and raylet, the replicas
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) in (0, 130)
        alive = [pid for pid, started in family.items() if start_time(pid) == started and cmdline(pid)]
        assert not alive, [cmdline(p) for p in alive]
        assert "Ray head at 127.0.0.1:" in (tmp_path / "launcher.log").read_text()
    finally:  # on a failure: the launcher's own cleanup, then whatever of its head is left
        family = family or {pid: start_time(pid) for pid in descendants(proc.pid)}
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=150)
        for pid, started in family.items():
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_left_out_processes_are_what_a_default_head_runs(tmp_path):
    """The marks of ``LEFT_OUT`` name processes a default head really starts, so their absence
    under the demo's head means something; the lean head starts none of them."""
    found = {}
    for lean, look_s in ((False, 60.0), (True, 15.0)):
        head = LocalHead(dict(os.environ), tmp_path / f"head_lean_{lean}.log", lean=lean)
        head.start()
        try:
            found[lean] = _marks_seen(head, look_s)
        finally:
            head.stop()
    assert found[False] == set(LEFT_OUT)
    assert found[True] == set()


def _marks_seen(head: LocalHead, seconds: float) -> set[str]:
    """``LEFT_OUT`` marks among the head's processes, looked for over ``seconds`` (the dashboard's
    modules start after the head says it is up)."""
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and seen != set(LEFT_OUT):
        lines = [cmdline(pid) for pid in head.pids()]
        seen |= {mark for mark in LEFT_OUT if any(mark in line for line in lines)}
        time.sleep(1.0)
    return seen


def test_head_and_its_drivers_share_one_auth_mode(tmp_path):
    """With ``RAY_AUTH_MODE`` unset and a token file on the machine, `ray start` turns token auth on
    by itself but a driver given the address does not: the head makes the mode explicit (Ray's
    default for a new local cluster, token), so a process started with its env connects."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["HOME"] = str(tmp_path)  # Ray's token file is ~/.ray/auth_token: this test's own
    made = subprocess.run(
        [*ray_cli(), "get-auth-token", "--generate"],
        env={**env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
    )
    assert made.returncode == 0 and (tmp_path / ".ray" / "auth_token").exists(), made.stderr
    head = LocalHead(env, tmp_path / "head.log")
    head.start()
    try:
        driver = "import ray, sys; ray.init(address=sys.argv[1]); print(len(ray.nodes()))"
        result = subprocess.run(
            [sys.executable, "-c", driver, head.address],
            env={**env, "RAY_AUTH_MODE": head.env["RAY_AUTH_MODE"]},  # a driver: not the serving env
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0 and result.stdout.split()[-1] == "1", result.stderr[-2000:]
    finally:
        head.stop()
