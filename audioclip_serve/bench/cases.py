"""The served cases: which to run, which to skip, and running each on an idle server."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import fmt, log
from .inputs import KINDS
from .load import Case, LoadPool, label
from .meter import CpuMeter, TowerStats, cpu_ms_per_request
from .raw import RawResult
from .report import ServedResult, add_ratios, summarize


def plan_cases(args: argparse.Namespace, kinds: Sequence[str]) -> list[Case]:
    """HTTP: every kind x items x concurrency; gRPC: ``--grpc-kinds`` x items at the extreme
    concurrencies; handle: single-item ``--handle-kinds`` at the extreme concurrencies."""
    cases = [
        Case("http", kind, items, conc) for kind in kinds for items in args.items for conc in args.concurrency
    ]
    extremes = sorted({min(args.concurrency), max(args.concurrency)})
    cases += [
        Case("grpc", kind, items, conc)
        for kind in args.grpc_kinds
        if kind in kinds
        for items in args.items
        for conc in extremes
    ]
    cases += [
        Case("handle", kind, 1, conc) for kind in args.handle_kinds if kind in kinds for conc in extremes
    ]
    return cases


def skip_reason(
    case: Case, raw: dict[tuple[str, int], RawResult], pool: list, max_case_s: float, max_body: int
) -> str:
    """Why a case is not run: a body over the app's limit, or a first wave too long at the best raw rate."""
    if KINDS[case.kind].modality != "text" and case.items > 1:
        body = case.items * statistics.mean(len(b) for b in pool) * 4 / 3
        if body > max_body:
            return f"body ~{body / 2**20:.0f} MiB over the {max_body / 2**20:.0f} MiB limit"
    best = max((r for (k, _), r in raw.items() if k == case.kind), key=lambda r: r.items_per_s, default=None)
    if best is not None:  # the server is unlikely to beat the best raw rate: a lower bound of the time
        wave_s = case.concurrency * case.items / best.items_per_s
        if wave_s > max_case_s:
            return f"first wave ~{wave_s:.0f} s at the raw rate (> {max_case_s:.0f} s)"
    return ""


def run_cases(
    cases: Sequence[Case],
    args: argparse.Namespace,
    inputs_path: Path,
    inputs: dict[str, list],
    url: str,
    ray_address: str | None,
    grpc_target: str | None,
    raw: dict[tuple[str, int], RawResult],
    root_pids: list[int] | None,
    settings: Any,
) -> list[ServedResult]:
    """Every case in order, each on an idle server; skipped cases are reported with their reason."""
    replicas = {t: settings.tower(t).max_replicas for t in settings.towers}  # one replica: batch figures
    meter, stats = CpuMeter(root_pids), TowerStats(ray_address, replicas)
    workers: dict[str, LoadPool] = {}
    warmed: set[tuple[str, str]] = set()
    results = []
    try:
        for n, case in enumerate(cases, 1):
            reason = skip_reason(
                case, raw, inputs[case.kind], args.max_case_seconds, settings.limits.max_body_bytes
            )
            if case.path == "handle" and ray_address is None:
                reason = "no Ray address for the handle API"
            if case.path == "grpc" and grpc_target is None:
                reason = "no gRPC ingress (the config has no grpc_options)"
            if reason:
                log(f"[{n}/{len(cases)}] {label(case)}: skipped ({reason})")
                results.append(
                    ServedResult(
                        case.path,
                        case.kind,
                        KINDS[case.kind].modality,
                        case.items,
                        case.concurrency,
                        skipped=reason,
                    )
                )
                continue
            if case.path not in workers:
                target = {"http": url, "grpc": grpc_target}.get(case.path, ray_address)
                workers[case.path] = LoadPool(
                    case.path, inputs_path, str(target), args.load_processes if case.path != "handle" else 1
                )
                meter.client_pids.update(workers[case.path].pids)
            log(f"[{n}/{len(cases)}] {label(case)}")
            group = (case.path, case.kind)
            if group not in warmed:  # one untimed single-item request per path and input, outside the window
                warm = workers[case.path].run(Case(case.path, case.kind, 1, 1), args.seconds, 1, warmup=True)
                first = warm.latencies_s[0] if warm.latencies_s else None
                log(f"    warm-up: {fmt(first, '.2f')} s {warm.errors or ''}")
                warmed.add(group)
            modality = KINDS[case.kind].modality
            stats_before = stats.snapshot(modality)
            cpu_before, t0 = meter.snapshot(), time.perf_counter()
            load = workers[case.path].run(case, args.seconds, args.max_requests)
            cpu_after, wall = meter.snapshot(), time.perf_counter() - t0
            batches = stats.batches_between(stats_before, stats.snapshot(modality))
            result = summarize(case, load, meter.usage(cpu_before, cpu_after, wall), batches)
            add_ratios(result, raw)
            result.cpu_ms_per_request = cpu_ms_per_request(result.cpu_cores, wall, result.requests)
            if result.cpu_cores.get("other", 0.0) > 0.15:
                log(f"    WARNING: other processes used {result.cpu_cores['other']:.2f} cores in this case")
            log(
                f"    {result.requests} requests in {result.elapsed_s:.1f} s: "
                f"{result.items_per_s:.2f} items/s, "
                f"p99 {result.p99_ms:.0f} ms, mean batch {fmt(result.mean_batch, '.1f')}, "
                f"CPU {result.cpu_cores.get('total', 0):.2f} cores"
                + (f", errors {result.errors}" if result.errors else "")
            )
            results.append(result)
    finally:
        for worker in workers.values():
            worker.close()
        stats.close()
    return results
