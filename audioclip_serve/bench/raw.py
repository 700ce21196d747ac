"""Raw throughput: each tower alone in this process, running exactly the served code."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import APP, log
from .inputs import KINDS, batch_of
from .meter import cores_elsewhere, cpu_by_pid


@dataclass
class RawResult:
    kind: str
    modality: str
    batch: int
    median_s: float
    iters: int
    items_per_s: float
    other_cores: float = 0.0  # CPU used by other processes meanwhile: should be ~0
    runtime: str = "eager PyTorch"  # what ran the hot part (the label /v1/models gives a replica's)


def raw_call(model: Any, modality: str, payload: list, settings: Any) -> Callable[[], Any]:
    """The in-process equivalent of serving ``payload``, through the same functions the app runs:
    the modality's pipeline (``settings.pipelines()``) decodes each item under the app's limits, as
    the router does, then collates and runs the forwards, as the tower does, ending with the
    embeddings on the CPU (as the tower answers; on a GPU this waits for it)."""
    pipeline = settings.pipelines()[modality]
    limits = settings.limits.items

    def call() -> Any:
        prepared = [pipeline.decode(item, limits) for item in payload]
        return pipeline.embed(model, prepared)

    return call


def app_settings(config: Path | None) -> Any:
    """The ``audioclip`` application's ``AppArgs`` in a serve config (the defaults without one)."""
    from deployments.settings import AppArgs

    if config is None:
        return AppArgs()
    import yaml

    apps = yaml.safe_load(config.read_text()).get("applications", [])
    args = next((a.get("args") or {} for a in apps if a.get("name") == APP), None)
    if args is None:
        raise SystemExit(f"{config} has no application named {APP!r}")
    return AppArgs.model_validate(args)


def time_call(fn: Callable[[], Any], seconds: float, min_iters: int = 2, max_iters: int = 100) -> list[float]:
    """Call times after one untimed warm-up call: at least ``min_iters`` and ``seconds`` of calls."""
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - started < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def raw_batches(single_s: float, max_call_s: float) -> list[int]:
    """Batch 1, then the largest of 32 and 8 whose estimated call time fits ``max_call_s``."""
    for batch in (32, 8):
        if batch * single_s <= max_call_s:
            return [1, batch]
    return [1]


def run_raw(
    inputs: dict[str, list],
    seconds: float,
    max_call_s: float,
    settings: Any,
    threads: int | None = None,
    channels_last: Sequence[str] | None = None,
) -> list[RawResult]:
    """Raw throughput of each kind's tower, one tower built at a time by the replicas' own builder
    (``audioclip.factory.build_tower`` with the tower's ``TowerSettings.build``) from the config's
    ``settings``: same device, dtype, layout and threads. ``threads`` / ``channels_last``:
    overrides for the raw towers."""
    import dataclasses

    import torch

    import audioclip
    from audioclip.backends import runtime_label
    from audioclip.factory import build_tower

    state = audioclip.synthetic_state_dict("demo")
    results = []
    for modality in ("text", "image", "audio"):
        names = [n for n in inputs if KINDS[n].modality == modality]
        if not names:
            continue
        tower = settings.tower(modality)
        build = tower.build(settings.audio_norm)
        if channels_last is not None and modality != "text":
            build = dataclasses.replace(build, channels_last=modality in channels_last)
        torch.set_num_threads(threads or tower.torch_threads)
        model = build_tower(state, modality, build)
        runtime = runtime_label(model, modality)
        log(
            f"raw | {modality} on {model.device}, {build.dtype or 'fp32'}, "
            f"{torch.get_num_threads()} threads, channels_last {model.channels_last}, "
            f"BatchNorm folded {model.batchnorm_folded}, runtime {runtime}"
        )
        for name in names:
            batches, single_s = [1], None
            while batches:
                batch = batches.pop(0)
                log(f"raw | {name} | batch {batch}")
                before, t0 = cpu_by_pid(), time.perf_counter()
                call = raw_call(model, modality, batch_of(inputs[name], 0, batch), settings)
                times = time_call(call, seconds)
                other = cores_elsewhere(before, cpu_by_pid(), time.perf_counter() - t0)
                median = statistics.median(times)
                results.append(
                    RawResult(name, modality, batch, median, len(times), batch / median, other, runtime)
                )
                log(
                    f"    {1e3 * median:.1f} ms/call x{len(times)}, {batch / median:.2f} items/s"
                    + (f" (WARNING: other processes used {other:.2f} cores)" if other > 0.15 else "")
                )
                if single_s is None:
                    single_s = median
                    batches = raw_batches(single_s, max_call_s)[1:]
        del model
        gc.collect()
    return results
