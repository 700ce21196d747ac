"""The floor app of ``scripts/bench_hops.py``: served as the demo is, it answers through both hops,
every answer is checked, and its processes' CPU is counted under their own deployments."""

from __future__ import annotations

import pytest

from audioclip_serve.bench.hops import Call, run_calls, write_floor_config
from audioclip_serve.bench.load import HttpError
from audioclip_serve.bench.serveapp import ServeApp

pytestmark = [pytest.mark.serve, pytest.mark.slow]


@pytest.fixture(scope="module")
def floor_app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("floor")
    app = ServeApp(write_floor_config(workdir), workdir, ready_timeout_s=300)
    app.start()
    yield app
    app.stop()


def test_the_floor_app_echoes_through_both_hops(floor_app):
    body = b'{"texts": ["a dog barking"]}'
    calls = {
        "direct": Call("POST", "/direct", body, body.__eq__),
        "hop_forward": Call("POST", "/hop?spin_ms=3", body, body.__eq__),
    }
    results = run_calls(floor_app, calls, requests=5)
    assert set(results) == {"direct", "hop_forward"}
    hop = results["hop_forward"]
    assert hop["p50_ms"] <= hop["p99_ms"]
    # The callee spun 3 ms of CPU a request on its executor: counted to its own deployment (in
    # 10-ms clock ticks over 25 requests, so not exactly 3), not to the router.
    assert hop["cpu_ms_per_request"]["FloorTower"] > 1.5
    assert hop["cpu_ms_per_request"]["FloorRouter"] > 0
    assert results["direct"]["cpu_ms_per_request"].get("FloorTower", 0.0) < 1.5


def test_a_wrong_answer_fails_the_measurement(floor_app):
    wrong = Call("POST", "/hop", b"ping", lambda answer: answer == b"pong")
    with pytest.raises(HttpError, match="/hop: 200"):
        run_calls(floor_app, {"wrong": wrong}, requests=1)
