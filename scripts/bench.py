"""Serving throughput of the AudioCLIP Serve app, measured against the raw in-process towers in one run.

1. Inputs are generated deterministically: short queries (5-15 tokens) and sentences (30-60 tokens);
   640x480 JPEG photos and large 4000x3000 JPEGs (smooth gradients + a blob + noise, Pillow, quality
   90); 5 s and 30 s WAV clips (44.1 kHz int16, tones + noise).
2. Raw: each tower alone in this process, built by the replicas' own ``build_tower_model`` from the
   config's settings (device, dtype, NHWC / folded BatchNorm, torch threads), on synthetic "demo"
   weights, timed at batch 1 and at the largest of 32 and 8 whose call fits ``--raw-max-call``
   seconds; decoding included (image: decode + ``preprocess_image`` + ``encode_image``; audio:
   ``load_audio`` + ``encode_audio``; text: tokenizing + one forward per length group, as the text
   tower does), since the server does that work too.
3. Served: ``serve run`` of ``--config`` (a temp copy on a free port) unless ``--url`` names a running app.
   Load comes from separate processes: an aiohttp client (HTTP) and a Ray driver (handle API), closed
   loop at each concurrency, with single-item and multi-item requests. A case issues requests until
   ``--seconds`` have passed or ``--max-requests`` were issued, then waits for those in flight, so the
   next case starts on an idle server; throughput = items answered / (last answer - start). A case
   whose first wave alone would take over ``--max-case-seconds`` at the best raw rate, or whose body would
   exceed the app's 64 MiB limit, is skipped and reported as such.
4. Reported per case: requests/s, items/s, p50/p90/p99 latency, the mean batch the tower formed
   (its ``stats()`` before and after), CPU use (utime+stime of every process in /proc over wall time:
   cores busy, also split by role), and ratios to raw. Then the performance targets, met or missed.

Markdown tables go to stdout, progress to stderr; ``--json`` and ``--plot`` write the figures.

    .venv/bin/python scripts/bench.py --json docs/bench_serving.json --plot docs/bench_serving.png
    .venv/bin/python scripts/bench.py --quick          # ~4 min smoke run
    .venv/bin/python scripts/bench.py --url http://127.0.0.1:8000 --ray-address auto   # a running app
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import io
import json
import multiprocessing as mp
import os
import pickle
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SAMPLE_RATE = 44100
APP = "audioclip"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TIMING_HEADERS = ("total", "preprocess", "queue", "inference")  # the router's x-*-time headers (ms)


@dataclass(frozen=True)
class Kind:
    """One kind of input: which tower it goes to and how it is described."""

    name: str
    modality: str
    label: str


KINDS = {
    k.name: k
    for k in (
        Kind("queries", "text", "short queries, 5-15 tokens"),
        Kind("sentences", "text", "sentences, 30-60 tokens"),
        Kind("photo", "image", "640x480 JPEG q90"),
        Kind("large", "image", "4000x3000 JPEG q90"),
        Kind("clip5", "audio", "5 s WAV 44.1 kHz int16"),
        Kind("clip30", "audio", "30 s WAV 44.1 kHz int16"),
    )
}
POOL_SIZES = {"queries": 64, "sentences": 64, "photo": 32, "large": 2, "clip5": 8, "clip30": 2}


# ---------------------------------------------------------------------------------------------- inputs
_SOURCES = (
    "dog barking", "church bells", "heavy rain", "diesel engine", "children laughing", "campfire",
    "footsteps on gravel", "old telephone", "waves on rocks", "cat purring", "helicopter", "glass breaking",
    "violin melody", "wind in pine trees", "cheering crowd", "kettle whistling", "thunderstorm", "train horn",
)  # fmt: skip
_ADJECTIVES = ("loud", "distant", "soft", "muffled", "sharp", "quiet", "echoing", "steady", "sudden")
_PLACES = (
    "in the distance", "at night", "in a busy street", "inside a small kitchen", "near the sea",
    "in an empty hall", "during a storm", "in the early morning", "on a crowded platform", "in a forest",
)  # fmt: skip
_DETAILS = (
    "recorded with a cheap phone microphone", "with a lot of echo from the surrounding walls",
    "partly drowned out by traffic noise", "close to the microphone and slightly distorted",
    "fading in and out as the wind changes direction", "with birds singing softly in the background",
    "while the recorder is carried slowly along a gravel path", "with a faint electrical hum underneath",
)  # fmt: skip
_BACKGROUNDS = (
    "someone is talking quietly on the phone", "a radio plays old pop songs in another room",
    "cars keep passing by on the wet road outside", "a clock ticks loudly on the wall nearby",
    "a dog answers from a neighbouring garden", "people are chatting at a table close by",
)  # fmt: skip


def token_count(text: str) -> int:
    """CLIP BPE tokens of ``text`` including SOT and EOT (what the text tower runs over)."""
    from audioclip.tokenizer import tokenize_to_ids

    return len(tokenize_to_ids([text], 77, truncate=True)[0])


def _query(rng: random.Random) -> str:
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []
    words.append(rng.choice(_SOURCES))
    if rng.random() < 0.7:
        words.append(rng.choice(_PLACES))
    return " ".join(words)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _sentence(rng: random.Random) -> str:
    text = (
        f"{_a(rng.choice(_ADJECTIVES)).capitalize()} {rng.choice(_SOURCES)} {rng.choice(_PLACES)}, "
        f"{rng.choice(_DETAILS)}, while {rng.choice(_BACKGROUNDS)}"
    )
    if rng.random() < 0.6:
        text += f" and {_a(rng.choice(_SOURCES))} can be heard {rng.choice(_PLACES)}"
    if rng.random() < 0.5:
        text += f", {rng.choice(_DETAILS)}"
    return text + "."


def text_pool(n: int, seed: int, make: Callable[[random.Random], str], lo: int, hi: int) -> list[str]:
    """``n`` distinct texts from ``make`` whose token count (with SOT/EOT) lies in ``[lo, hi]``."""
    rng, out = random.Random(seed), []
    for _ in range(100 * n):
        text = make(rng)
        if text not in out and lo <= token_count(text) <= hi:
            out.append(text)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not make {n} texts of {lo}-{hi} tokens")


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth three-colour gradient, one soft blob, and sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    left, right, bottom = (rng.uniform(20, 235, 3).astype(np.float32) for _ in range(3))
    img = (1 - y) * ((1 - x) * left + x * right) + y * bottom
    cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    blob = np.exp(-((y - cy) ** 2 + ((x - cx) * width / height) ** 2) / (2 * radius**2))
    img = img + blob * rng.uniform(-80, 80, 3).astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def wav_clip(seconds: float, seed: int) -> bytes:
    """A WAV clip (44.1 kHz, mono int16): a harmonic tone with a slow tremolo, plus noise."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(round(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(np.pi * t))
    wave = 0.35 * tone + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave * 32767, -32768, 32767).astype(np.int16), SAMPLE_RATE, "PCM_16", format="WAV")
    return buf.getvalue()


