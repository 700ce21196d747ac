"""Time each in-process model optimisation against the naive way, on the same inputs, in one run.

Cases, on the synthetic-v1 "demo" weights (timings do not depend on the weight values):

* text: ``encode_text`` (batch padded to its longest text) vs the reference's fixed 77 positions,
  for short queries and long sentences; ``encode_tokens(tokenize(...))`` is shown too.
* audio: the cached FBSP filter bank vs rebuilding it on every call, channels_last, and BatchNorm
  folded into the convs (the served default: all three).
* image: ``inference_mode`` and channels_last vs ``no_grad`` + NCHW, folded BatchNorm, and bf16 with
  both layouts.
* threads: the image batch-8 case at 1 thread and at more, to show ``--threads`` is honoured.

Variants of a case run round-robin (order alternating each round) after a warm-up call, so
background load hits them alike; each runs at least ``--min-iters`` times and until its calls add
up to ``--budget`` seconds. Medians of wall time and of this process's CPU time are reported, with
the 1-minute load average: on a shared machine, a load well above the thread count (which this
script adds itself) means the figures are contaminated. Progress goes to stderr, the markdown
table to stdout.

    python scripts/bench_model.py [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from audioclip.backends import BACKENDS, BF16_TOWERS, FP32_TOWERS, INT8_TOWERS, cpu_has_bf16, hot_part
from audioclip.batching import pad_token_ids
from audioclip.factory import TowerBuild, build_tower, digest_arrays
from audioclip.model import AudioCLIP
from audioclip.pipeline import pipelines
from audioclip.synthetic import synthetic_state_dict
from audioclip.tokenizer import tokenize

SAMPLE_RATE = 44100
CLIP_SECONDS = 5.0

_SOURCES = (
    "a dog barking",
    "church bells ringing",
    "heavy rain on a tin roof",
    "a diesel engine idling",
    "children laughing",
    "a crackling campfire",
    "footsteps on gravel",
    "an old telephone ringing",
    "waves breaking on rocks",
    "a cat purring",
    "a helicopter passing overhead",
    "glass shattering",
    "a violin playing a slow melody",
    "wind through pine trees",
    "a crowd cheering",
    "a kettle whistling",
)
_PLACES = (
    "in the distance",
    "at night",
    "in a busy street",
    "inside a small kitchen",
    "near the sea",
    "in an empty hall",
    "during a storm",
    "in the early morning",
)
_DETAILS = (
    "recorded with a cheap phone microphone",
    "with a lot of echo from the surrounding walls",
    "partly drowned out by traffic noise",
    "close to the microphone and slightly distorted",
    "fading in and out as the wind changes direction",
    "with birds singing softly in the background",
)
_BACKGROUNDS = (
    "someone is talking quietly on the phone",
    "a radio plays old pop songs in another room",
    "cars keep passing by on the wet road outside",
    "a clock ticks loudly on the wall nearby",
)

Fn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Budget:
    warmup: int
    min_iters: int
    max_iters: int
    seconds: float


@dataclass
class Row:
    tower: str
    case: str
    batch: int | None
    threads: int
    variant: str
    median_ms: float
    cpu_ms: float
    iters: int
    load1: float
    items_per_s: float | None = None
    speedup: float | None = None
    cpu_speedup: float | None = None
    max_rel_dev: float | None = None
    min_cos: float | None = None
    gflop_per_call: float | None = None
    gflop_per_s: float | None = None
    share_of_matmul: float | None = None
    first_call_s: float | None = None


# ---------------------------------------------------------------------------------------------- inputs
def queries(n: int) -> list[str]:
    """Short search queries, 6-12 tokens with SOT/EOT."""
    pairs = itertools.islice(itertools.product(_SOURCES, _PLACES), 0, None, 3)
    return [f"{source} {place}" for source, place in itertools.islice(pairs, n)]


def sentences(n: int) -> list[str]:
    """Caption-like sentences, 38-50 tokens with SOT/EOT."""
    rng = random.Random(0)
    return [
        f"A long field recording of {rng.choice(_SOURCES)} {rng.choice(_PLACES)}, {rng.choice(_DETAILS)}, "
        f"while {rng.choice(_BACKGROUNDS)} and {rng.choice(_SOURCES)} can be heard {rng.choice(_PLACES)}."
        for _ in range(n)
    ]


def clips(batch: int, seed: int = 0) -> torch.Tensor:
    """``[B, 1, 5 s]`` int16-range float audio: noise plus a different tone per clip."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SAMPLE_RATE * CLIP_SECONDS)) / SAMPLE_RATE
    freqs = 220.0 * 2.0 ** (torch.arange(batch, dtype=torch.float32) / 4).view(-1, 1)
    wave = 3000.0 * torch.randn(batch, t.numel(), generator=gen) + 8000.0 * torch.sin(2 * math.pi * freqs * t)
    return wave.clamp(-32768.0, 32767.0).unsqueeze(1)


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    """``[B, 3, 224, 224]`` standard-normal pixels, the range of CLIP-normalised images."""
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- timing
def agreement(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max over rows of ||out - ref|| / ||ref||, min over rows of the cosine) of two embedding batches."""
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    return float(rel), float(F.cosine_similarity(out, ref, dim=-1).min())


@dataclass
class Samples:
    """One variant's timed calls: wall seconds, this process's CPU seconds, and its first output."""

    wall: list[float]
    cpu: list[float]
    output: object = None
    first_call_s: float = 0.0  # the untimed warm-up: where a lazy runtime (torch.compile) builds


def time_variants(variants: Sequence[tuple[str, Fn]], budget: Budget) -> dict[str, Samples]:
    """Time the variants round-robin (alternating order) so drifting load hits them alike.

    A variant drops out of the rounds once it has ``min_iters`` calls and ``seconds`` of them.
    """
    samples = {name: Samples([], []) for name, _ in variants}
    for name, fn in variants:
        started = time.perf_counter()
        samples[name].output = fn()
        samples[name].first_call_s = time.perf_counter() - started
        for _ in range(budget.warmup - 1):
            fn()

    def due(name: str) -> bool:
        wall = samples[name].wall
        return len(wall) < budget.max_iters and (len(wall) < budget.min_iters or sum(wall) < budget.seconds)

    for rounds in itertools.count():
        pending = [(name, fn) for name, fn in variants if due(name)]
        if not pending:
            break
        for name, fn in pending if rounds % 2 == 0 else pending[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            samples[name].wall.append(time.perf_counter() - wall)
            samples[name].cpu.append(time.process_time() - cpu)
    return samples


def bench_case(
    tower: str, case: str, batch: int | None, variants: Sequence[tuple[str, Fn]], budget: Budget
) -> list[Row]:
    """Rows for each variant, with speed-up and agreement against the first (baseline) variant."""
    log(f"{tower} | {case} | batch {batch} | {', '.join(name for name, _ in variants)}")
    results = time_variants(variants, budget)
    load1 = os.getloadavg()[0]
    rows = [
        Row(
            tower,
            case,
            batch,
            torch.get_num_threads(),
            name,
            median_ms=1e3 * statistics.median(s.wall),
            cpu_ms=1e3 * statistics.median(s.cpu),
            iters=len(s.wall),
            load1=load1,
            first_call_s=s.first_call_s,
        )
        for name, s in results.items()
    ]
    base, base_out = rows[0], results[rows[0].variant].output
    for row in rows:
        out = results[row.variant].output
        if batch:
            row.items_per_s = 1e3 * batch / row.median_ms
            row.speedup, row.cpu_speedup = base.median_ms / row.median_ms, base.cpu_ms / row.cpu_ms
        if row is not base and isinstance(out, torch.Tensor) and isinstance(base_out, torch.Tensor):
            row.max_rel_dev, row.min_cos = agreement(out, base_out)
        log(
            f"    {row.variant}: {row.median_ms:.1f} ms (cpu {row.cpu_ms:.1f}) x{row.iters}, load {load1:.1f}"
        )
    return rows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- text
def encode_tokens_full_context(model: AudioCLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's way: all 77 positions through the transformer, whatever the texts' lengths."""
    tower = model.text
    with torch.inference_mode():
        x = tower.token_embedding(tokens).to(tower.dtype) + tower.positional_embedding.to(tower.dtype)
        x = tower.ln_final(tower.transformer(x))
        x = x[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)]
        return (x @ tower.text_projection.to(x.dtype)).float()


