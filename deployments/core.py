"""The embedding core: what the service does with items, knowing nothing of HTTP.

Decoding in a thread pool (once, with the modality's pipeline), chunking a request into tower
batches, the fan-out to the towers, the mapping of an item error back to the caller's position,
normalisation and ranking. The router's handle API and its HTTP layer both call it; tests can call
it directly with any ``TowerClient``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from audioclip.audio_input import SAMPLE_RATE
from audioclip.errors import InvalidInputError, Reason
from audioclip.model import l2_normalized
from audioclip.pipeline import (
    DEFAULT_OPTIONS,
    AudioItem,
    Limits,
    Options,
    Pipeline,
    Prepared,
    as_item_list,
    count_check,
)
from audioclip.windows import WindowSpec, cut, pooled

from . import ranking

EMBED_DIM = 1024
MIXED_RETRIES = 4  # tries of a request whose answer would mix two checkpoints (a rollout)
MIXED_RETRY_WAIT_S = 0.25
# Texts as short as this tokenize on the event loop: a pool thread gains nothing for pure-Python BPE
# under the GIL, and the hop to it and back costs a single query more than its tokenizing (0.3 ms
# against 0.03 ms). BPE is quadratic in a word's length (one new 64-character word 0.4 ms, 256
# characters 4.7 ms), so each text is capped too: at most ~5 ms on the loop for the worst request that
# qualifies. Longer requests go to the pool, where the loop still gets its turns between GIL slices.
INLINE_TEXT_ITEMS = 8
INLINE_TEXT_CHARS = 512
INLINE_TEXT_ITEM_CHARS = 96
T = TypeVar("T")


@dataclass(frozen=True)
class TowerAnswer:
    """One request's answer from a tower: its rows, or its item error as a value (never raised
    across Ray, so no replica logs a client's mistake), with where the time went."""

    embeddings: np.ndarray | None
    error: InvalidInputError | None
    queue_ms: float
    inference_ms: float
    checkpoint: str  # sha256 of the weights that made the rows


class MixedCheckpoints(Exception):
    """One answer would combine vectors (or scales) of two checkpoints: a new one is rolling out."""


class TowerClient(Protocol):
    async def embed_prepared(self, modality: str, items: list[Prepared]) -> TowerAnswer: ...


@dataclass
class Timings:
    """Milliseconds spent decoding, waiting for a batch and in the batch's forward. A request's
    chunks run concurrently, so each keeps the longest."""

    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0

    def merge(self, other: Timings) -> None:
        self.preprocess_ms = max(self.preprocess_ms, other.preprocess_ms)
        self.queue_ms = max(self.queue_ms, other.queue_ms)
        self.inference_ms = max(self.inference_ms, other.inference_ms)


@dataclass(frozen=True)
class WindowRow:
    """What one answered row of a windowed request covers: its item, the span in seconds, and how
    many windows it pools (1 with ``pool="none"``)."""

    item: int
    start_s: float
    end_s: float
    windows: int = 1


@dataclass
class Embedded:
    """Rows in input order, the tokens they cost (text), timings and the checkpoints that made them;
    for windowed audio, what each row covers."""

    embeddings: np.ndarray
    usage_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    checkpoints: set[str] = field(default_factory=set)
    windows: list[WindowRow] | None = None

    @property
    def checkpoint(self) -> str:
        """The sha256 of the one checkpoint that made the rows ("" for no rows)."""
        return next(iter(self.checkpoints), "")


@dataclass
class Ranked:
    """Candidates ranked against the query (a windowed audio query: against its mean window), and
    for a windowed query the ranking of each window: which label, where."""

    results: list[dict]
    timings: Timings
    checkpoint: str
    timeline: list[dict] | None = None


