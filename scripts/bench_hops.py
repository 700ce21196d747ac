"""What a single query's time is made of at concurrency 1, against Serve's own floor on this machine.

Two apps served alike (a ``LocalHead`` with the serving environment, HAProxy ingress), alternating for
``--rounds`` rounds so a noisy VM's drift hits both:

- the floor app (``audioclip_serve/bench/floor_app.py``): the app's shape with no work in it, a
  FastAPI ingress answering at once (``/direct``: one hop) or calling a batched callee that echoes
  from its executor (``/hop``: both hops);
- the demo config: ``GET /healthz``, ``{"texts": []}`` (our route without a tower call) and one short
  query, with the router's ``x-inference-time`` (the forward inside the tower).

One client, keep-alive, ``--requests`` per case; p50 and mean latency, and the CPU milliseconds per
request in each process of the app. The raw text tower at batch 1 (the demo's settings, tokenizing
included) is timed alone at the start of each round; the floor's callee is then kept busy for that
long (``/hop?spin_ms=``), and the report gives the served/raw at c1 that the floor reaches: the raw
forward over the floor's mean latency around it. The JSON is rewritten after every round.

    python scripts/bench_hops.py --json docs/bench_hops/run.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audioclip_serve.bench.common import ROOT, log
from audioclip_serve.bench.hops import Call, halt_poll_ns, serve_and_measure, summary, write_floor_config
from audioclip_serve.bench.inputs import make_inputs
from audioclip_serve.bench.raw import app_settings, run_raw


def one_row(payload: bytes) -> bool:
    """An answer of one 1024-d vector."""
    rows = json.loads(payload).get("embeddings", [])
    return len(rows) == 1 and len(rows[0]) == 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--raw-seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    pool = make_inputs(["queries"])["queries"]
    settings = app_settings(args.config)
    query = json.dumps({"texts": [pool[0]]}).encode()
    echoed = query.__eq__
    demo_calls = {
        "healthz": Call("GET", "/healthz", None, lambda body: json.loads(body)["status"] == "ok"),
        "empty": Call(
            "POST", "/v1/embed/text", b'{"texts": []}', lambda b: json.loads(b)["embeddings"] == []
        ),
        "query": Call("POST", "/v1/embed/text", query, one_row),
    }
    report = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "requests_per_case": args.requests,
        "guest_halt_poll_ns": halt_poll_ns(),
        "rounds": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_hops_") as tmp:
        floor_config = write_floor_config(Path(tmp))
        for index in range(1, args.rounds + 1):
            [raw] = [
                r for r in run_raw({"queries": pool[:1]}, args.raw_seconds, 0.0, settings) if r.batch == 1
            ]
            raw_ms = raw.median_s * 1e3
            log(f"round {index}: raw text tower, batch 1: {raw_ms:.2f} ms; the floor app")
            floor_calls = {
                "direct": Call("POST", "/direct", query, echoed),
                "hop": Call("POST", "/hop", query, echoed),
                # the callee's executor busy for the raw forward's time, as the tower's is
                "hop_forward": Call("POST", f"/hop?spin_ms={raw_ms:.2f}", query, echoed),
            }
            floor = serve_and_measure(floor_config, floor_calls, args.requests, Path(tmp))
            log(f"round {index}: {args.config.name}")
            demo = serve_and_measure(args.config, demo_calls, args.requests, Path(tmp))
            result = {"raw_text_batch1_ms": round(raw_ms, 2), "floor": floor, "demo": demo}
            result["summary"] = summary(floor, demo, raw_ms)
            report["rounds"].append(result)
            log(f"round {index}: {result['summary']}")
            if args.json:
                args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