def bench_text(model: AudioCLIP, batches: Sequence[int], budget: Budget) -> list[Row]:
    pipeline = pipelines()["text"]  # decode (tokenizing) and the text tower's collate + forward
    rows = []
    for kind, make in (("queries", queries), ("sentences", sentences)):
        for batch in batches:
            texts = make(batch)
            lengths = [len(item.ids) for item in pipeline.prepare_all(texts)]
            case = f"{kind}, {min(lengths)}-{max(lengths)} tokens"
            variants = [
                (
                    "fixed 77 positions (naive)",
                    lambda t=texts: encode_tokens_full_context(model, tokenize(t)),
                ),
                ("encode_tokens(tokenize(...))", lambda t=texts: model.encode_tokens(tokenize(t))),
                ("encode_text (pad to longest)", lambda t=texts: model.encode_text(t)),
            ]
            rows += bench_case("text", case, batch, variants, budget)
    for batch in batches:  # a mixed batch, as a busy server forms it: 3/4 queries, 1/4 sentences
        if batch < 4:
            continue
        texts = queries(batch - batch // 4) + sentences(batch // 4)
        items = pipeline.prepare_all(texts)  # as the router decodes them
        ids = [item.ids for item in items]
        variants = [
            ("one forward, padded to the longest", lambda i=ids: model.encode_tokens(pad_token_ids(i))),
            (
                "split by length (the text tower's way)",
                lambda p=items: torch.from_numpy(pipeline.embed(model, p)),
            ),
        ]
        rows += bench_case("text", "mixed: 3/4 queries, 1/4 sentences", batch, variants, budget)
    return rows


# ---------------------------------------------------------------------------------------------- audio
def encode_audio_rebuilding_fbsp(model: AudioCLIP, wave: torch.Tensor) -> torch.Tensor:
    """The reference's way: the FBSP filter bank is rebuilt inside every forward call."""
    fbsp = model.audio.fbsp
    fbsp.cached_weights = fbsp.complex_weights  # the instance attribute shadows the caching method
    try:
        return model.encode_audio(wave)
    finally:
        del fbsp.cached_weights


def bench_audio(
    model: AudioCLIP, model_cl: AudioCLIP, model_fold: AudioCLIP, batches: Sequence[int], budget: Budget
) -> list[Row]:
    fbsp = model.audio.fbsp
    rows = bench_case(
        "audio",
        "FBSP filter bank alone",
        None,
        [("complex_weights() build", fbsp.complex_weights), ("cached_weights() lookup", fbsp.cached_weights)],
        budget,
    )
    for batch in batches:
        wave = clips(batch)
        variants = [
            ("filter bank rebuilt per call (naive)", lambda w=wave: encode_audio_rebuilding_fbsp(model, w)),
            ("cached filter bank", lambda w=wave: model.encode_audio(w)),
            ("cached + channels_last", lambda w=wave: model_cl.encode_audio(w)),
            ("cached + channels_last + folded BN", lambda w=wave: model_fold.encode_audio(w)),
        ]
        rows += bench_case("audio", f"{CLIP_SECONDS:g} s mono clips", batch, variants, budget)
    return rows


# ---------------------------------------------------------------------------------------------- image
def no_grad_visual(model: AudioCLIP, x: torch.Tensor) -> torch.Tensor:
    """The naive way: autograd's no_grad (not inference_mode), NCHW weights and input."""
    with torch.no_grad():
        return model.visual(x).float()


def bench_image(
    models: dict[str, AudioCLIP], batches: Sequence[int], bf16_batches: Sequence[int], budget: Budget
) -> list[Row]:
    rows = []
    for batch in batches:
        x = pixels(batch)
        variants: list[tuple[str, Fn]] = [
            ("no_grad + NCHW (naive)", lambda x=x: no_grad_visual(models["fp32"], x)),
            ("inference_mode + NCHW", lambda x=x: models["fp32"].encode_image(x)),
            ("inference_mode + channels_last", lambda x=x: models["fp32_cl"].encode_image(x)),
            ("channels_last + folded BN", lambda x=x: models["fp32_fold"].encode_image(x)),
        ]
        if batch in bf16_batches:
            variants += [
                ("bf16 + NCHW", lambda x=x: models["bf16"].encode_image(x)),
                ("bf16 + channels_last", lambda x=x: models["bf16_cl"].encode_image(x)),
            ]
        rows += bench_case("image", "224 px, random normalised", batch, variants, budget)
    return rows


def encode_image_at(model: AudioCLIP, x: torch.Tensor, threads: int) -> torch.Tensor:
    """``encode_image`` after ``torch.set_num_threads(threads)``, checking torch took the setting."""
    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"asked torch for {threads} threads, it runs {torch.get_num_threads()}")
    return model.encode_image(x)


