"""Serving throughput of the AudioCLIP Serve app, measured against the raw in-process towers in one run.

The command line of ``scripts/bench.py`` (its docstring is the user documentation).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .cases import plan_cases, run_cases
from .common import ROOT, log
from .inputs import KINDS, describe_inputs, make_inputs
from .raw import app_settings, run_raw
from .report import (
    cpu_per_request_table,
    cpu_role_table,
    evaluate_targets,
    git_state,
    machine,
    plot,
    raw_table,
    served_table,
    targets_table,
    time_split_table,
)
from .serveapp import ServeApp, wait_ready


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown input kinds {unknown}; known: {', '.join(KINDS)}")
    return names


def env_pairs(text: str) -> dict[str, str]:
    """``KEY=VALUE,...`` as a dict (a value holds no comma)."""
    pairs = [x.strip() for x in text.split(",") if x.strip()]
    bad = [pair for pair in pairs if "=" not in pair or not pair.split("=", 1)[0]]
    if bad:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {bad}")
    return dict(pair.split("=", 1) for pair in pairs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running app at this URL instead of starting one")
    p.add_argument(
        "--ray-address", help="with --url: the Ray cluster for stats and the handle API (e.g. auto)"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "demo.yaml",
        help="serve config to run; with --url, the one the app runs (the raw towers take its settings)",
    )
    p.add_argument("--kinds", type=str_list, default=list(KINDS), help="inputs: " + ",".join(KINDS))
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="requests in flight (1,8,32)")
    p.add_argument("--items", type=int_list, default=[1, 32], help="items per request (1,32)")
    p.add_argument("--grpc-kinds", type=str_list, default=["queries", "photo"], help="gRPC ingress cases")
    p.add_argument("--grpc-target", help="with --url: the app's gRPC ingress (host:port)")
    p.add_argument("--handle-kinds", type=str_list, default=["queries", "photo"], help="handle API cases")
    p.add_argument("--seconds", type=float, default=8.0, help="issue requests for this long per case (8)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per case at most (2000)")
    p.add_argument(
        "--max-case-seconds",
        type=float,
        default=40.0,
        help="skip a case whose first wave takes longer at the best raw rate (40)",
    )
    p.add_argument("--raw-seconds", type=float, default=4.0, help="timed calls per raw case at least (4 s)")
    p.add_argument("--raw-max-call", type=float, default=12.0, help="largest raw call estimate (12 s)")
    p.add_argument("--threads", type=int, help="torch threads for the raw towers (default: the config's)")
    p.add_argument(
        "--raw-channels-last",
        type=lambda text: [t for t in text.split(",") if t],
        default=None,
        help="towers the raw run switches to NHWC (default: as the config's towers run; '' for none)",
    )
    p.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="HTTP load processes sharing each case's concurrency (1; more where one client saturates)",
    )
    p.add_argument(
        "--serve-env",
        type=env_pairs,
        default={},
        help="KEY=VALUE,... set for serve run and its cluster only (a lever on/off), not for this driver",
    )
    p.add_argument(
        "--full-head",
        action="store_true",
        help="serve on a default Ray head (dashboard, log monitor, autoscaler monitor): the lever off",
    )
    p.add_argument("--no-raw", action="store_true", help="skip raw timing (no ratios, no skip estimates)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    quick = "smoke run (~4 min): queries, photo, clip5; c1,32; single items; 5 s cases"
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--plot", type=Path, help="write the throughput / p99 plot here (PNG)")
    args = p.parse_args(argv)
    if args.quick:
        args.kinds = [k for k in args.kinds if k in ("queries", "photo", "clip5")]
        args.concurrency, args.items, args.seconds, args.raw_seconds = [1, 32], [1], 5.0, 2.0
        args.handle_kinds = args.grpc_kinds = ["queries"]
    return args


def served_runtimes(url: str) -> dict[str, str]:
    """What runs each served tower's hot part (``/v1/models``), so a report says what it measured:
    e.g. a bf16 graph, or the fp32 one on a CPU without bf16. Empty where the app refuses to say
    (an API key)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as answer:
            towers = json.load(answer)["towers"]
    except (OSError, ValueError, KeyError):
        return {}
    return {name: str(tower.get("runtime", tower.get("state", "?"))) for name, tower in towers.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for serve run, its cluster and our drivers
    started = time.time()
    code = git_state()  # at the start: others may edit the tree while this runs
    workdir = Path(tempfile.mkdtemp(prefix="audioclip-bench-"))
    try:
        inputs = make_inputs(args.kinds)
        inputs_path = workdir / "inputs.pkl"
        inputs_path.write_bytes(pickle.dumps(inputs))
        # With --url too: raw must run the served settings (backend, threads), or each ratio compares
        # the served runtime with eager PyTorch.
        settings = app_settings(args.config)
        raw_list = (
            []
            if args.no_raw
            else run_raw(
                inputs, args.raw_seconds, args.raw_max_call, settings, args.threads, args.raw_channels_last
            )
        )
        raw = {(r.kind, r.batch): r for r in raw_list}
        cases = plan_cases(args, args.kinds)
        app: ServeApp | None = None
        if args.url:
            url, ray_address, ready_s = args.url.rstrip("/"), args.ray_address, 0.0
            grpc_target = args.grpc_target
            wait_ready(url, args.ready_timeout)
        else:
            app = ServeApp(
                args.config, workdir, args.ready_timeout, args.serve_env, lean_head=not args.full_head
            )
            app.start()
            url, ray_address, ready_s = app.url, app.gcs_address(), app.ready_s
            grpc_target = app.grpc_target
        try:
            code_served = git_state()  # the replicas imported the serving code in between
            runtimes = served_runtimes(url)
            root_pids = app.root_pids() if app is not None else None
            served = run_cases(
                cases, args, inputs_path, inputs, url, ray_address, grpc_target, raw, root_pids, settings
            )
        finally:
            if app is not None:
                app.stop()
        top = max(args.concurrency)
        targets = evaluate_targets(served, args.kinds, top)
        report = {
            "machine": machine(),
            "git": {"at_start": code, "at_app_ready": code_served},
            "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "config": str(args.config),
            "url": args.url,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "inputs": describe_inputs(inputs),
            "app_ready_s": round(ready_s, 1),
            "raw": [asdict(r) for r in raw_list],
            "served_runtimes": runtimes,
            "served": [asdict(r) for r in served],
            "targets": [{**asdict(t), "met": t.met} for t in targets],
            "duration_s": round(time.time() - started, 1),
        }
        print("## Raw (in-process towers, decoding included)\n\n" + raw_table(raw_list))
        print(
            "\nServed towers' runtimes: " + (", ".join(f"{k}: {v}" for k, v in runtimes.items()) or "unknown")
        )
        print("\n## Served\n\n" + served_table(served))
        print("\n## Where the time goes (HTTP, mean ms per request)\n\n" + time_split_table(served))
        print("\n## CPU cores busy by role\n\n" + cpu_role_table(served))
        print("\n## CPU ms per request by process\n\n" + cpu_per_request_table(served))
        print("\n## Targets (HTTP path)\n\n" + targets_table(targets))
        print(f"\ntotal time {report['duration_s'] / 60:.1f} min")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
            log(f"wrote {args.json}")
        if args.plot:
            plot(served, raw_list, args.plot)
            log(f"wrote {args.plot}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
