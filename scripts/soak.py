#!/usr/bin/env python3
"""Soak test: a bounded steady load over mixed endpoints, with replica memory at start and end.

    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 [--minutes 5] [--concurrency 8]
    .venv/bin/python scripts/soak.py --start-demo           # serves configs/demo.yaml itself

Reports requests, errors, p50/p99 latency per endpoint, and the RSS of every Serve replica on this
machine (from /proc) after a warm-up and at the end. Target: zero errors, memory growth under 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "tests" / "data" / "golden" / "inputs"


def replica_rss_mib() -> dict[str, float]:
    """RSS of each Serve replica process on this machine, keyed by its process title."""
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if "ServeReplica:" not in title:
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        name = title.split("ServeReplica:", 1)[1].split()[0]
        out[f"{name} (pid {entry.name})"] = rss_kb / 1024
    return out


def requests_mix() -> list[tuple[str, dict]]:
    """(path, httpx kwargs) of the mixed workload: texts, a photo, a clip, a rank query."""
    jpeg = (INPUTS / "rocket.jpg").read_bytes()
    wav = (INPUTS / "speech_rain_22k.wav").read_bytes()
    texts = [f"soak text {i}: the sound of rain on a roof" for i in range(64)]
    return [
        ("/v1/embed/text", {"json": {"texts": texts[:8]}}),
        ("/v1/embed/text", {"json": {"texts": [texts[9]], "normalize": True}}),
        ("/v1/embed/image", {"content": jpeg, "headers": {"content-type": "image/jpeg"}}),
        ("/v1/embed/audio", {"content": wav, "headers": {"content-type": "audio/wav"}}),
        ("/v1/rank", {"json": {"query": {"text": "rain"}, "candidates": [{"text": t} for t in texts[:4]]}}),
        ("/v1/embed/image", {"json": {"images": [base64.b64encode(jpeg).decode()]}}),
    ]


async def soak(url: str, seconds: float, concurrency: int) -> dict:
    mix = requests_mix()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter[str] = collections.Counter()
    stop_at = time.monotonic() + seconds

    async def worker(offset: int, client: httpx.AsyncClient) -> None:
        i = offset
        while time.monotonic() < stop_at:
            path, kwargs = mix[i % len(mix)]
            i += 1
            start = time.perf_counter()
            try:
                r = await client.post(path, **kwargs)
                ok = r.status_code == 200
            except httpx.HTTPError as err:
                ok, r = False, None
                errors[f"{path} {type(err).__name__}"] += 1
            if ok:
                latencies[path].append(time.perf_counter() - start)
            elif r is not None:
                errors[f"{path} {r.status_code}"] += 1

    async def progress() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(30)
            done = sum(len(v) for v in latencies.values())
            print(f"  {done} requests, {sum(errors.values())} errors", file=sys.stderr)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)), progress())
    per_path = {
        path: {
            "requests": len(values),
            "p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(values, 99)) * 1000, 1),
        }
        for path, values in sorted(latencies.items())
    }
    return {
        "requests": sum(len(v) for v in latencies.values()),
        "errors": dict(errors),
        "endpoints": per_path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None)
    parser.add_argument("--start-demo", action="store_true")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=1.0,
        help="load before the first memory reading, so allocator caches and batch buffers of every "
        "endpoint are in place (otherwise their first large batch reads as growth)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args()
    app = None
    url = args.url or "http://127.0.0.1:8000"
    if args.start_demo:  # serve run of the demo config on a free port, as the benchmark does it
        from audioclip_serve.bench.serveapp import ServeApp

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        app = ServeApp(ROOT / "configs" / "demo.yaml", Path(tempfile.mkdtemp()), ready_timeout_s=300)
        app.start()
        url = app.url
    try:
        httpx.post(f"{url}/v1/embed/text", json={"texts": ["warm"]}, timeout=120)
        if args.warmup_minutes > 0:
            print(f"warming up for {args.warmup_minutes} min", file=sys.stderr)
            asyncio.run(soak(url, args.warmup_minutes * 60, args.concurrency))
        before = replica_rss_mib()
        report = asyncio.run(soak(url, args.minutes * 60, args.concurrency))
        after = replica_rss_mib()
    finally:
        if app is not None:
            app.stop()
    report["minutes"] = args.minutes
    report["warmup_minutes"] = args.warmup_minutes
    report["concurrency"] = args.concurrency
    report["replica_rss_mib"] = {
        name: {
            "start": round(mib, 1),
            "end": round(after.get(name, float("nan")), 1),
            "growth_pct": round(100 * (after.get(name, mib) - mib) / mib, 2),
        }
        for name, mib in before.items()
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    growth = max((v["growth_pct"] for v in report["replica_rss_mib"].values()), default=0.0)
    sys.exit(0 if not report["errors"] and growth < 10 else 1)


if __name__ == "__main__":
    main()
