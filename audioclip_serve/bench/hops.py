"""One client at a time against a served app: each request's latency and what it cost each of the
app's processes, for ``scripts/bench_hops.py`` (our query against Serve's own floor, the app in
``floor_app.py``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .common import log
from .load import HttpError, closed_loop
from .meter import CpuMeter, cpu_ms_per_request
from .serveapp import ServeApp

WARMUP_REQUESTS = 20


def write_floor_config(directory: Path) -> Path:
    """A serve config of the floor app, served as the demo is (no access log, the proxy on the head;
    ``ServeApp`` gives it a free port)."""
    config = {
        "proxy_location": "HeadOnly",
        "logging_config": {"enable_access_log": False},
        "applications": [
            {"name": "floor", "route_prefix": "/", "import_path": "audioclip_serve.bench.floor_app:app"}
        ],
    }
    path = directory / "floor.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class Call:
    """One request, sent again and again; ``check`` says whether an answer's body is right."""

    method: str
    route: str
    body: bytes | None
    check: Callable[[bytes], bool]


async def measure(url: str, call: Call, requests: int) -> dict:
    """``requests`` calls one after another on one keep-alive connection (the benchmark's closed
    loop at concurrency 1), each answer checked: latency p50 / mean / p99 in ms, and the p50 of the
    router's ``x-inference-time`` (the forward inside the tower) where the answers carry it. Raises
    ``HttpError`` if any answer was wrong."""
    import aiohttp

    inference: list[float] = []
    headers = {"content-type": "application/json"} if call.body is not None else {}
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=1)) as session:

        async def send(_: int) -> int:
            async with session.request(call.method, call.route, data=call.body, headers=headers) as response:
                payload = await response.read()
            if response.status != 200 or not call.check(payload):
                raise HttpError(f"{call.route}: {response.status} {payload[:200]!r}")
            if "x-inference-time" in response.headers:
                inference.append(float(response.headers["x-inference-time"]))
            return 1

        latencies, _, errors, _ = await closed_loop(send, 1, math.inf, requests, call.route)
    if errors:
        raise HttpError(f"{sum(errors.values())} of {requests} answers wrong: {dict(errors)}")
    latency_ms = np.array(latencies) * 1e3
    out = {
        "p50_ms": round(float(np.percentile(latency_ms, 50)), 2),
        "mean_ms": round(float(latency_ms.mean()), 2),
        "p99_ms": round(float(np.percentile(latency_ms, 99)), 2),
    }
    if inference:
        out["inference_p50_ms"] = round(float(np.median(inference)), 2)
    return out


def run_calls(app: ServeApp, calls: dict[str, Call], requests: int) -> dict[str, dict]:
    """Each call on a running app, with the CPU milliseconds per request in each of its processes."""
    meter = CpuMeter(app.root_pids())
    out = {}
    for name, call in calls.items():
        asyncio.run(measure(app.url, call, WARMUP_REQUESTS))  # untimed, and outside the CPU count
        before, started = meter.snapshot(), time.perf_counter()
        result = asyncio.run(measure(app.url, call, requests))
        wall_s = time.perf_counter() - started
        cores = meter.usage(before, meter.snapshot(), wall_s)
        result["cpu_ms_per_request"] = cpu_ms_per_request(cores, wall_s, requests)
        log(f"  {name}: {result}")
        out[name] = result
    return out


def serve_and_measure(config: Path, calls: dict[str, Call], requests: int, workdir: Path) -> dict[str, dict]:
    """``run_calls`` on the app of ``config``, served on a head of its own for the time it takes."""
    app = ServeApp(config, workdir, ready_timeout_s=300)
    app.start()
    try:
        return run_calls(app, calls, requests)
    finally:
        app.stop()


def summary(floor: dict[str, dict], demo: dict[str, dict], raw_ms: float) -> dict[str, float]:
    """A round's query against the floor: what the hops cost back to back and around a forward's
    time, what the query spends beyond its forward, and served/raw at concurrency 1 for both (items/s
    at c1 is 1 / the mean latency)."""
    query = demo["query"]
    forward = query["inference_p50_ms"]
    return {
        "floor_hops_back_to_back_ms": floor["hop"]["p50_ms"],
        "floor_hops_around_a_forward_ms": round(floor["hop_forward"]["p50_ms"] - raw_ms, 2),
        "query_minus_its_forward_ms": round(query["p50_ms"] - forward, 2),
        "forward_in_replica_over_raw": round(forward / raw_ms, 3),
        "served_over_raw_c1": round(raw_ms / query["mean_ms"], 3),
        "floor_served_over_raw_c1": round(raw_ms / floor["hop_forward"]["mean_ms"], 3),
    }


def halt_poll_ns() -> int | None:
    """How long an idle vCPU of this guest polls before it halts (the haltpoll cpuidle driver; None
    where there is none). At 0 every idle vCPU halts, and waking it goes through the hypervisor."""
    try:
        return int(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text())
    except (OSError, ValueError):
        return None
