"""What a run reports: per-case results, ratios to raw, the targets, tables, plot and provenance."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT, fmt
from .inputs import KINDS
from .load import TIMING_HEADERS, Case, LoadResult
from .meter import LEADING_ROLES, OTHER_RAY
from .raw import RawResult


@dataclass
class ServedResult:
    path: str
    kind: str
    modality: str
    items: int
    concurrency: int
    skipped: str = ""
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    req_per_s: float = 0.0
    items_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    server_ms: dict[str, float] = field(default_factory=dict)
    mean_batch: float | None = None
    batches: int | None = None
    cpu_cores: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # by role (cpu_ms_per_request)
    check: str = ""
    x_raw_b1: float | None = None
    x_raw_max: float | None = None
    raw_max_batch: int | None = None
    p99_over_raw_b1: float | None = None


def summarize(case: Case, load: LoadResult, cpu: dict[str, float], batches: list[int] | None) -> ServedResult:
    ok = len(load.latencies_s)
    lat_ms = np.array(load.latencies_s) * 1e3 if ok else np.zeros(1)
    p50, p90, p99 = (float(np.percentile(lat_ms, q)) for q in (50, 90, 99))
    return ServedResult(
        path=case.path,
        kind=case.kind,
        modality=KINDS[case.kind].modality,
        items=case.items,
        concurrency=case.concurrency,
        requests=ok,
        errors=load.errors,
        elapsed_s=round(load.elapsed_s, 2),
        req_per_s=ok / load.elapsed_s,
        items_per_s=load.items_ok / load.elapsed_s,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(lat_ms.mean()),
        server_ms=load.server_ms,
        mean_batch=statistics.mean(batches) if batches else None,
        batches=len(batches) if batches is not None else None,
        cpu_cores=cpu,
        check=load.check,
    )


def add_ratios(result: ServedResult, raw: dict[tuple[str, int], RawResult]) -> None:
    """Served figures as ratios to raw: items/s over raw batch 1 and the largest raw batch; p99 over
    the raw single-item call time."""
    if result.skipped:
        return
    single = raw.get((result.kind, 1))
    best = max((r for (k, _), r in raw.items() if k == result.kind), key=lambda r: r.batch, default=None)
    if single:
        result.x_raw_b1 = result.items_per_s / single.items_per_s
        if result.items == 1:  # a multi-item request's latency is not comparable to one item's
            result.p99_over_raw_b1 = result.p99_ms / (1e3 * single.median_s)
    if best:
        result.x_raw_max = result.items_per_s / best.items_per_s
        result.raw_max_batch = best.batch


@dataclass
class Target:
    name: str
    kind: str
    measured: float | None
    target: float
    higher_is_better: bool
    detail: str

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target


def find(results: Sequence[ServedResult], **where: Any) -> ServedResult | None:
    for r in results:
        if not r.skipped and all(getattr(r, k) == v for k, v in where.items()):
            return r
    return None


def request_path_targets(results: Sequence[ServedResult], kind: str, top: int) -> list[Target]:
    """The later performance issue's targets for texts: served/raw at c1 (raw batch 1) and at ``top``
    (raw's best batch), for single items and for full requests, and the CPU of proxy + router."""
    one = find(results, path="http", kind=kind, items=1, concurrency=1)
    many = find(results, path="http", kind=kind, items=1, concurrency=top)
    full = [r for r in results if r.path == "http" and r.kind == kind and r.items > 1 and not r.skipped]
    best = max(full, key=lambda r: r.items_per_s) if full else None

    def leading_cpu(r: ServedResult | None) -> float | None:
        return None if r is None else sum(r.cpu_ms_per_request.get(role, 0.0) for role in LEADING_ROLES)

    return [
        Target("served / raw b1, single items, c1", kind, one and one.x_raw_b1, 0.80, True, "raw batch 1"),
        Target(f"served / raw bmax, 1 item, c{top}", kind, many and many.x_raw_max, 0.75, True, "raw max"),
        Target(
            "served / raw bmax, full requests", kind, best and best.x_raw_max, 0.95, True,
            f"best at c{best.concurrency}" if best else "not run",
        ),
        Target(f"proxy + router CPU ms per request, c{top}", kind, leading_cpu(many), 5.0, False, "1 item"),
    ]  # fmt: skip


def evaluate_targets(results: Sequence[ServedResult], kinds: Sequence[str], top: int) -> list[Target]:
    """The performance issues' targets, on the HTTP path."""
    targets = []
    for kind in kinds:
        modality = KINDS[kind].modality
        single_top = find(results, path="http", kind=kind, items=1, concurrency=top)
        want = 0.5 if modality == "text" else 0.8
        measured = single_top.x_raw_max if single_top else None
        detail = f"raw batch {single_top.raw_max_batch}" if single_top else f"c{top} not run"
        targets.append(Target(f"single-item requests c{top} / raw batch", kind, measured, want, True, detail))
        multi = [r for r in results if r.path == "http" and r.kind == kind and r.items > 1 and not r.skipped]
        if multi:
            best = max(multi, key=lambda r: r.items_per_s)
            targets.append(
                Target(
                    f"{best.items}-item requests / raw batch",
                    kind,
                    best.x_raw_max,
                    0.9,
                    True,
                    f"best at c{best.concurrency}, raw batch {best.raw_max_batch}",
                )
            )
        if modality == "text":
            one = find(results, path="http", kind=kind, items=1, concurrency=1)
            ratio = single_top.items_per_s / one.items_per_s if single_top and one else None
            targets.append(
                Target(f"text c{top} / c1 (dynamic batching)", kind, ratio, 3.0, True, "single-item")
            )
            targets += request_path_targets(results, kind, top)
        one = find(results, path="http", kind=kind, items=1, concurrency=1)
        targets.append(
            Target(
                "p99 at c1 / raw single-item time",
                kind,
                one.p99_over_raw_b1 if one else None,
                1.5,
                False,
                f"p99 {one.p99_ms:.0f} ms over {one.requests} requests" if one else "c1 not run",
            )
        )
    return targets


def raw_table(raw: Sequence[RawResult]) -> str:
    lines = [
        "| input | batch | ms/call (median) | items/s | calls | other processes, cores |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in raw:
        lines.append(
            f"| {r.kind} ({KINDS[r.kind].label}) | {r.batch} | {1e3 * r.median_s:.1f} | "
            f"{r.items_per_s:.2f} | {r.iters} | {r.other_cores:.2f} |"
        )
    return "\n".join(lines)


def served_table(results: Sequence[ServedResult]) -> str:
    lines = [
        "| path | input | items/req | conc | requests | req/s | items/s | p50 ms | p90 ms | p99 ms "
        "| mean batch | CPU cores | x raw b1 | x raw bmax | p99 / raw b1 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        head = f"| {r.path} | {r.kind} | {r.items} | {r.concurrency} |"
        if r.skipped:
            lines.append(f"{head} skipped: {r.skipped} |" + " |" * 10)
            continue
        errors = f" ({sum(r.errors.values())} errors)" if r.errors else ""
        bmax = f"{fmt(r.x_raw_max, '.2f')} (b{r.raw_max_batch})" if r.x_raw_max is not None else ""
        lines.append(
            f"{head} {r.requests}{errors} | {r.req_per_s:.2f} | {r.items_per_s:.2f} | {r.p50_ms:.0f} | "
            f"{r.p90_ms:.0f} | {r.p99_ms:.0f} | {fmt(r.mean_batch, '.1f')} | "
            f"{r.cpu_cores.get('total', 0):.2f} | "
            f"{fmt(r.x_raw_b1, '.2f')} | {bmax} | {fmt(r.p99_over_raw_b1, '.2f')} |"
        )
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    lines = ["| target | input | measured | target | result | detail |", "|---|---|--:|--:|---|---|"]
    for t in targets:
        sign = ">=" if t.higher_is_better else "<="
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t.met]
        measured = fmt(t.measured, ".2f")
        lines.append(f"| {t.name} | {t.kind} | {measured} | {sign} {t.target:g} | {verdict} | {t.detail} |")
    return "\n".join(lines)


def time_split_table(results: Sequence[ServedResult]) -> str:
    """Mean latency split with the app's x-*-time headers: decoding in the router, waiting for a
    batch, the batch's forward, and what is left outside them (proxy, router, transfer, client)."""
    lines = [
        "| case | client mean ms | router total | decode (router) | queue for batch | batch forward "
        "| outside router |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.skipped or not r.server_ms:
            continue
        t = r.server_ms
        outside = r.mean_ms - t.get("total", 0.0)
        cells = [r.mean_ms, *(t.get(key, 0.0) for key in TIMING_HEADERS), outside]
        lines.append(
            f"| {r.path} {r.kind} x{r.items} c{r.concurrency} | "
            + " | ".join(f"{c:.0f}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def _by_role_table(results: Sequence[ServedResult], field: str, roles: list[str], spec: str) -> str:
    """One row per case that has ``field`` figures, one column per role, then the total."""
    lines = ["| case | " + " | ".join(roles) + " | total |", "|---|" + "--:|" * (len(roles) + 1)]
    for r in results:
        values = getattr(r, field)
        if not r.skipped and values:
            cells = [fmt(values.get(role), spec) for role in [*roles, "total"]]
            lines.append(f"| {r.path} {r.kind} x{r.items} c{r.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_role_table(results: Sequence[ServedResult]) -> str:
    """Cores busy per role for each case: where the CPU goes."""
    roles = sorted({k for r in results for k in r.cpu_cores if k != "total"})
    return _by_role_table(results, "cpu_cores", roles, ".2f")


def cpu_per_request_table(results: Sequence[ServedResult]) -> str:
    """CPU ms per answered request in each process role of the serving cluster, for each case:
    what one request costs the proxy, the router, each tower and the rest of Ray."""
    found = {k for r in results for k in r.cpu_ms_per_request if k != "total"}
    first = [role for role in LEADING_ROLES if role in found]
    last = [OTHER_RAY] if OTHER_RAY in found else []
    return _by_role_table(
        results, "cpu_ms_per_request", first + sorted(found - {*first, *last}) + last, ".1f"
    )


def plot(results: Sequence[ServedResult], raw: Sequence[RawResult], path: Path) -> None:
    """Throughput (items/s) and p99 vs concurrency, one column per modality, raw batch rates dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = [m for m in ("text", "image", "audio") if any(r.modality == m for r in results)]
    fig, axes = plt.subplots(2, len(modalities), figsize=(5.2 * len(modalities), 8.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, modality in enumerate(modalities):
        top, bottom = axes[0][col], axes[1][col]
        series = sorted(
            {(r.path, r.kind, r.items) for r in results if r.modality == modality and not r.skipped},
            key=lambda s: (list(KINDS).index(s[1]), s[2], s[0] != "http"),
        )
        kinds = sorted({k for _, k, _ in series}, key=list(KINDS).index)
        for path_name, kind, items in series:
            rows = sorted(
                (
                    r
                    for r in results
                    if (r.path, r.kind, r.items) == (path_name, kind, items) and not r.skipped
                ),
                key=lambda r: r.concurrency,
            )
            color = colors[(2 * kinds.index(kind) + (items > 1)) % len(colors)]
            style = dict(
                color=color,
                marker="o" if path_name == "http" else "s",
                linestyle="-" if path_name == "http" else ":",
            )
            name = f"{kind} x{items} {path_name}"
            top.plot([r.concurrency for r in rows], [r.items_per_s for r in rows], label=name, **style)
            bottom.plot([r.concurrency for r in rows], [r.p99_ms / 1e3 for r in rows], label=name, **style)
        peak = max((r.items_per_s for r in results if r.modality == modality and not r.skipped), default=0)
        for kind in kinds:
            color = colors[(2 * kinds.index(kind)) % len(colors)]
            for r in (r for r in raw if r.kind == kind):  # raw batch 1 dash-dot, larger batches dashed
                style = "-." if r.batch == 1 else "--"
                top.axhline(
                    r.items_per_s, color=color, linestyle=style, linewidth=1, label=f"{kind} raw b{r.batch}"
                )
                peak = max(peak, r.items_per_s)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r.concurrency for r in results}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("concurrency (requests in flight)")
        top.set_title(f"{modality}: throughput")
        top.set_ylabel("items/s")
        top.set_ylim(0, 1.15 * peak)
        top.legend(fontsize=7)
        bottom.set_title(f"{modality}: p99 latency")
        bottom.set_ylabel("p99 latency (s, log)")
        bottom.set_yscale("log")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    import ray
    import torch

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def git_state() -> dict[str, Any]:
    """The commit benchmarked, and whether the serving code differs from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "audioclip", "deployments", "configs").split("\n")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "serving_code_modified": [d for d in dirty if d],
    }
