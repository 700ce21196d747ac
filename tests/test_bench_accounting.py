"""The benchmark's bookkeeping: which batches belong to a case, which config it reads, what the raw
path runs, the CPU per request, and the readiness wait the soak and the tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audioclip_serve.bench.meter import TowerStats, cpu_ms_per_request
from audioclip_serve.bench.raw import app_settings, raw_call
from audioclip_serve.bench.report import ServedResult, cpu_per_request_table
from audioclip_serve.bench.serveapp import free_port, wait_ready
from deployments.settings import AppArgs

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(pid: int, sizes: list[int], total: int) -> dict:
    return {"pid": pid, "batch_sizes": sizes, "batches_total": total}


def test_batches_between_snapshots_are_the_new_ones_only():
    between = TowerStats.batches_between
    assert between(_snapshot(1, [1, 1], 2), _snapshot(1, [1, 1, 4, 4, 2], 5)) == [4, 4, 2]
    # the replica keeps only its latest sizes: a full list of equal sizes still counts right
    assert between(_snapshot(1, [8] * 4096, 5000), _snapshot(1, [8] * 4096, 5200)) == [8] * 200
    assert between(_snapshot(1, [3], 1), _snapshot(1, [3], 1)) == []
    # more batches than the replica remembers, or another replica: unknown, not wrong
    assert between(_snapshot(1, [2] * 10, 10), _snapshot(1, [2] * 10, 30)) is None
    assert between(_snapshot(1, [2], 1), _snapshot(2, [2, 2], 2)) is None
    assert between(None, _snapshot(1, [2], 1)) is None


def test_app_settings_come_from_the_named_application(tmp_path):
    settings = app_settings(ROOT / "configs" / "gpu.yaml")
    assert settings.image.max_replicas == 2 and settings.image.dtype == "fp16"
    other = tmp_path / "other.yaml"
    other.write_text("applications:\n  - name: something-else\n    import_path: x:y\n")
    with pytest.raises(SystemExit, match="no application named"):
        app_settings(other)


def test_raw_call_runs_the_served_text_pipeline(shared_weights):
    """The raw path decodes and embeds through the app's pipelines: a text tower built as the
    replicas build it gives ``encode_text``'s rows, as float32 on the CPU."""
    from audioclip.factory import build_tower

    settings = AppArgs()
    model = build_tower(shared_weights, "text", settings.tower("text").build(settings.audio_norm))
    texts = ["a dog barking", "heavy rain on a tin roof at night, recorded from far away in a storm"]
    out = raw_call(model, "text", texts, settings)()
    assert out.dtype == np.float32 and out.shape == (2, model.config.embed_dim)
    np.testing.assert_allclose(out, model.encode_text(texts).numpy(), rtol=1e-5, atol=1e-5)


def test_raw_results_name_the_runtime_that_ran(tmp_path):
    """A raw row says what ran the tower's hot part, as the replica's ``/v1/models`` entry does: with
    ``dtype: bf16`` on OpenVINO, bf16 where this CPU has it, else the fp32 graph and why."""
    from audioclip.backends import cpu_has_bf16
    from audioclip_serve.bench.inputs import make_inputs
    from audioclip_serve.bench.raw import run_raw

    text = {"backend": "openvino", "dtype": "bf16", "threads": 1, "graph_cache": str(tmp_path)}
    settings = AppArgs.model_validate({"towers": ["text"], "text": text})
    [row] = run_raw({"queries": make_inputs(["queries"])["queries"][:2]}, 0.0, 0.0, settings)
    assert row.batch == 1 and row.items_per_s > 0
    assert row.runtime.startswith("openvino bf16: " if cpu_has_bf16() else "openvino fp32 (bf16 asked")


def test_served_runtimes_are_read_from_the_models_route():
    """The report records each served tower's runtime from ``/v1/models`` over real HTTP, and nothing
    (not a failure) from an app that refuses to say."""
    import http.server
    import json
    import threading

    from audioclip_serve.bench.cli import served_runtimes

    towers = {"text": {"runtime": "openvino bf16: text.xml"}, "audio": {"state": "scaled_to_zero"}}

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"towers": towers}).encode()
            self.send_response(200 if self.path == "/v1/models" else 401)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert served_runtimes(url) == {"text": "openvino bf16: text.xml", "audio": "scaled_to_zero"}
        assert served_runtimes(url + "/secured") == {}  # answered 401
    finally:
        server.shutdown()