def bench_threads(model: AudioCLIP, counts: Sequence[int], budget: Budget) -> list[Row]:
    """The image batch-8 case (library default path) at each thread count, round-robin; baseline: first."""
    x = pixels(8)
    before = torch.get_num_threads()
    variants = [(f"{n} thread(s)", functools.partial(encode_image_at, model, x, n)) for n in counts]
    try:
        rows = bench_case("threads", "image 224 px, inference_mode + NCHW", 8, variants, budget)
    finally:
        torch.set_num_threads(before)
    for row, n in zip(rows, counts, strict=True):
        row.threads = n
    return rows


def bf16_accuracy(fp32: AudioCLIP, bf16: AudioCLIP, batch: int) -> dict[str, float]:
    """bf16 vs fp32 image embeddings on ``batch`` fresh images (untimed)."""
    log(f"bf16 accuracy check on {batch} images")
    x = pixels(batch, seed=1)
    rel, cos = agreement(bf16.encode_image(x), fp32.encode_image(x))
    return {"images": batch, "max_rel_dev": rel, "min_cos": cos}


def channels_last_copy(model: AudioCLIP, tower: str) -> dict[str, float]:
    """Switch ``model`` to channels_last; MiB of its tower's conv weights that got copied, of the total."""
    module = getattr(model, tower)
    convs = {name: p for name, p in module.named_parameters() if p.ndim == 4}
    before = {name: p.data_ptr() for name, p in convs.items()}
    model.use_channels_last(True)
    after = {name: p for name, p in module.named_parameters() if p.ndim == 4}
    copied = sum(p.nbytes for name, p in after.items() if p.data_ptr() != before[name])
    return {"copied_mib": copied / 2**20, "conv_mib": sum(p.nbytes for p in convs.values()) / 2**20}