def make_inputs(kinds: Sequence[str]) -> dict[str, list]:
    """Every input pool, deterministic (fixed seeds)."""
    makers: dict[str, Callable[[int], list]] = {
        "queries": lambda n: text_pool(n, 1, _query, 5, 15),
        "sentences": lambda n: text_pool(n, 2, _sentence, 30, 60),
        "photo": lambda n: [photo_jpeg(640, 480, 100 + i) for i in range(n)],
        "large": lambda n: [photo_jpeg(4000, 3000, 200 + i) for i in range(n)],
        "clip5": lambda n: [wav_clip(5.0, 300 + i) for i in range(n)],
        "clip30": lambda n: [wav_clip(30.0, 400 + i) for i in range(n)],
    }
    inputs = {}
    for name in kinds:
        log(f"inputs: {name} ({POOL_SIZES[name]} distinct)")
        inputs[name] = makers[name](POOL_SIZES[name])
    return inputs


def describe_inputs(inputs: dict[str, list]) -> dict[str, dict]:
    """Sizes of the pools, for the report."""
    out: dict[str, dict] = {}
    for name, pool in inputs.items():
        if KINDS[name].modality == "text":
            tokens = [token_count(t) for t in pool]
            out[name] = {"count": len(pool), "tokens_min": min(tokens), "tokens_max": max(tokens)}
        else:
            sizes = [len(b) for b in pool]
            out[name] = {"count": len(pool), "bytes_mean": round(statistics.mean(sizes))}
    return out


def batch_of(pool: list, start: int, n: int) -> list:
    """``n`` items of ``pool`` from ``start``, wrapping around."""
    return [pool[(start + j) % len(pool)] for j in range(n)]