def test_cpu_ms_per_request_counts_the_serving_cluster_only():
    cores = {
        "proxy": 0.2,
        "Router": 0.3,
        "TextEncoder": 1.2,
        "controller": 0.05,
        "ray system": 0.05,
        "load client": 0.4,
        "bench driver": 0.01,
        "other": 0.02,
        "total": 2.23,
    }
    ms = cpu_ms_per_request(cores, wall_s=10.0, requests=1000)
    expected = {"Router": 3.0, "TextEncoder": 12.0, "other Ray": 1.0, "proxy": 2.0, "total": 18.0}
    assert ms == pytest.approx(expected)
    assert cpu_ms_per_request(cores, wall_s=10.0, requests=0) == {}
    served = ServedResult("http", "queries", "text", 1, 8, requests=1000, cpu_ms_per_request=ms)
    skipped = ServedResult("http", "large", "image", 32, 8, skipped="too big")
    table = cpu_per_request_table([served, skipped]).splitlines()
    assert table[0] == "| case | proxy | Router | TextEncoder | other Ray | total |"
    assert table[2:] == ["| http queries x1 c8 | 2.0 | 3.0 | 12.0 | 1.0 | 18.0 |"]


def test_wait_ready_fails_fast_when_the_server_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_ready(url, 60, proc)
    with pytest.raises(TimeoutError, match="not 200 after"):
        wait_ready(url, timeout_s=0.5)  # nobody listens: the tests' call, without a process


def test_request_path_targets_read_the_right_cases():
    """The performance issue's ratios come from c1 (against raw batch 1), the top concurrency and the
    best full request (against raw's best batch); CPU counts the proxy and the router only."""
    from audioclip_serve.bench.report import request_path_targets

    c1 = ServedResult("http", "queries", "text", 1, 1, requests=10, x_raw_b1=0.9, x_raw_max=0.2)
    c32 = ServedResult(
        "http", "queries", "text", 1, 32, requests=10, x_raw_b1=2.0, x_raw_max=0.7,
        cpu_ms_per_request={"proxy": 1.5, "Router": 2.0, "TextEncoder": 30.0},
    )  # fmt: skip
    full = [
        ServedResult("http", "queries", "text", 32, c, requests=5, items_per_s=v, x_raw_max=r)
        for c, v, r in ((1, 100.0, 0.6), (8, 150.0, 0.97))
    ]
    handle = ServedResult("handle", "queries", "text", 1, 32, requests=10, x_raw_max=0.99)
    targets = request_path_targets([c1, c32, *full, handle], "queries", 32)
    assert [t.measured for t in targets] == [0.9, 0.7, 0.97, 3.5]
    assert [t.met for t in targets] == [True, False, True, True]
    assert targets[2].detail == "best at c8"


def test_serve_env_is_parsed_as_key_value_pairs():
    """--serve-env names environment variables, not input kinds; a malformed pair is refused."""
    from audioclip_serve.bench.cli import parse_args

    args = parse_args(["--serve-env", "RAY_A=1,RAY_B=x=y", "--kinds", "queries"])
    assert args.serve_env == {"RAY_A": "1", "RAY_B": "x=y"}
    with pytest.raises(SystemExit):
        parse_args(["--serve-env", "RAY_A"])


def test_make_demo_and_the_benchmark_serve_in_one_environment(tmp_path, monkeypatch):
    """`make demo` sets no Ray variable of its own: it and the benchmark's app both get the launcher's
    SERVING_ENV, under whatever the caller sets (a lever under test, or the bench's auth mode)."""
    from audioclip_serve.bench.serveapp import ServeApp
    from audioclip_serve.local_head import SERVING_ENV, LocalHead

    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "demo"], cwd=root, capture_output=True, text=True, check=True)
    line = next(x for x in dry.stdout.splitlines() if "audioclip_serve.local_head " in x)
    assert not [w for w in line.split() if "=" in w and w.startswith(("RAY_", "REPORTER_"))]

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the caller's own variable
    lever = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    app = ServeApp(root / "configs" / "demo.yaml", tmp_path, 1, env=lever)
    head_env = LocalHead(app.env(), tmp_path / "head.log").env
    assert head_env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"  # the lever under test wins
    assert head_env["RAY_AUTH_MODE"] == "disabled"  # and so does the caller's environment
    others = {k: v for k, v in SERVING_ENV.items() if k != "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"}
    assert {k: head_env[k] for k in others} == {k: os.environ.get(k, v) for k, v in others.items()}