def unwrap(err: InvalidInputError) -> InvalidInputError:
    """The library error itself, not Ray's wrapper around it (whose text holds a traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, InvalidInputError) else err


def relocated(err: InvalidInputError, positions: Sequence[int | None]) -> InvalidInputError:
    """An error about item ``i`` of a sub-list, addressed to ``positions[i]`` in the caller's request:
    the one place where item indexes are re-mapped (chunks, rank groups)."""
    err = unwrap(err)
    return err if err.index is None else err.at_index(positions[err.index])


def modality_of(item: Any, index: int | None) -> str:
    """A rank query/candidate is ``{"text" | "image" | "audio": value}``."""
    if not isinstance(item, Mapping) or len(item) != 1 or next(iter(item)) not in ranking.MODALITIES:
        raise InvalidInputError(
            "each query/candidate must be an object with exactly one of 'text', 'image', 'audio'",
            index=index,
            reason=Reason.BAD_ITEM,
        )
    return next(iter(item))


def inline_text(items: Sequence[Any]) -> bool:
    """Whether a request's texts are few and short enough to tokenize on the event loop (anything
    not a string counts as long: its checks may cost more)."""
    if len(items) > INLINE_TEXT_ITEMS:
        return False
    chars = 0
    for item in items:
        if not isinstance(item, str) or len(item) > INLINE_TEXT_ITEM_CHARS:
            return False
        chars += len(item)
    return chars <= INLINE_TEXT_CHARS


class EmbeddingCore:
    def __init__(
        self,
        towers: TowerClient,
        served: Sequence[str],
        pipelines: Mapping[str, Pipeline],
        limits: Limits,
        chunk_sizes: Mapping[str, int],
        pool: Executor,
        on_decoded: Callable[[str, float], None] | None = None,
        chunks_in_flight: int = 8,
    ) -> None:
        self.towers = towers
        self.served = tuple(served)
        self.pipelines = pipelines
        self.limits = limits
        self.chunk_sizes = chunk_sizes
        self.pool = pool
        self.on_decoded = on_decoded  # (modality, milliseconds): the router's metric
        self.chunks_in_flight = chunks_in_flight  # a request's tower batches sent at once

    # ------------------------------------------------------------------ decoding
    async def decode(
        self,
        modality: str,
        items: Sequence[Any],
        options: Options = DEFAULT_OPTIONS,
        limits: Limits | None = None,
    ) -> tuple[list[Prepared], float]:
        """Every item prepared, and the milliseconds it took: a short request's texts here, longer
        ones as one task in the pool (``inline_text``); images and clips one pool task each, so
        decode threads share them. The error of the first bad item (by position) is raised."""
        self._check_served(modality)
        items = as_item_list(items)
        limits = limits or self.limits
        pipeline = self.pipelines[modality]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if modality == "text" and inline_text(items):
            prepared = pipeline.prepare_all(items, limits, options)
        elif modality == "text":
            prepared = await loop.run_in_executor(self.pool, pipeline.prepare_all, items, limits, options)
        else:
            count_check(items, limits)
            tasks = [loop.run_in_executor(self.pool, pipeline.prepare, i, limits, options) for i in items]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for index, result in enumerate(results):
                if isinstance(result, InvalidInputError):
                    raise result.at_index(index)
                if isinstance(result, BaseException):
                    raise result
            prepared = list(results)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if self.on_decoded is not None:
            self.on_decoded(modality, elapsed_ms)
        return prepared, elapsed_ms

    # ------------------------------------------------------------------ embedding
    async def embed(
        self,
        modality: str,
        items: Sequence[Any],
        *,
        normalize: bool = False,
        options: Options = DEFAULT_OPTIONS,
    ) -> Embedded:
        """Client items (raw or already prepared) -> ``[N, 1024]`` float32 rows in input order, all
        made by one checkpoint. Raises ``InvalidInputError`` naming the first bad item's position.
        With ``options.windows`` (audio), each clip is cut into windows that are embedded like clips
        and pooled: one row per clip, or per window with ``pool="none"``; ``windows`` says which."""
        windows = options.windows
        if windows is not None and modality != "audio":
            raise InvalidInputError("windows apply to audio only", reason=Reason.BAD_WINDOW)
        limits = self.limits.for_windows(windows)
        prepared, preprocess_ms = await self.decode(modality, items, options, limits)
        rows: list[WindowRow] | None = None
        if windows is not None:
            prepared, rows, counts = self.cut_windows(prepared, windows)
        result = await self._one_checkpoint(lambda: self.embed_prepared(modality, prepared))
        result.timings.preprocess_ms = preprocess_ms
        result.usage_tokens = self.pipelines[modality].usage_tokens(prepared)
        if windows is not None:
            result.embeddings, result.windows = pooled(result.embeddings, counts, windows.pool), rows
        if normalize:
            result.embeddings = l2_normalized(result.embeddings)
        return result

    def cut_windows(
        self, clips: Sequence[Prepared], windows: WindowSpec
    ) -> tuple[list[Prepared], list[WindowRow], list[int]]:
        """Decoded clips -> their windows as clips, what each answered row covers, and the windows
        of each clip; at most ``max_windows`` in the request."""
        parts: list[Prepared] = []
        rows: list[WindowRow] = []
        counts: list[int] = []
        total = sum(windows.count(clip.samples.shape[1], SAMPLE_RATE) for clip in clips)
        if total > self.limits.max_windows:
            raise InvalidInputError(
                f"the clips make {total} windows, over the limit of {self.limits.max_windows} per request",
                reason=Reason.TOO_MANY_WINDOWS,
            )
        for item, clip in enumerate(clips):
            samples, times = cut(clip.samples, windows, SAMPLE_RATE)
            parts += [AudioItem(part) for part in samples]
            counts.append(len(times))
            if windows.pool == "none":
                rows += [WindowRow(item, t.start_s, t.end_s) for t in times]
            else:
                rows.append(WindowRow(item, 0.0, clip.samples.shape[1] / SAMPLE_RATE, len(times)))
        return parts, rows, counts

    async def embed_prepared(self, modality: str, prepared: Sequence[Prepared]) -> Embedded:
        """Prepared items in chunks of the tower's batch size, concurrently; rows concatenated."""
        self._check_served(modality)
        if not prepared:
            return Embedded(np.zeros((0, EMBED_DIM), dtype=np.float32))
        chunk = self.chunk_sizes[modality]
        starts = range(0, len(prepared), chunk)
        in_flight = asyncio.Semaphore(self.chunks_in_flight)

        async def send(start: int) -> TowerAnswer:
            async with in_flight:  # a long recording's windows are not all serialised at once
                return await self.towers.embed_prepared(modality, list(prepared[start : start + chunk]))

        answers = await asyncio.gather(*(send(s) for s in starts))
        result = Embedded(np.zeros((0, EMBED_DIM), dtype=np.float32))
        for start, answer in zip(starts, answers, strict=True):
            if answer.error is not None:
                raise relocated(answer.error, range(start, start + chunk))
            result.timings.merge(Timings(0.0, answer.queue_ms, answer.inference_ms))
            result.checkpoints.add(answer.checkpoint)
        if len(result.checkpoints) > 1:
            raise MixedCheckpoints(f"{modality} chunks came from checkpoints {sorted(result.checkpoints)}")
        parts = [np.asarray(a.embeddings) for a in answers]
        result.embeddings = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return result

    async def _one_checkpoint(self, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` again while a rollout makes its answer mix two checkpoints; after
        ``MIXED_RETRIES`` tries the ``MixedCheckpoints`` goes to the caller (HTTP: 503, retry)."""
        for attempt in range(MIXED_RETRIES):
            try:
                return await work()
            except MixedCheckpoints:
                if attempt == MIXED_RETRIES - 1:
                    raise
                await asyncio.sleep(MIXED_RETRY_WAIT_S * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ ranking
    async def rank(
        self,
        query: Mapping[str, Any],
        candidates: Sequence[Mapping[str, Any]],
        scales: Callable[[str], Awaitable[Mapping[str, float]]],
        top_k: int | None = None,
        windows: WindowSpec | None = None,
    ) -> Ranked:
        """Candidates sorted by probability (softmax of the checkpoint's logit scale for each
        modality pair times the cosine), each with its ``index``, ``modality``, ``cosine`` and
        ``probability``. Items are ``{"text": str}``, ``{"image": bytes}`` or ``{"audio": bytes}``.
        ``scales(sha256)``: the logit scales of that checkpoint (raises ``MixedCheckpoints`` if the
        weights now served are another's). Every vector and scale comes from one checkpoint.
        With ``windows`` an audio query is cut into windows and each is ranked too (``timeline``):
        zero-shot sound-event detection, which label where."""
        count_check(candidates, self.limits)
        if not candidates:
            raise InvalidInputError("rank needs at least one candidate", reason=Reason.EMPTY)
        query_kind = modality_of(query, None)
        kinds = [modality_of(item, i) for i, item in enumerate(candidates)]
        started = time.perf_counter()
        if windows is None:
            items, where = [query, *candidates], [None, *range(len(candidates))]
            # decoded once, whatever the retries
            groups = await self._decode_groups(items, [query_kind, *kinds], where)
            spans = None
        else:
            if query_kind != "audio":
                raise InvalidInputError("windows apply to an audio query only", reason=Reason.BAD_WINDOW)
            parts, spans = await self._query_windows(query["audio"], windows)
            groups = await self._decode_groups(list(candidates), kinds, list(range(len(candidates))))
            groups = {k: ([p + len(parts) for p in ps], prep) for k, (ps, prep) in groups.items()}
            positions, prepared = groups.get("audio", ([], []))
            groups["audio"] = ([*range(len(parts)), *positions], [*parts, *prepared])
        preprocess_ms = (time.perf_counter() - started) * 1000
        query_rows = 1 if spans is None else len(spans)
        ranked = await self._one_checkpoint(
            lambda: self._rank_prepared(groups, query_rows, query_kind, kinds, scales, top_k, spans)
        )
        ranked.timings.preprocess_ms = preprocess_ms
        return ranked

    async def _query_windows(self, clip: Any, windows: WindowSpec) -> tuple[list[Prepared], list[WindowRow]]:
        """A rank query's clip decoded (under the windowed limits) and cut into windows, each ranked."""
        try:
            [decoded], _ = await self.decode(
                "audio", [clip], Options(windows=windows), self.limits.for_windows(windows)
            )
        except InvalidInputError as err:
            raise err.at_index(None) from None  # the query has no index
        parts, spans, _ = self.cut_windows([decoded], dataclasses.replace(windows, pool="none"))
        return parts, spans

    async def _decode_groups(
        self, items: list[Mapping[str, Any]], kinds: list[str], where: list[int | None]
    ) -> dict[str, tuple[list[int], list[Prepared]]]:
        """Each modality's items decoded once: ``{kind: (positions, prepared)}``. Of several bad
        items, the first by position is raised, whichever group finished decoding first."""
        groups = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ranking.MODALITIES}
        groups = {k: positions for k, positions in groups.items() if positions}
        # the query joins its modality's group; the candidates alone were checked against the limit
        limits = dataclasses.replace(self.limits, max_items=self.limits.max_items + 1)
        decoded = await asyncio.gather(
            *(self.decode(k, [items[i][k] for i in ps], limits=limits) for k, ps in groups.items()),
            return_exceptions=True,
        )
        errors = []
        for positions, result in zip(groups.values(), decoded, strict=True):
            if isinstance(result, InvalidInputError):
                errors.append(relocated(result, [where[i] for i in positions]))
            elif isinstance(result, BaseException):
                raise result
        if errors:
            raise min(errors, key=lambda e: -1 if e.index is None else e.index)
        return {k: (ps, prepared) for (k, ps), (prepared, _) in zip(groups.items(), decoded, strict=True)}

    async def _rank_prepared(
        self,
        groups: dict[str, tuple[list[int], list[Prepared]]],
        query_rows: int,
        query_kind: str,
        kinds: list[str],
        scales: Callable[[str], Awaitable[Mapping[str, float]]],
        top_k: int | None,
        spans: list[WindowRow] | None,
    ) -> Ranked:
        """One try at ranking decoded items (rows ``[0, query_rows)`` are the query's, the rest the
        candidates'); ``MixedCheckpoints`` where the vectors or the scales of two checkpoints would
        meet."""
        parts = await asyncio.gather(
            *(self.embed_prepared(k, prepared) for k, (_, prepared) in groups.items())
        )
        vectors = np.zeros((query_rows + len(kinds), EMBED_DIM), dtype=np.float32)
        timings, checkpoints = Timings(), set()
        for (positions, _), done in zip(groups.values(), parts, strict=True):
            vectors[positions] = done.embeddings
            timings.merge(done.timings)
            checkpoints.update(done.checkpoints)
        if len(checkpoints) != 1:
            raise MixedCheckpoints(f"rank vectors came from checkpoints {sorted(checkpoints)}")
        [checkpoint] = checkpoints
        pair_scales = await scales(checkpoint)
        queries, candidates = vectors[:query_rows], vectors[query_rows:]
        query = queries[0] if spans is None else pooled(queries, [query_rows], "mean")[0]
        results = ranking.rank(query, query_kind, candidates, kinds, pair_scales, top_k)
        timeline = None
        if spans is not None:
            timeline = [
                {
                    "start_s": span.start_s,
                    "end_s": span.end_s,
                    "results": ranking.rank(row, query_kind, candidates, kinds, pair_scales, top_k),
                }
                for row, span in zip(queries, spans, strict=True)
            ]
        return Ranked(results, timings, checkpoint, timeline)

    def _check_served(self, modality: str) -> None:
        if modality not in self.served:
            raise InvalidInputError(
                f"this deployment does not serve the {modality} tower (towers: {list(self.served)})",
                reason=Reason.TOWER_NOT_SERVED,
            )
