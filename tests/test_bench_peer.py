"""The side-by-side benchmark's bookkeeping: every answer checked, ratios from the right raw rates."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import load_script
from serve_support import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

bench_peer = load_script("bench_peer")


async def _embeddings(request: Request) -> JSONResponse:
    """An OpenAI-style server that answers 1024-d vectors, except a 512-d one for inputs naming
    "short" and a 503 for inputs naming "busy"."""
    texts = (await request.json())["input"]
    if any("busy" in t for t in texts):
        return JSONResponse({"error": "busy"}, status_code=503)
    rows = [{"embedding": [0.0] * (512 if "short" in t else 1024)} for t in texts]
    return JSONResponse({"data": rows})


@pytest.fixture(scope="module")
def server():
    port = free_port()
    app = Starlette(routes=[Route("/embeddings", _embeddings, methods=["POST"])])
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/embeddings"
    for _ in range(100):
        try:
            httpx.post(url, json={"input": ["x"]}, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url
    runner.should_exit = True
    thread.join(timeout=10)


def test_good_answers_count_as_items(server):
    result = asyncio.run(bench_peer.run_case(server, "m", ["a", "b", "c"], 2, 2, 0.5))
    assert result["errors"] == {} and result["requests"] > 0
    assert result["items_per_s"] > 0 and result["p50_ms"] <= result["p99_ms"]


@pytest.mark.parametrize(("pool", "error"), [(["a", "short"], "HttpError"), (["a", "busy"], "HttpError 503")])
def test_wrong_shapes_and_refusals_count_as_errors(server, pool, error):
    result = asyncio.run(bench_peer.run_case(server, "m", pool, 1, 1, 0.5))
    assert error in " ".join(result["errors"]), result
    # the pool alternates good and bad inputs: about half the requests failed, none counted as items
    assert result["requests"] > 0 and sum(result["errors"].values()) >= result["requests"] - 1


def test_ratios_use_batch_one_only_for_single_items_at_concurrency_one():
    rows = []
    for items, conc in bench_peer.CASES:
        for rnd, (ours, peer) in enumerate([(40.0, 20.0), (30.0, 20.0)], 1):
            case = {"round": rnd, "items": items, "concurrency": conc}
            rows.append(
                case
                | {"ours": {"items_per_s": ours, "p50_ms": 10}, "peer": {"items_per_s": peer, "p50_ms": 20}}
            )
    lines = bench_peer.table(rows, {1: 80.0, 32: 300.0}, bench_peer.parse_rates("1=40,32=100"))
    c1 = next(line for line in lines.splitlines() if line.startswith("| 1 item, concurrency 1 "))
    c32 = next(line for line in lines.splitlines() if line.startswith("| 1 item, concurrency 32 "))
    assert [cell.strip() for cell in c1.split("|")[2:7]] == [
        "30.0-40.0",
        "20.0",
        "1.50-2.00",
        "0.38-0.50",
        "0.50",
    ]
    assert [cell.strip() for cell in c32.split("|")[5:7]] == ["0.10-0.13", "0.20"]
    assert bench_peer.parse_rates("") == {}
