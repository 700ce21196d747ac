"""One Serve deployment per AudioCLIP tower, with dynamic batching.

A call is ``embed_timed(items, options)`` (or ``embed``) for one request's items;
``@serve.batch`` merges concurrent calls into one forward. Item problems are returned in the
item's request slot, so a bad item fails only its own request. The forward runs on a one-thread executor, off
the replica's event loop, so health checks and new requests are served while it runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from audioclip import AudioCLIP, InvalidInputError
from audioclip.audio_input import SAMPLE_RATE, load_audio
from audioclip.image_input import IMAGE_SIZE, crop_to_uint8, normalize_pixels
from audioclip.model import encode_clips_by_shape, encode_token_ids_by_length
from audioclip.tokenizer import tokenize_to_ids

from .memory import mapping_of, memory_mib, release_free_memory
from .settings import conv_layout

logger = logging.getLogger("ray.serve")
Request = tuple[Sequence[Any], dict[str, Any]]


def count_items(requests: list) -> int:
    """``batch_size_fn``: a batch's size is its number of items. It must never raise (a Serve bug
    then hangs the batch loop), so anything odd counts as one item."""
    total = 0
    for request in requests:
        try:
            total += max(1, len(request[0]))
        except Exception:  # noqa: BLE001 - counting must never raise
            total += 1
    return total


_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class TowerMetrics:
    """Prometheus metrics of a tower replica (exported by Ray's metrics agent as ``ray_audioclip_*``).
    Created inside the replica: Serve tags them with the deployment, replica and application."""

    def __init__(self, modality: str) -> None:
        self.tags = {"modality": modality}
        self.items = metrics.Counter(
            "audioclip_items_embedded", description="Items embedded.", tag_keys=("modality",)
        )
        self.batch_size = metrics.Histogram(
            "audioclip_batch_size",
            description="Items per forward pass.",
            boundaries=_BATCH_BOUNDARIES,
            tag_keys=("modality",),
        )
        self.forward_ms = metrics.Histogram(
            "audioclip_forward_ms",
            description="Batch preparation and forward time (ms).",
            boundaries=_MS_BOUNDARIES,
            tag_keys=("modality",),
        )

    def observe(self, requests: list, results: list, elapsed_ms: float) -> None:
        done = sum(
            len(r[0]) for r, out in zip(requests, results, strict=True) if not isinstance(out, Exception)
        )
        if done:
            self.items.inc(done, tags=self.tags)
            self.batch_size.observe(done, tags=self.tags)
            self.forward_ms.observe(elapsed_ms, tags=self.tags)


def build_tower_model(state: dict, tower: str, settings: dict, model_options: dict) -> AudioCLIP:
    """One tower as a replica runs it (``settings``: ``AppArgs.tower_args``): on CUDA where the
    tower has GPUs and one is present, in its dtype, NHWC and BatchNorm-folded by ``conv_layout``.
    The benchmark builds its raw towers with this too, so raw and served run the same model."""
    num_gpus = float(settings.get("num_gpus", 0))
    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    model = AudioCLIP.from_state_dict(
        state,
        device,
        (tower,),
        dtype=settings.get("dtype"),
        audio_norm=model_options.get("audio_norm", "running"),
    )
    nhwc, fold = conv_layout(
        tower, device, settings.get("channels_last"), settings.get("fold_batchnorm"), model.audio_norm
    )
    if nhwc:
        model.use_channels_last(True)
    if fold:
        model.fold_batchnorm()
    return model


class TowerBase:
    """Loads its tower from the weight store, warms up, and batches ``embed`` calls."""

    tower: str = ""
    # Conv towers hand their freed activation buffers back to the OS after each batch
    # (deployments/memory.py); the text tower's are small.
    trims_memory_after_batch: bool = True

    async def __init__(self, store: DeploymentHandle, settings: dict, model_options: dict) -> None:
        started = time.perf_counter()
        self.settings = settings
        torch.set_num_threads(int(settings["torch_threads"]))
        [ref] = await store.get.remote(self.tower)
        state = await ref
        self.checkpoint = await store.info.remote()
        self.model = await asyncio.to_thread(build_tower_model, state, self.tower, settings, model_options)
        self.device = self.model.device.type
        self.model_options = model_options
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.tower}-forward")
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)  # the latest ones
        self._batches_total = 0  # every batch since the warm-up (the deque forgets)
        self._internal_failures = 0
        self._idle_wait_s = 0.01
        self._forward_s = 0.0  # moving average of a batch's forward time
        self.metrics = TowerMetrics(self.tower)
        await self.embed(self.warmup_items(), {})
        self._batch_sizes.clear()
        self._batches_total = 0
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "%s tower ready on %s in %.1f s, serving checkpoint %s (%s, sha256 %s)",
            self.tower,
            self.device,
            self.load_seconds,
            self.checkpoint["source"],
            self.checkpoint["kind"],
            self.checkpoint["sha256"],
        )

    # ------------------------------------------------------------------ serve hooks
    def reconfigure(self, config: dict) -> None:
        """``user_config``: batch size and wait change live, without a restart."""
        if "max_batch_size" in config:
            self._embed_batch.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self._idle_wait_s = float(config["batch_wait_timeout_s"])
            self._embed_batch.set_batch_wait_timeout_s(self._idle_wait_s)

    def check_health(self) -> None:
        if self._internal_failures >= 3:
            raise RuntimeError(f"{self._internal_failures} forward passes failed in a row")
        if self.device == "cuda":
            torch.cuda.synchronize()  # raises if the device is lost

    # ------------------------------------------------------------------ public methods
    async def embed(self, items: Sequence[Any], options: dict | None = None) -> np.ndarray:
        """Embed one request's items: ``[len(items), 1024]`` float32, unnormalised."""
        embeddings, _ = await self.embed_timed(items, options)
        return embeddings

    async def embed_timed(self, items: Sequence[Any], options: dict | None = None) -> tuple[np.ndarray, dict]:
        """``embed`` plus where the time went: ``queue_ms`` (waiting for a batch to start) and
        ``inference_ms`` (the batch's preparation and forward)."""
        if len(items) == 0:
            return np.zeros((0, self.model.config.embed_dim), dtype=np.float32), {
                "queue_ms": 0.0,
                "inference_ms": 0.0,
            }
        arrived = time.perf_counter()
        result, started, finished = await self._embed_batch((items, options or {}))
        if isinstance(result, Exception):
            raise result
        return result, {"queue_ms": (started - arrived) * 1000, "inference_ms": (finished - started) * 1000}

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return {
            "tower": self.tower,
            "device": self.device,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "channels_last": self.model.channels_last,
            "batchnorm_folded": self.model.batchnorm_folded,
            "checkpoint_sha256": self.checkpoint["sha256"],
            "load_seconds": round(self.load_seconds, 3),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "max_batch_size": self._embed_batch._get_max_batch_size(),
            "batch_wait_timeout_s": self._idle_wait_s,
            "forward_s_average": round(self._forward_s, 4),
        }

    def stats(self) -> dict:
        """Batch sizes formed so far and this replica's memory, for tests and benchmarks."""
        largest = max(self.model.parameters(), key=lambda p: p.numel())
        return {
            "batch_sizes": list(self._batch_sizes),
            "batches_total": self._batches_total,
            "memory_mib": memory_mib(),
            "weights_mapping": mapping_of(largest.data_ptr()),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------------ batching
    def _set_batch_wait(self, busy: bool) -> None:
        """Serve forms the next batch while one runs, and reads the wait when the batch's first
        request arrives. With the configured (short) wait that batch would close after a few ms
        holding one or two requests, then queue behind the running forward anyway. So while a
        forward runs (``busy``), the wait is one forward time (moving average): requests answered
        by the running batch come back over the next tens of ms, and a wait that ended with the
        forward would split them into two batches (measured: mean batch 6.5 instead of 15.5 for 32
        concurrent queries). When idle, the configured short wait applies."""
        wait = max(self._idle_wait_s, self._forward_s) if busy else self._idle_wait_s
        self._embed_batch.set_batch_wait_timeout_s(wait)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=count_items)
    async def _embed_batch(
        self, requests: list[Request]
    ) -> list[tuple[np.ndarray | Exception, float, float]]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._set_batch_wait(busy=True)
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, requests)
        finally:
            finished = time.perf_counter()
            elapsed = finished - started
            self._forward_s = 0.7 * self._forward_s + 0.3 * elapsed if self._forward_s else elapsed
            self._set_batch_wait(busy=False)
            if self.trims_memory_after_batch:  # runs before the next forward on the same executor
                self._executor.submit(release_free_memory)
        self.metrics.observe(requests, results, elapsed * 1000)
        return [(result, started, finished) for result in results]

    def _run_batch(self, requests: list[Request]) -> list[np.ndarray | Exception]:
        prepared: list[list | Exception] = []
        for items, options in requests:
            try:
                prepared.append(self.prepare(items, options))
            except InvalidInputError as err:
                prepared.append(err)
        good = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        results: list[np.ndarray | Exception] = list(prepared)  # errors stay in their slots
        if not good:
            return results
        try:
            outputs = self._forward_requests([prepared[i] for i in good])
            self._internal_failures = 0
        except Exception:
            logger.exception("%s batch forward failed; retrying requests one by one", self.tower)
            outputs = []
            for i in good:
                try:
                    outputs.extend(self._forward_requests([prepared[i]]))
                    self._internal_failures = 0
                except Exception as err:  # noqa: BLE001 - isolate the failing request
                    self._internal_failures += 1
                    outputs.append(RuntimeError(f"{self.tower} forward failed: {type(err).__name__}"))
        for i, out in zip(good, outputs, strict=True):
            results[i] = out
        return results

    def _forward_requests(self, requests: list[list]) -> list[np.ndarray]:
        flat = [item for items in requests for item in items]
        self._batch_sizes.append(len(flat))
        self._batches_total += 1
        embeddings = self.forward(flat)
        out, start = [], 0
        for items in requests:
            out.append(embeddings[start : start + len(items)])
            start += len(items)
        return out

    # ------------------------------------------------------------------ per tower
    def prepare(self, items: Sequence[Any], options: dict) -> list:
        """Validate and convert one request's items; raise ``InvalidInputError`` naming the item."""
        raise NotImplementedError

    def forward(self, items: list) -> np.ndarray:
        raise NotImplementedError

    def warmup_items(self) -> list:
        raise NotImplementedError


