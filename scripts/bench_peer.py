"""Side by side against another OpenAI-compatible embedding server on the same machine.

Short text queries through each server's embeddings endpoint, the servers alternating case by case
for ``--rounds`` rounds (so drift on a noisy VM hits both alike), closed loop, every answer checked
(one 1024-d vector per input). The peer is started by the user and stays up throughout, as this app
does; our raw text tower (in-process, the config's backend) is measured first, before either server
is loaded, and the peer's raw rate can be passed in (``--peer-raw 1=..,32=..``, items/s measured in
the peer's own environment) to report both served/raw ratios.

    python scripts/bench_peer.py --peer-url http://127.0.0.1:7997 --json docs/bench_peer.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audioclip_serve.bench.common import ROOT, log
from audioclip_serve.bench.inputs import batch_of, make_inputs
from audioclip_serve.bench.load import HttpError, closed_loop
from audioclip_serve.bench.raw import app_settings, run_raw
from audioclip_serve.bench.serveapp import ServeApp

CASES = ((1, 1), (1, 8), (1, 32), (32, 1), (32, 4))  # (items per request, concurrency)


def served_model(url: str) -> str:
    """The first model id a server lists (OpenAI's ``GET /models``)."""
    import httpx

    return httpx.get(url, timeout=30).json()["data"][0]["id"]


async def run_case(
    url: str, model: str, pool: list[str], items: int, concurrency: int, seconds: float
) -> dict:
    """Items/s and latency percentiles of one closed-loop case; any non-200 or malformed answer
    is counted as an error."""
    import aiohttp

    bodies = [json.dumps({"model": model, "input": batch_of(pool, i * items, items)}) for i in range(8)]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120), connector=connector
    ) as session:

        async def send(index: int) -> int:
            body = bodies[index % len(bodies)]
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                payload = await r.read()
                if r.status != 200:
                    raise HttpError(str(r.status))
                rows = json.loads(payload)["data"]
                if len(rows) != items or any(len(row["embedding"]) != 1024 for row in rows):
                    raise HttpError("malformed")
                return items

        await send(0)  # warm-up, untimed
        latencies, answered, errors, elapsed = await closed_loop(
            send, concurrency, seconds, 1_000_000, f"{url} x{items} c{concurrency}"
        )
    # the same percentiles as bench.py's served rows (audioclip_serve.bench.report.summarize)
    p50, p99 = (round(float(np.percentile(latencies, q)) * 1e3, 1) if latencies else None for q in (50, 99))

    return {
        "items_per_s": round(answered / elapsed, 2),
        "requests": len(latencies),
        "errors": dict(errors),
        "p50_ms": p50,
        "p99_ms": p99,
    }


def parse_rates(text: str | None) -> dict[int, float]:
    """``1=31.5,32=120`` -> ``{1: 31.5, 32: 120.0}``."""
    if not text:
        return {}
    return {int(k): float(v) for k, v in (pair.split("=") for pair in text.split(","))}


def table(rows: list[dict], our_raw: dict[int, float], peer_raw: dict[int, float]) -> str:
    """The Markdown table: per case the range over rounds, ours / peer, and each served/raw."""
    out = [
        "| case | ours items/s | peer items/s | ours / peer | ours served/raw | peer served/raw "
        "| ours p50 ms | peer p50 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def span(values: list[float | None], spec: str = ".1f") -> str:
        values = [v for v in values if v is not None]
        if not values:
            return ""
        lo, hi = min(values), max(values)
        return f"{lo:{spec}}" if f"{lo:{spec}}" == f"{hi:{spec}}" else f"{lo:{spec}}-{hi:{spec}}"

    for items, conc in CASES:
        case = [r for r in rows if r["items"] == items and r["concurrency"] == conc]
        ours = [r["ours"]["items_per_s"] for r in case]
        peer = [r["peer"]["items_per_s"] for r in case]
        ratio = [o / p if p else None for o, p in zip(ours, peer, strict=True)]
        raw_batch = 1 if items == 1 and conc == 1 else 32
        ours_raw = span([o / our_raw[raw_batch] for o in ours], ".2f") if raw_batch in our_raw else ""
        peer_r = span([p / peer_raw[raw_batch] for p in peer], ".2f") if raw_batch in peer_raw else ""
        out.append(
            f"| {items} item{'s' if items > 1 else ''}, concurrency {conc} | {span(ours)} | {span(peer)} | "
            f"{span(ratio, '.2f')} | {ours_raw} | {peer_r} | "
            f"{span([r['ours']['p50_ms'] for r in case], '.0f')} | "
            f"{span([r['peer']['p50_ms'] for r in case], '.0f')} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-url", required=True, help="the peer's base URL (it serves POST /embeddings)")
    parser.add_argument("--peer-path", default="/embeddings", help="the peer's embeddings route")
    parser.add_argument("--peer-raw", help="the peer's raw items/s by batch, e.g. 1=31.5,32=120")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--seconds", type=float, default=20.0, help="per case and server")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    pool = make_inputs(["queries"])["queries"]
    settings = app_settings(args.config)
    raw = run_raw({"queries": pool}, seconds=8.0, max_call_s=2.0, settings=settings)
    our_raw = {r.batch: r.items_per_s for r in raw}
    peer_model = served_model(args.peer_url.rstrip("/") + "/models")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        app = ServeApp(args.config, Path(tmp), ready_timeout_s=300)
        app.start()
        try:
            ours_url, ours_model = f"{app.url}/v1/embeddings", served_model(f"{app.url}/v1/models")
            peer_url = args.peer_url.rstrip("/") + args.peer_path
            for round_index in range(args.rounds):
                for items, conc in CASES:
                    row = {"round": round_index + 1, "items": items, "concurrency": conc}
                    order = [("ours", ours_url, ours_model), ("peer", peer_url, peer_model)]
                    for name, url, model in order if round_index % 2 == 0 else order[::-1]:
                        row[name] = asyncio.run(run_case(url, model, pool, items, conc, args.seconds))
                        log(f"round {round_index + 1} x{items} c{conc} {name}: {row[name]}")
                        time.sleep(1.0)
                    rows.append(row)
        finally:
            app.stop()
    peer_raw = parse_rates(args.peer_raw)
    print(table(rows, our_raw, peer_raw))
    errors = sum(sum(r[s]["errors"].values()) for r in rows for s in ("ours", "peer"))
    print(f"\nour raw text tower, queries: {our_raw} items/s; peer raw: {peer_raw or 'not given'}")
    print(f"errors: {errors}")
    if args.json:
        report = {
            "config": str(args.config),
            "seconds": args.seconds,
            "our_raw": our_raw,
            "peer_raw": peer_raw,
        }
        report["median_ours_over_peer"] = {}
        for i, c in CASES:
            ratios = [
                r["ours"]["items_per_s"] / r["peer"]["items_per_s"]
                for r in rows
                if (r["items"], r["concurrency"]) == (i, c) and r["peer"]["items_per_s"]
            ]
            report["median_ours_over_peer"][f"x{i} c{c}"] = (
                round(statistics.median(ratios), 3) if ratios else None
            )
        args.json.write_text(json.dumps({**report, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
