"""One Serve deployment per AudioCLIP tower, with dynamic batching.

The router sends a tower prepared items only (``audioclip.pipeline``: token ids, 224x224 crops,
44.1 kHz clips) through ``embed_prepared``; ``@serve.batch`` merges concurrent calls, and the batch
is collated and run by the modality's pipeline on a one-thread executor, off the replica's event
loop, so health checks and new requests are served while it runs. Every answer is a value: a bad
request gets its error in its own slot, and nothing a client sent is raised across Ray (Serve logs
each exception a replica method raises at ERROR). ``embed`` takes raw items too, for a handle call
straight to a tower, decoding them under the app's ``Limits`` like the router does.
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

from audioclip import InvalidInputError, Reason
from audioclip.backends import runtime_label
from audioclip.factory import build_tower
from audioclip.pipeline import Options, Prepared

from .core import TowerAnswer
from .logs import quiet_client_errors
from .memory import mapping_of, memory_mib, release_free_memory
from .settings import Batching, TowerArgs

logger = logging.getLogger("ray.serve")


def count_items(requests: list) -> int:
    """``batch_size_fn``: a batch's size is its number of items. It must never raise (a Serve bug
    then hangs the batch loop), so anything odd counts as one item."""
    total = 0
    for request in requests:
        try:
            total += max(1, len(request))
        except Exception:  # noqa: BLE001 - counting must never raise
            total += 1
    return total


def merge_answers(answers: Sequence[TowerAnswer], part_size: int) -> TowerAnswer:
    """The answers of consecutive parts of one request as one answer (the first error, re-addressed)."""
    for number, answer in enumerate(answers):
        if answer.error is not None:
            offset = number * part_size
            error = answer.error.at_index(None if answer.error.index is None else offset + answer.error.index)
            return TowerAnswer(None, error, 0.0, 0.0, answer.checkpoint)
    rows = np.concatenate([a.embeddings for a in answers])
    queue = max(a.queue_ms for a in answers)
    inference = max(a.inference_ms for a in answers)
    return TowerAnswer(rows, None, queue, inference, answers[0].checkpoint)


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
        done = sum(len(r) for r, out in zip(requests, results, strict=True) if not isinstance(out, Exception))
        if done:
            self.items.inc(done, tags=self.tags)
            self.batch_size.observe(done, tags=self.tags)
            self.forward_ms.observe(elapsed_ms, tags=self.tags)


class TowerBase:
    """Loads its tower from the weight store, warms up, and batches ``embed_prepared`` calls."""

    # Conv towers hand their freed activation buffers back to the OS after each batch
    # (deployments/memory.py); the text tower's are small.
    trims_memory_after_batch: bool = True

    async def __init__(self, store: DeploymentHandle, args: TowerArgs) -> None:
        started = time.perf_counter()
        quiet_client_errors()
        self.args = args
        self.tower = args.tower
        self.pipeline = args.pipeline
        torch.set_num_threads(args.threads)
        [ref], self.checkpoint = await store.get.remote(self.tower)  # one call: these weights, their sha256
        state = await ref
        sha256 = self.checkpoint["sha256"]  # names the folder of the tower's exported graphs
        self.model = await asyncio.to_thread(build_tower, state, self.tower, args.build, sha256)
        self.device = self.model.device.type
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.tower}-forward")
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)  # the latest ones
        self._batches_total = 0  # every batch since the warm-up (the deque forgets)
        self._internal_failures = 0
        self._idle_wait_s = 0.01
        self._forward_s = 0.0  # moving average of a batch's forward time
        self.metrics = TowerMetrics(self.tower)
        # One item, before Serve applies the user_config's batch size (reconfigure runs after this).
        self._embed_batch.set_max_batch_size(1)
        await self.embed_prepared([self.pipeline.warmup_item()])
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
        """``user_config`` (``Batching``): batch size and wait change live, without a restart."""
        batching = Batching(**config)
        self._embed_batch.set_max_batch_size(batching.max_batch_size)
        self._idle_wait_s = batching.batch_wait_timeout_s
        self._embed_batch.set_batch_wait_timeout_s(self._idle_wait_s)

    def check_health(self) -> None:
        if self._internal_failures >= 3:
            raise RuntimeError(f"{self._internal_failures} forward passes failed in a row")
        if self.device == "cuda":
            torch.cuda.synchronize()  # raises if the device is lost

    # ------------------------------------------------------------------ public methods
    async def embed_prepared(self, items: Sequence[Prepared]) -> TowerAnswer:
        """The router's call: one request's prepared items -> its rows or its error, as a value."""
        sha256 = self.checkpoint["sha256"]
        error = self._refusal(items)
        if error is not None:
            return TowerAnswer(None, error, 0.0, 0.0, sha256)
        if not items:
            return TowerAnswer(np.zeros((0, self.model.config.embed_dim), np.float32), None, 0.0, 0.0, sha256)
        limit = self._embed_batch._get_max_batch_size()
        if len(items) > limit:  # the batch size changed live, or a caller sent more: split
            parts = [list(items[s : s + limit]) for s in range(0, len(items), limit)]
            return merge_answers(await asyncio.gather(*(self.embed_prepared(p) for p in parts)), limit)
        arrived = time.perf_counter()
        result, started, finished = await self._embed_batch(list(items))
        if isinstance(result, Exception):  # an internal failure: the router answers 5xx
            raise result
        return TowerAnswer(result, None, (started - arrived) * 1000, (finished - started) * 1000, sha256)

    def _refusal(self, items: Sequence[Prepared]) -> InvalidInputError | None:
        """Why these prepared items cannot be batched (any handle caller may send them), or None."""
        for index, item in enumerate(items):
            if not isinstance(item, self.pipeline.item_type):
                return InvalidInputError(
                    f"the {self.tower} tower takes {self.pipeline.item_type.__name__} items, "
                    f"got {type(item).__name__}",
                    index=index,
                    reason=Reason.UNSUPPORTED_TYPE,
                )
            try:
                self.pipeline.check(item, self.args.limits)
            except InvalidInputError as err:
                return err.at_index(index)
        return None

    async def embed(self, items: Sequence[Any], options: dict | None = None) -> np.ndarray:
        """A handle call straight to the tower: raw or prepared items -> ``[N, 1024]`` float32,
        unnormalised; raises ``InvalidInputError`` naming the bad item."""
        unknown = set(options or {}) - {"truncate"}
        if unknown:
            raise InvalidInputError(
                f"unknown option(s) {sorted(unknown)}; the option is 'truncate'", reason=Reason.BAD_ITEM
            )
        prepared = await asyncio.to_thread(
            self.pipeline.prepare_all, items, self.args.limits, Options(**(options or {}))
        )
        answer = await self.embed_prepared(prepared)
        if answer.error is not None:
            raise answer.error
        return answer.embeddings

    def describe(self) -> dict:
        return {
            "tower": self.tower,
            "device": self.device,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "channels_last": self.model.channels_last,
            "batchnorm_folded": self.model.batchnorm_folded,
            "backend": self.args.build.backend,
            "int8": self.args.build.int8,
            "runtime": runtime_label(self.model, self.tower),
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
        self, requests: list[list[Prepared]]
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

    def _run_batch(self, requests: list[list[Prepared]]) -> list[np.ndarray | Exception]:
        """All requests in one set of forwards; if that fails, each alone, so one request that
        breaks the model (an internal fault, logged with its traceback) fails only itself."""
        try:
            outputs: list[np.ndarray | Exception] = self._forward_requests(requests)
            self._internal_failures = 0
            return outputs
        except Exception:
            logger.exception("%s batch forward failed; retrying requests one by one", self.tower)
        outputs = []
        for request in requests:
            try:
                outputs.extend(self._forward_requests([request]))
                self._internal_failures = 0
            except Exception as err:  # noqa: BLE001 - isolate the failing request
                self._internal_failures += 1
                outputs.append(RuntimeError(f"{self.tower} forward failed: {type(err).__name__}"))
        return outputs

    def _forward_requests(self, requests: list[list[Prepared]]) -> list[np.ndarray]:
        flat = [item for items in requests for item in items]
        self._batch_sizes.append(len(flat))
        self._batches_total += 1
        embeddings = self.pipeline.forward(self.model, self.pipeline.collate(flat, self.model.device))
        out, start = [], 0
        for items in requests:
            out.append(embeddings[start : start + len(items)])
            start += len(items)
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ImageEncoder(TowerBase):
    """Prepared: ``ImageItem`` (224x224 crops or normalised pixels); raw: encoded bytes, PIL images
    or HWC arrays."""


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TextEncoder(TowerBase):
    """Prepared: ``TextItem`` token ids; raw: strings (option ``truncate``). A batch runs as
    forwards of similar-length texts, each padded only to its longest."""

    trims_memory_after_batch = False


@serve.deployment(ray_actor_options={"num_cpus": 0})
class AudioEncoder(TowerBase):
    """Prepared: ``AudioItem`` 44.1 kHz clips; raw: encoded bytes or ``(array, sample_rate)`` pairs.
    Clips of equal shape share a forward."""


TOWER_DEPLOYMENTS = {"image": ImageEncoder, "text": TextEncoder, "audio": AudioEncoder}
