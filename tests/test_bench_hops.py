"""The floor app of ``scripts/bench_hops.py``: served as the demo is, it answers through both hops,
every answer is checked, and its processes' CPU is counted under their own deployments; and the
arithmetic of a round's summary."""

from __future__ import annotations

import pytest

from audioclip_serve.bench.hops import Call, run_calls, summary, write_floor_config
from audioclip_serve.bench.load import HttpError
from audioclip_serve.bench.serveapp import ServeApp


@pytest.fixture(scope="module")
def floor_app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("floor")
    app = ServeApp(write_floor_config(workdir), workdir, ready_timeout_s=300)
    app.start()
    yield app
    app.stop()


@pytest.mark.serve
@pytest.mark.slow
def test_the_floor_app_echoes_through_both_hops(floor_app):
    body = b'{"texts": ["a dog barking"]}'
    calls = {
        "direct": Call("POST", "/direct", body, body.__eq__),
        "hop_forward": Call("POST", "/hop?spin_ms=3", body, body.__eq__),
    }
    results = run_calls(floor_app, calls, requests=20)
    hop = results["hop_forward"]
    assert hop["p50_ms"] >= 3.0  # the callee spent 3 ms of its thread's CPU time before answering
    # Those 3 ms a request are counted to the callee's own deployment (in 10-ms clock ticks over 20
    # requests, so roughly), not to the router; the direct route never reaches the callee.
    assert hop["cpu_ms_per_request"]["FloorTower"] >= 2.0
    assert hop["cpu_ms_per_request"]["FloorRouter"] > 0
    assert results["direct"]["cpu_ms_per_request"].get("FloorTower", 0.0) < 2.0


@pytest.mark.serve
@pytest.mark.slow
def test_a_wrong_answer_fails_the_measurement(floor_app):
    wrong = Call("POST", "/hop", b"ping", lambda answer: answer == b"pong")
    # The untimed warm-up (20 requests) already checks every answer, and stops there.
    with pytest.raises(HttpError, match=r"20 of 20 answers wrong.*/hop: 200"):
        run_calls(floor_app, {"wrong": wrong}, requests=1)


def test_a_rounds_summary_sets_the_query_against_the_floor():
    floor = {"hop": {"p50_ms": 2.5}, "hop_forward": {"p50_ms": 17.0, "mean_ms": 18.0}}
    demo = {"query": {"p50_ms": 20.0, "mean_ms": 24.0, "inference_p50_ms": 13.5}}
    assert summary(floor, demo, raw_ms=12.0) == {
        "floor_hops_back_to_back_ms": 2.5,
        "floor_hops_around_a_forward_ms": 5.0,  # 17.0 around a 12-ms busy callee
        "query_minus_its_forward_ms": 6.5,
        "forward_in_replica_over_raw": 1.125,
        "served_over_raw_c1": 0.5,  # 12 ms raw against 24 ms a query on average
        "floor_served_over_raw_c1": 0.667,
    }