# ---------------------------------------------------------------------------------------------- limits
def _best_rate(matmul: Callable[[], object], n: int, calls: int) -> float:
    matmul()
    walls = []
    for _ in range(calls):
        start = time.perf_counter()
        matmul()
        walls.append(time.perf_counter() - start)
    return 2 * n**3 / min(walls) / 1e9


def matmul_rates(threads: int, n: int = 2048, calls: int = 10) -> dict[str, float]:
    """GFLOP/s of an ``n x n`` fp32 matmul on ``threads`` threads through each GEMM library at hand:
    torch (MKL), numpy (OpenBLAS) and ONNX Runtime (MLAS). They differ by up to 2x on one CPU (MKL
    takes a slower path on AMD CPUs), so the best of them is the machine's limit for the towers."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    return {
        "torch (MKL)": _best_rate(lambda: torch.mm(a, b), n, calls),
        "numpy (OpenBLAS)": _best_rate(lambda: an @ bn, n, calls),
        "onnxruntime (MLAS)": _best_rate(lambda: session.run(None, {"a": an, "b": bn}), n, calls),
    }


def bf16_matmul_rate(n: int = 2048, calls: int = 10) -> float | None:
    """GFLOP/s of an ``n x n`` bf16 matmul through torch (oneDNN on AMX or AVX512-BF16): the limit for
    the bf16 rows; None on a CPU without them (no bf16 rows there)."""
    if not cpu_has_bf16():
        return None
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    return _best_rate(lambda: torch.mm(a, b), n, calls)


def flops_of(fn: Fn) -> float:
    """FLOPs of one eager call (torch's FlopCounterMode: matmuls, convs, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def compiled_eager(state: dict, tower: str, build: TowerBuild) -> AudioCLIP:
    """The eager build with its hot part under ``torch.compile`` (inductor, static shapes: each
    batch shape compiles on its first call, which the warm-up absorbs and the row reports)."""
    model = build_tower(state, tower, build)
    part = hot_part(model, tower)
    part.install(torch.compile(part.module, backend="inductor", dynamic=False))
    return model


def backend_models(
    state: dict, tower: str, threads: int, cache: Path, compile_eager: bool = False
) -> list[tuple[str, AudioCLIP]]:
    """The served eager build, then each runtime ``audioclip.backends`` offers for the tower (and
    eager under torch.compile, which is measured but not offered)."""
    sha256 = digest_arrays(state)
    variants = [("eager (served default)", TowerBuild())]
    for backend in BACKENDS[1:]:
        if tower in FP32_TOWERS[backend]:
            variants.append((f"{backend} fp32", TowerBuild(backend=backend)))
        if tower in BF16_TOWERS.get(backend, ()) and cpu_has_bf16():  # elsewhere it is the fp32 graph
            variants.append((f"{backend} bf16", TowerBuild(backend=backend, dtype="bf16")))
        if tower in INT8_TOWERS.get(backend, ()):
            variants.append((f"{backend} int8", TowerBuild(backend=backend, int8=True)))
    built = []
    for name, build in variants:
        build = replace(build, threads=threads, graph_cache=str(cache))
        started = time.perf_counter()
        built.append((name, build_tower(state, tower, build, weights_sha256=sha256)))
        log(f"    built {tower} {name} in {time.perf_counter() - started:.1f} s")
    if compile_eager:
        built.append(("torch.compile (inductor)", compiled_eager(state, tower, TowerBuild(threads=threads))))
    return built


def bench_backends(
    state: dict,
    batches: dict[str, Sequence[int]],
    rates: dict[str, float],
    budget: Budget,
    cache: Path,
    compile_eager: bool = False,
) -> list[Row]:
    """Each tower on each runtime, whole tower calls (front end and projections included), with
    the eager call's FLOPs turned into GFLOP/s and a share of the matmul rate of its precision
    (``rates``: "fp32", "bf16")."""
    text_pipeline = pipelines()["text"]
    inputs = {
        "text": lambda b: [item.ids for item in text_pipeline.prepare_all(queries(b))],
        "image": pixels,
        "audio": clips,
    }
    encoders = {"text": "encode_token_ids", "image": "encode_image", "audio": "encode_audio"}

    def call(model: AudioCLIP, tower: str, batch: int) -> Fn:
        return functools.partial(getattr(model, encoders[tower]), inputs[tower](batch))

    cases = {"text": "queries, 6-12 tokens", "image": "224x224 pixels", "audio": "5 s clips"}
    rows = []
    for tower in batches:
        models = backend_models(state, tower, torch.get_num_threads(), cache, compile_eager)
        for batch in batches[tower]:
            variants = [(name, call(model, tower, batch)) for name, model in models]
            flops = flops_of(variants[0][1])
            case_rows = bench_case(tower, f"backends: {cases[tower]}", batch, variants, budget)
            for row in case_rows:
                row.gflop_per_call = flops / 1e9
                row.gflop_per_s = flops / 1e9 / (row.median_ms / 1e3)
                row.share_of_matmul = row.gflop_per_s / rates["bf16" if "bf16" in row.variant else "fp32"]
            rows += case_rows
    return rows


def backends_table(rows: Sequence[Row], rates: dict[str, float], bf16_rate: float | None) -> str:
    measured = ", ".join(f"{name} {value:.1f}" for name, value in rates.items())
    bf16 = f"bf16 rows: of the bf16 matmul, torch {bf16_rate:.1f}" if bf16_rate else "no bf16 on this CPU"
    lines = [
        f"fp32 matmul 2048x2048 on {rows[0].threads if rows else '?'} threads, GFLOP/s: {measured}; "
        f"the share below is of the best, {max(rates.values()):.1f} ({bf16})\n",
        "| tower | batch | variant | ms/call | items/s | speed-up | GFLOP/call | GFLOP/s | of matmul rate "
        "| max rel dev | min cos | first call s |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cells = [
            r.tower,
            _fmt(r.batch, "d"),
            r.variant,
            _fmt(r.median_ms, ".1f"),
            _fmt(r.items_per_s, ".3g"),
            _fmt(r.speedup, ".2f", "x"),
            _fmt(r.gflop_per_call, ".1f"),
            _fmt(r.gflop_per_s, ".1f"),
            _fmt(None if r.share_of_matmul is None else 100 * r.share_of_matmul, ".0f", " %"),
            _fmt(r.max_rel_dev, ".1e"),
            _fmt(r.min_cos, ".6f"),
            _fmt(r.first_call_s, ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| tower | case | batch | threads | variant | wall ms/call | items/s | speed-up "
        "| CPU ms/call | CPU speed-up | max rel dev | min cos | load |",
        "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cells = [
            r.tower,
            r.case,
            _fmt(r.batch, "d"),
            str(r.threads),
            r.variant,
            _fmt(r.median_ms, ".3g" if r.median_ms < 1 else ".1f"),
            _fmt(r.items_per_s, ".3g"),
            _fmt(r.speedup, ".2f", "x"),
            _fmt(r.cpu_ms, ".3g" if r.cpu_ms < 1 else ".1f"),
            _fmt(r.cpu_speedup, ".2f", "x"),
            _fmt(r.max_rel_dev, ".1e"),
            _fmt(r.min_cos, ".6f"),
            _fmt(r.load1, ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per variant and case (default 3)")
    p.add_argument("--min-iters", type=int, default=3, help="timed calls per variant at least (default 3)")
    p.add_argument("--max-iters", type=int, default=200, help="timed calls per variant at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default 1)")
    p.add_argument("--text-batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--audio-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image-batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--bf16-batches", type=int, nargs="*", default=[1], help="image batches also run in bf16 (default 1)"
    )
    p.add_argument("--bf16-check", type=int, default=8, help="images for the bf16 accuracy check (0: skip)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--only-backends", action="store_true", help="just the runtimes against the matmul rate")
    p.add_argument("--backend-text-batches", type=int, nargs="*", default=[1, 32])
    p.add_argument("--backend-image-batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--backend-audio-batches", type=int, nargs="*", default=[1, 4])
    p.add_argument("--graph-cache", type=Path, help="exported graphs (default: a temporary folder)")
    p.add_argument(
        "--compile", action="store_true", help="also eager under torch.compile (inductor; minutes per shape)"
    )
    p.add_argument("--towers", nargs="+", default=["text", "image", "audio"], help="towers of backend rows")
    return p.parse_args(argv)


def build_models(state_dict: dict) -> dict[str, AudioCLIP]:
    def build(towers: tuple[str, ...], dtype: str | None = None) -> AudioCLIP:
        return AudioCLIP.from_state_dict(state_dict, device="cpu", towers=towers, dtype=dtype)

    return {
        "text": build(("text",)),
        "fp32": build(("image",)),
        "fp32_cl": build(("image",)),
        "bf16": build(("image",), "bf16"),
        "bf16_cl": build(("image",), "bf16"),
        "audio": build(("audio",)),
        "audio_cl": build(("audio",)),
        "fp32_fold": build(("image",)).use_channels_last(True).fold_batchnorm(),
        "audio_fold": build(("audio",)).use_channels_last(True).fold_batchnorm(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = Budget(args.warmup, args.min_iters, args.max_iters, args.budget)
    info = machine() | {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    log(f"machine: {info}")
    started = time.perf_counter()
    state = synthetic_state_dict("demo")
    rates = matmul_rates(torch.get_num_threads())
    bf16_rate = bf16_matmul_rate()
    log(f"fp32 matmul rates (GFLOP/s): {rates}; bf16 (torch): {bf16_rate}")
    with tempfile.TemporaryDirectory(prefix="graphs-") as tmp:
        batches = {
            "text": args.backend_text_batches,
            "image": args.backend_image_batches,
            "audio": args.backend_audio_batches,
        }
        batches = {tower: batches[tower] for tower in args.towers}
        backend_rows = bench_backends(
            state,
            batches,
            {"fp32": max(rates.values()), "bf16": bf16_rate},
            budget,
            args.graph_cache or Path(tmp),
            args.compile,
        )
    if args.only_backends:
        print(backends_table(backend_rows, rates, bf16_rate))
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": info,
                        "matmul_gflop_s": rates,
                        "bf16_matmul_gflop_s": bf16_rate,
                        "backends": [asdict(r) for r in backend_rows],
                    },
                    indent=2,
                )
                + "\n"
            )
        return
    models = build_models(state)
    copies = {
        "image": channels_last_copy(models["fp32_cl"], "visual"),
        "audio": channels_last_copy(models["audio_cl"], "audio"),
    }
    models["bf16_cl"].use_channels_last(True)

    rows = bench_text(models["text"], args.text_batches, budget)
    rows += bench_audio(models["audio"], models["audio_cl"], models["audio_fold"], args.audio_batches, budget)
    rows += bench_image(models, args.image_batches, args.bf16_batches, budget)
    rows += bench_threads(models["fp32"], sorted({1, 2, args.threads}), budget)
    bf16 = bf16_accuracy(models["fp32"], models["bf16_cl"], args.bf16_check) if args.bf16_check else None
    info |= {"load_after": os.getloadavg(), "wall_s": time.perf_counter() - started}

    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['cpu_capability']}), "
        f"threads {info['threads']}, load avg before/after {info['load_before'][0]:.2f}/"
        f"{info['load_after'][0]:.2f}, wall {info['wall_s']:.0f} s\n"
    )
    print(markdown_table(rows) + "\n")
    print(backends_table(backend_rows, rates, bf16_rate) + "\n")
    for tower, c in copies.items():
        print(
            f"channels_last, {tower}: copied {c['copied_mib']:.1f} MiB "
            f"of {c['conv_mib']:.1f} MiB conv weights"
        )
    if bf16:
        print(
            f"bf16 vs fp32, {bf16['images']} images: max rel dev {bf16['max_rel_dev']:.2e}, "
            f"min cos {bf16['min_cos']:.6f}"
        )
    if args.json:
        payload = {
            "machine": info,
            "args": vars(args) | {"json": str(args.json)},
            "rows": [asdict(r) for r in rows],
            "channels_last_copy": copies,
            "bf16_accuracy": bf16,
            "matmul_gflop_s": rates,
            "bf16_matmul_gflop_s": bf16_rate,
            "backends": [asdict(r) for r in backend_rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