# ---------------------------------------------------------------------------------------------- raw
@dataclass
class RawResult:
    kind: str
    modality: str
    batch: int
    median_s: float
    iters: int
    items_per_s: float
    other_cores: float = 0.0  # CPU used by other processes meanwhile: should be ~0


def raw_call(model: Any, modality: str, payload: list) -> Callable[[], Any]:
    """The in-process equivalent of serving ``payload``: decoding, preprocessing and the forward,
    ending with the embeddings on the CPU (as the server answers; on a GPU this waits for it)."""
    import torch

    import audioclip
    from audioclip.model import encode_token_ids_by_length
    from audioclip.tokenizer import tokenize_to_ids

    if modality == "text":  # as the text tower does: tokenize, then one forward per length group
        return lambda: encode_token_ids_by_length(
            model, tokenize_to_ids(payload, model.config.context_length)
        )
    if modality == "image":
        return lambda: model.encode_image(torch.stack([audioclip.preprocess_image(b) for b in payload])).cpu()
    return lambda: model.encode_audio(
        torch.from_numpy(np.stack([audioclip.load_audio(b) for b in payload]))
    ).cpu()


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
    (``build_tower_model``) from the config's ``settings``: same device, dtype, layout and threads.
    ``threads`` / ``channels_last``: overrides for the raw towers."""
    import torch

    import audioclip
    from deployments.towers import build_tower_model

    state = audioclip.synthetic_state_dict("demo")
    results = []
    for modality in ("text", "image", "audio"):
        names = [n for n in inputs if KINDS[n].modality == modality]
        if not names:
            continue
        tower_args = settings.tower_args(modality)
        if threads:
            tower_args["torch_threads"] = threads
        if channels_last is not None and modality != "text":
            tower_args["channels_last"] = modality in channels_last
        torch.set_num_threads(tower_args["torch_threads"])
        model = build_tower_model(state, modality, tower_args, settings.model_options())
        log(
            f"raw | {modality} on {model.device}, {tower_args['dtype'] or 'fp32'}, "
            f"{torch.get_num_threads()} threads, channels_last {model.channels_last}, "
            f"BatchNorm folded {model.batchnorm_folded}"
        )
        for name in names:
            batches, single_s = [1], None
            while batches:
                batch = batches.pop(0)
                log(f"raw | {name} | batch {batch}")
                before, t0 = cpu_by_pid(), time.perf_counter()
                times = time_call(raw_call(model, modality, batch_of(inputs[name], 0, batch)), seconds)
                other = cores_elsewhere(before, cpu_by_pid(), time.perf_counter() - t0)
                median = statistics.median(times)
                results.append(RawResult(name, modality, batch, median, len(times), batch / median, other))
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


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(source: Path, port: int, directory: Path) -> Path:
    """A copy of the serve config with the HTTP port replaced."""
    import yaml

    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {})["port"] = port
    config["http_options"].setdefault("host", "127.0.0.1")
    path = directory / source.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def http_status(url: str, timeout: float = 10.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float) -> float:
    """Seconds until ``GET /readyz`` answers 200; fails early if the ``serve run`` process exits."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve run exited with code {proc.returncode} before the app was ready")
        if http_status(f"{url}/readyz") == 200:
            return time.monotonic() - started
        time.sleep(1.0)
    raise TimeoutError(f"{url}/readyz not 200 after {timeout_s:.0f} s")


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                tree.setdefault(stat[0], []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = children_map(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def gcs_address(pids: Sequence[int]) -> str | None:
    """The Ray GCS address the processes of our cluster were started with (``--gcs-address=``)."""
    for pid in pids:
        match = re.search(r"--gcs-address=(\S+)", cmdline(pid))
        if match:
            return match.group(1)
    return None


class ServeApp:
    """``serve run`` of a temp copy of a config on a free port; stopped by SIGINT (serve shutdown),
    then any leftover process of its cluster is ended by pid."""

    def __init__(self, config: Path, workdir: Path, ready_timeout_s: float) -> None:
        self.port = free_port()
        self.config = write_config(config, self.port, workdir)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve_run.log"
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0

    def start(self) -> None:
        serve_cli = Path(sys.executable).with_name("serve")
        if serve_cli.exists():
            command = [str(serve_cli), "run", str(self.config)]
        else:  # ray installed without its scripts next to this interpreter (e.g. pip --target)
            entry = "import sys; from ray.serve.scripts import cli; sys.argv[0] = 'serve'; cli()"
            command = [sys.executable, "-c", entry, "run", str(self.config)]
        log(f"starting: {' '.join(command)} (log: {self.log_path})")
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()
            )
        try:
            self.ready_s = wait_ready(self.url, self.proc, self.ready_timeout_s)
        except Exception:
            log(self.log_tail())
            self.stop()
            raise
        log(f"app ready at {self.url} after {self.ready_s:.0f} s")

    def gcs_address(self) -> str | None:
        return gcs_address(descendants(self.proc.pid)) if self.proc else None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        family = {pid: start_time(pid) for pid in descendants(self.proc.pid)}
        if self.proc.poll() is None:
            log("stopping serve run (SIGINT: serve shutdown, then its local Ray cluster)")
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(2.0)
        for pid, started in family.items():  # processes of our cluster that outlived the driver
            if started is not None and start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None


# ---------------------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class Case:
    path: str  # "http" or "handle"
    kind: str
    items: int
    concurrency: int


@dataclass
class LoadResult:
    """What a load process measured for one case."""

    latencies_s: list[float]
    items_ok: int
    errors: dict[str, int]
    elapsed_s: float
    check: str
    server_ms: dict[str, float] = field(default_factory=dict)  # mean x-*-time headers (HTTP)


def http_request(kind: str, items: list) -> tuple[str, bytes, dict[str, str]]:
    """Route, body and headers of one request carrying ``items``: a raw body for one image or clip."""
    modality = KINDS[kind].modality
    if modality == "text":
        return "/v1/embed/text", json.dumps({"texts": items}).encode(), {"content-type": "application/json"}
    if len(items) == 1:
        media = "image/jpeg" if modality == "image" else "audio/wav"
        return f"/v1/embed/{modality}", items[0], {"content-type": media}
    field_name = "images" if modality == "image" else "audio"
    body = json.dumps({field_name: [base64.b64encode(b).decode() for b in items]}).encode()
    return f"/v1/embed/{modality}", body, {"content-type": "application/json"}


async def closed_loop(
    send: Callable[[int], Awaitable[int]], concurrency: int, seconds: float, max_requests: int, label: str
) -> tuple[list[float], int, Counter, float]:
    """``concurrency`` clients, each sending its next request when its last is answered, until
    ``seconds`` have passed or ``max_requests`` were issued; in-flight requests are awaited.
    ``send(i)`` returns the items answered. Returns latencies, items, error counts, elapsed."""
    latencies: list[float] = []
    errors: Counter = Counter()
    state = {"issued": 0, "items": 0}
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        while state["issued"] < max_requests and time.perf_counter() < deadline:
            index = state["issued"]
            state["issued"] += 1
            t0 = time.perf_counter()
            try:
                answered = await send(index)  # not `+= await`: that would lose concurrent updates
                state["items"] += answered
                latencies.append(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - any failure is counted, the case goes on
                errors[type(err).__name__ + (f" {err}" if isinstance(err, HttpError) else "")] += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(5.0)
            elapsed = time.perf_counter() - started
            rate = state["items"] / elapsed
            log(f"    {label}: {elapsed:.0f} s, {len(latencies)} answered, {rate:.1f} items/s")

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        reporter.cancel()
    return latencies, state["items"], errors, time.perf_counter() - started


class HttpError(Exception):
    """A non-200 answer."""


async def run_http(
    case: Case, url: str, pool: list, seconds: float, max_requests: int, warmup: bool
) -> LoadResult:
    """One case over HTTP (aiohttp); ``warmup``: a single untimed request instead."""
    import aiohttp

    bodies = [http_request(case.kind, batch_of(pool, i * case.items, case.items)) for i in range(4)]
    check: list[str] = []
    server: Counter = Counter()  # sums of the app's x-{total,preprocess,queue,inference}-time headers
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=case.concurrency)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as session:

        async def send(index: int) -> int:
            route, body, headers = bodies[index % len(bodies)]
            async with session.post(route, data=body, headers=headers) as response:
                payload = await response.read()
                if response.status != 200:
                    raise HttpError(str(response.status))
                for key in TIMING_HEADERS:
                    with contextlib.suppress(KeyError, ValueError):
                        server[key] += float(response.headers[f"x-{key}-time"])
                server["n"] += 1
                if not check:
                    rows = json.loads(payload)["embeddings"]
                    check.append(f"{len(rows)}x{len(rows[0])}")
                return case.items

        if warmup:
            seconds, max_requests = 3600.0, 1
        lat, items, errors, elapsed = await closed_loop(
            send, case.concurrency, seconds, max_requests, label(case)
        )
    n = server.pop("n", 0) or 1
    means = {key: round(total / n, 2) for key, total in server.items()}
    return LoadResult(lat, items, dict(errors), elapsed, check[0] if check else "", means)


async def run_handle(case: Case, pool: list, seconds: float, max_requests: int, warmup: bool) -> LoadResult:
    """One case through the handle API from this Ray driver; ``warmup``: a single untimed request."""
    from ray import serve

    app = serve.get_app_handle(APP)
    method = {"text": app.embed_text, "image": app.embed_image, "audio": app.embed_audio}[
        KINDS[case.kind].modality
    ]
    check: list[str] = []

    async def send(index: int) -> int:
        out = await method.remote(batch_of(pool, index * case.items, case.items))
        if not check:
            check.append("x".join(str(d) for d in out.shape))
        return len(out)

    if warmup:
        seconds, max_requests = 3600.0, 1
    lat, items, errors, elapsed = await closed_loop(
        send, case.concurrency, seconds, max_requests, label(case)
    )
    return LoadResult(lat, items, dict(errors), elapsed, check[0] if check else "")


def load_worker(conn: Connection, mode: str, inputs_path: str, target: str) -> None:
    """A load process: receives ``(case, seconds, max_requests, warmup)``, answers a ``LoadResult``;
    None ends it. ``target`` is the app URL (http) or the Ray GCS address (handle)."""
    with open(inputs_path, "rb") as f:
        inputs = pickle.load(f)
    if mode == "handle":
        import ray

        ray.init(address=target, namespace="serve", log_to_driver=False, logging_level="ERROR")
    while (message := conn.recv()) is not None:
        case, seconds, max_requests, warmup = message
        pool = inputs[case.kind]
        if mode == "http":
            result = asyncio.run(run_http(case, target, pool, seconds, max_requests, warmup))
        else:
            result = asyncio.run(run_handle(case, pool, seconds, max_requests, warmup))
        conn.send(result)


class LoadProcess:
    """A load process started with ``spawn`` and driven through a pipe."""

    def __init__(self, mode: str, inputs_path: Path, target: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=load_worker, args=(child, mode, str(inputs_path), target), daemon=True)
        self.proc.start()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


class LoadPool:
    """Several load processes sharing one case's concurrency (one Python client saturates at a few
    thousand requests/s); their latencies and counts are merged into one ``LoadResult``."""

    def __init__(self, mode: str, inputs_path: Path, target: str, processes: int) -> None:
        self.workers = [LoadProcess(mode, inputs_path, target) for _ in range(max(1, processes))]
        self.pids = [w.proc.pid for w in self.workers]

    def run(self, case: Case, seconds: float, max_requests: int, warmup: bool = False) -> LoadResult:
        n = 1 if warmup else min(len(self.workers), case.concurrency)
        shares = [case.concurrency // n + (i < case.concurrency % n) for i in range(n)]
        for worker, share in zip(self.workers, shares, strict=False):
            sub = Case(case.path, case.kind, case.items, share)
            limit = max(1, round(max_requests * share / case.concurrency))
            worker.conn.send((sub, seconds, limit, warmup))
        parts: list[LoadResult] = [worker.conn.recv() for worker in self.workers[:n]]
        errors: Counter = Counter()
        server: Counter = Counter()
        for part in parts:
            errors.update(part.errors)
            for key, mean in part.server_ms.items():
                server[key] += mean * len(part.latencies_s)
        answered = sum(len(part.latencies_s) for part in parts) or 1
        return LoadResult(
            latencies_s=[t for part in parts for t in part.latencies_s],
            items_ok=sum(part.items_ok for part in parts),
            errors=dict(errors),
            elapsed_s=max(part.elapsed_s for part in parts),
            check=next((part.check for part in parts if part.check), ""),
            server_ms={key: round(total / answered, 2) for key, total in server.items()},
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def label(case: Case) -> str:
    return f"{case.path} {case.kind} x{case.items} c{case.concurrency}"


# ---------------------------------------------------------------------------------------------- cpu, stats
def read_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime in seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def role_of(pid: int, client_pids: set[int], ours: set[int] | None) -> str:
    """Which part of the system a process is: a Serve deployment, the proxy, the load client, ...;
    ``ours``: the processes of the cluster we started (others are "other", e.g. another job)."""
    if pid in client_pids:
        return "load client"
    if pid == os.getpid():
        return "bench driver"
    if ours is not None and pid not in ours:
        return "other"
    line = cmdline(pid)
    match = re.search(r"ServeReplica:[^:\s]+:(\w+)", line)
    if match:
        return match.group(1)
    if "ProxyActor" in line:
        return "proxy"
    if "ServeController" in line:
        return "controller"
    if ours is not None or "ray" in line:
        return "ray system"
    return "other"


def cpu_by_pid() -> dict[int, float]:
    """utime + stime (s) of every process on the machine."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                out[int(entry.name)] = stat[1]
    return out


def cores_elsewhere(before: dict[int, float], after: dict[int, float], wall_s: float) -> float:
    """Cores that processes other than this one kept busy over ``wall_s``."""
    me = os.getpid()
    return sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != me) / wall_s


class CpuMeter:
    """CPU seconds of every process on the machine (utime + stime from /proc), by role. ``root_pid``:
    the ``serve run`` process, whose descendants are our cluster."""

    def __init__(self, root_pid: int | None) -> None:
        self.root_pid = root_pid
        self.client_pids: set[int] = set()
        self._roles: dict[int, str] = {}

    def snapshot(self) -> dict[int, float]:
        return cpu_by_pid()

    def usage(self, before: dict[int, float], after: dict[int, float], wall_s: float) -> dict[str, float]:
        """Cores busy over ``wall_s``: ``total`` and per role (processes that exited are missed)."""
        ours = None if self.root_pid is None else {self.root_pid, *descendants(self.root_pid)}
        by_role: Counter = Counter()
        for pid, seconds in after.items():
            if pid not in self._roles:
                self._roles[pid] = role_of(pid, self.client_pids, ours)
            by_role[self._roles[pid]] += seconds - before.get(pid, 0.0)
        out = {role: round(s / wall_s, 3) for role, s in sorted(by_role.items()) if s > 0}
        out["total"] = round(sum(by_role.values()) / wall_s, 3)
        return out


class TowerStats:
    """Batches the towers formed, read through a Ray driver in this process (if one connects). A
    handle call reaches one replica, so towers with several replicas report none."""

    def __init__(self, address: str | None, replicas: dict[str, int]) -> None:
        self.handles: dict[str, Any] = {}
        if address is None:
            return
        try:
            import ray
            from ray import serve

            from deployments.towers import TOWER_DEPLOYMENTS

            ray.init(address=address, namespace="serve", log_to_driver=False, logging_level="ERROR")
            for modality, deployment in TOWER_DEPLOYMENTS.items():
                if replicas.get(modality, 1) == 1:
                    self.handles[modality] = serve.get_deployment_handle(deployment.name, APP)
        except Exception as err:  # noqa: BLE001 - without stats the benchmark still runs
            log(f"no tower stats ({type(err).__name__}: {err})")

    def snapshot(self, modality: str) -> dict | None:
        handle = self.handles.get(modality)
        if handle is None:
            return None
        try:
            return handle.stats.remote().result(timeout_s=60)
        except Exception as err:  # noqa: BLE001 - a missing figure, not a failed run
            log(f"stats of the {modality} tower failed: {type(err).__name__}: {str(err)[:200]}")
            return None

    @staticmethod
    def batches_between(before: dict | None, after: dict | None) -> list[int] | None:
        """Sizes of the batches formed between two snapshots of one replica (None if unknown, e.g.
        the replica was replaced, or more were formed than it keeps)."""
        if before is None or after is None or before["pid"] != after["pid"]:
            return None
        formed = after["batches_total"] - before["batches_total"]
        if formed > len(after["batch_sizes"]):
            return None
        return after["batch_sizes"][len(after["batch_sizes"]) - formed :]

    def close(self) -> None:
        if self.handles:
            import ray

            ray.shutdown()


# ---------------------------------------------------------------------------------------------- cases
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
    check: str = ""
    x_raw_b1: float | None = None
    x_raw_max: float | None = None
    raw_max_batch: int | None = None
    p99_over_raw_b1: float | None = None


def plan_cases(args: argparse.Namespace, kinds: Sequence[str]) -> list[Case]:
    """HTTP: every kind x items x concurrency; handle: single-item ``--handle-kinds`` at the extreme
    concurrencies."""
    cases = [
        Case("http", kind, items, conc) for kind in kinds for items in args.items for conc in args.concurrency
    ]
    extremes = sorted({min(args.concurrency), max(args.concurrency)})
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


def run_cases(
    cases: Sequence[Case],
    args: argparse.Namespace,
    inputs_path: Path,
    inputs: dict[str, list],
    url: str,
    ray_address: str | None,
    raw: dict[tuple[str, int], RawResult],
    root_pid: int | None,
    settings: Any,
) -> list[ServedResult]:
    """Every case in order, each on an idle server; skipped cases are reported with their reason."""
    replicas = {t: settings.tower(t).num_replicas for t in settings.towers}
    meter, stats = CpuMeter(root_pid), TowerStats(ray_address, replicas)
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
                workers[case.path] = LoadPool(
                    case.path,
                    inputs_path,
                    url if case.path == "http" else str(ray_address),
                    args.load_processes if case.path == "http" else 1,
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


# ---------------------------------------------------------------------------------------------- targets
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


def evaluate_targets(results: Sequence[ServedResult], kinds: Sequence[str], top: int) -> list[Target]:
    """The performance issue's targets, on the HTTP path."""
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


# ---------------------------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


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


def cpu_role_table(results: Sequence[ServedResult]) -> str:
    """Cores busy per role for each case: where the CPU goes."""
    roles = sorted({k for r in results for k in r.cpu_cores if k != "total"})
    lines = ["| case | " + " | ".join(roles) + " | total |", "|---|" + "--:|" * (len(roles) + 1)]
    for r in results:
        if not r.skipped:
            cells = [fmt(r.cpu_cores.get(role), ".2f") for role in roles]
            lines.append(
                f"| {r.path} {r.kind} x{r.items} c{r.concurrency} | "
                + " | ".join(cells)
                + f" | {r.cpu_cores.get('total', 0):.2f} |"
            )
    return "\n".join(lines)


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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- main
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown input kinds {unknown}; known: {', '.join(KINDS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running app at this URL instead of starting one")
    p.add_argument(
        "--ray-address", help="with --url: the Ray cluster for stats and the handle API (e.g. auto)"
    )
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="serve config to run")
    p.add_argument("--kinds", type=str_list, default=list(KINDS), help="inputs: " + ",".join(KINDS))
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="requests in flight (1,8,32)")
    p.add_argument("--items", type=int_list, default=[1, 32], help="items per request (1,32)")
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
        args.handle_kinds = ["queries"]
    return args


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
        settings = app_settings(None if args.url else args.config)
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
            wait_ready(url, None, args.ready_timeout)
        else:
            app = ServeApp(args.config, workdir, args.ready_timeout)
            app.start()
            url, ray_address, ready_s = app.url, app.gcs_address(), app.ready_s
        code_served = git_state()  # the replicas imported the serving code in between
        try:
            root_pid = app.proc.pid if app is not None and app.proc is not None else None
            served = run_cases(cases, args, inputs_path, inputs, url, ray_address, raw, root_pid, settings)
        finally:
            if app is not None:
                app.stop()
        top = max(args.concurrency)
        targets = evaluate_targets(served, args.kinds, top)
        report = {
            "machine": machine(),
            "git": {"at_start": code, "at_app_ready": code_served},
            "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "config": str(args.config) if not args.url else args.url,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "inputs": describe_inputs(inputs),
            "app_ready_s": round(ready_s, 1),
            "raw": [asdict(r) for r in raw_list],
            "served": [asdict(r) for r in served],
            "targets": [{**asdict(t), "met": t.met} for t in targets],
            "duration_s": round(time.time() - started, 1),
        }
        print("## Raw (in-process towers, decoding included)\n\n" + raw_table(raw_list))
        print("\n## Served\n\n" + served_table(served))
        print("\n## Where the time goes (HTTP, mean ms per request)\n\n" + time_split_table(served))
        print("\n## CPU cores busy by role\n\n" + cpu_role_table(served))
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


if __name__ == "__main__":
    sys.exit(main())