def _indexed(index: int, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InvalidInputError as err:
        raise err.at_index(index) from None


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ImageEncoder(TowerBase):
    """Items: 224x224x3 uint8 crops (what the router sends), float32 [3,224,224] CLIP-normalised
    pixels, or anything ``crop_to_uint8`` accepts (encoded bytes, HWC arrays)."""

    tower = "image"

    def prepare(self, items: Sequence[Any], options: dict) -> list:
        return [_indexed(i, self._prepare_one, item) for i, item in enumerate(items)]

    def _prepare_one(self, item: Any) -> np.ndarray:
        if (
            isinstance(item, np.ndarray)
            and item.dtype == np.float32
            and item.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        ):
            if not np.isfinite(item).all():
                raise InvalidInputError("pixels contain NaN or inf", reason="not_finite")
            return item
        if (
            isinstance(item, np.ndarray)
            and item.dtype == np.uint8
            and item.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        ):
            return item
        return crop_to_uint8(item)

    def forward(self, items: list) -> np.ndarray:
        device = self.model.device
        crops = [i for i, x in enumerate(items) if x.dtype == np.uint8]
        pixels = torch.empty(len(items), 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        if crops:
            stacked = torch.from_numpy(np.stack([items[i] for i in crops])).to(device)
            pixels[crops] = normalize_pixels(stacked)
        floats = [i for i, x in enumerate(items) if x.dtype != np.uint8]
        if floats:
            pixels[floats] = torch.from_numpy(np.stack([items[i] for i in floats])).to(device)
        return self.model.encode_image(pixels).cpu().numpy()

    def warmup_items(self) -> list:
        return [np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TextEncoder(TowerBase):
    """Items: strings. Options: ``truncate``. A batch runs as forwards of similar-length texts, each
    padded only to its longest (``encode_token_ids_by_length``)."""

    tower = "text"
    trims_memory_after_batch = False

    def prepare(self, items: Sequence[Any], options: dict) -> list:
        if isinstance(items, str):
            raise InvalidInputError("texts must be a list of strings, not one string", reason="bad_type")
        return tokenize_to_ids(
            list(items), self.model.config.context_length, truncate=bool(options.get("truncate"))
        )

    def forward(self, items: list) -> np.ndarray:
        """One forward per length group, so short queries are not padded to a long sentence."""
        return encode_token_ids_by_length(self.model, items).cpu().numpy()

    def warmup_items(self) -> list:
        return ["warm up"]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class AudioEncoder(TowerBase):
    """Items: float32 [C, N] int16-range clips at 44.1 kHz (what the router sends), encoded bytes,
    or ``(array, sample_rate)`` pairs. Clips of equal shape share a forward; with
    ``fixed_clip_seconds`` every clip is centre padded/cropped to that length first."""

    tower = "audio"

    def prepare(self, items: Sequence[Any], options: dict) -> list:
        return [_indexed(i, self._prepare_one, item) for i, item in enumerate(items)]

    def _prepare_one(self, item: Any) -> np.ndarray:
        max_seconds = float(self.model_options.get("max_audio_seconds", 300.0))
        if isinstance(item, tuple) and len(item) == 2:
            clip = load_audio(item[0], sample_rate=item[1], max_seconds=max_seconds)
        elif (
            isinstance(item, np.ndarray)
            and item.dtype == np.float32
            and item.ndim == 2
            and item.shape[0] in (1, 2)
        ):
            clip = item
            if clip.shape[1] == 0:
                raise InvalidInputError("audio is empty", reason="empty")
            if not np.isfinite(clip).all():
                raise InvalidInputError("audio contains NaN or inf", reason="not_finite")
        else:
            clip = load_audio(item, max_seconds=max_seconds)
        fixed = self.model_options.get("fixed_clip_seconds")
        return fit_length(clip, round(fixed * SAMPLE_RATE)) if fixed else clip

    def forward(self, items: list) -> np.ndarray:
        return encode_clips_by_shape(self.model, items)

    def warmup_items(self) -> list:
        return [np.zeros((1, SAMPLE_RATE), dtype=np.float32)]


def fit_length(clip: np.ndarray, length: int) -> np.ndarray:
    """Centre zero-pad or centre crop ``[C, N]`` to ``length`` samples (the reference's test-time rule)."""
    n = clip.shape[1]
    if n == length:
        return clip
    if n > length:
        start = (n - length) // 2
        return clip[:, start : start + length]
    left = (length - n) // 2
    return np.pad(clip, ((0, 0), (left, length - n - left)))


TOWER_DEPLOYMENTS = {"image": ImageEncoder, "text": TextEncoder, "audio": AudioEncoder}
