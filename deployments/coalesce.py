"""Router-side batching: concurrent requests for one tower share one handle call.

Every handle call costs CPU in the router (the call, its serialisation) and in the tower replica
(Serve's request wrapper, the batch queue), on the same cores as the forward. While ``calls_in_flight``
calls to a tower are out, a request joins the next call instead of making its own; that call leaves
as soon as one comes back, carrying every request that arrived meanwhile (up to ``max_items``). At
low load nothing waits: a request finds a free slot and goes alone, as before.

A shared call's rows are split back per request. Its error (a tower refuses one request's item) is
not spread to the others: each request of a failed shared call is sent again on its own, so the
client at fault gets its own error and everyone else their rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from audioclip.pipeline import Prepared

from .core import TowerAnswer

SendCall = Callable[[str, list[Prepared]], Awaitable[TowerAnswer]]


@dataclass
class _Waiting:
    items: list[Prepared]
    future: asyncio.Future[TowerAnswer]
    since: float = field(default_factory=time.perf_counter)


@dataclass
class CoalescerStats:
    """Requests in and handle calls out, per modality (for benchmarks and tests)."""

    requests: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def count(self, modality: str, requests: int) -> None:
        self.requests[modality] = self.requests.get(modality, 0) + requests
        self.calls[modality] = self.calls.get(modality, 0) + 1


class Coalescer:
    """The core's ``TowerClient`` in front of another one: at most ``calls_in_flight`` calls per
    tower, later requests merged into the next call (``calls_in_flight`` 0: every request alone)."""

    def __init__(self, send: SendCall, calls_in_flight: int, max_items: dict[str, int]) -> None:
        self.send = send
        self.calls_in_flight = calls_in_flight
        self.max_items = max_items
        self.stats = CoalescerStats()
        self._out: dict[str, int] = {}
        self._waiting: dict[str, list[_Waiting]] = {}

    async def embed_prepared(self, modality: str, items: list[Prepared]) -> TowerAnswer:
        limit = self.max_items.get(modality, 0)
        if not self.calls_in_flight or len(items) >= limit:
            self.stats.count(modality, 1)
            return await self.send(modality, items)  # a full batch on its own: nothing to share
        waiting = _Waiting(items, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(modality, []).append(waiting)
        self._dispatch(modality)
        return await waiting.future

    def _dispatch(self, modality: str) -> None:
        """Start calls while slots are free and requests wait."""
        queue = self._waiting.get(modality, [])
        while queue and self._out.get(modality, 0) < self.calls_in_flight:
            group, size = [], 0
            while queue and (not group or size + len(queue[0].items) <= self.max_items[modality]):
                size += len(queue[0].items)
                group.append(queue.pop(0))
            self._out[modality] = self._out.get(modality, 0) + 1
            asyncio.get_running_loop().create_task(self._call(modality, group))

    async def _call(self, modality: str, group: list[_Waiting]) -> None:
        try:
            self.stats.count(modality, len(group))
            items = [item for waiting in group for item in waiting.items]
            started = time.perf_counter()
            try:
                answer = await self.send(modality, items)
            except BaseException as error:  # the tower is gone: each request hears of it
                for waiting in group:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                if not isinstance(error, Exception):
                    raise
                return
            if answer.error is not None and len(group) > 1:
                await self._alone(modality, group)  # only the request at fault gets the error
                return
            self._split(answer, group, started)
        finally:
            self._out[modality] -= 1
            self._dispatch(modality)

    async def _alone(self, modality: str, group: list[_Waiting]) -> None:
        async def one(waiting: _Waiting) -> None:
            self.stats.count(modality, 0)  # one more call, for a request already counted
            try:
                answer = await self.send(modality, waiting.items)
            except Exception as error:  # noqa: BLE001 - it goes to the request that awaits it
                if not waiting.future.done():
                    waiting.future.set_exception(error)
                return
            if not waiting.future.done():  # its client may have gone away meanwhile
                waiting.future.set_result(answer)

        await asyncio.gather(*(one(waiting) for waiting in group if not waiting.future.done()))

    @staticmethod
    def _split(answer: TowerAnswer, group: list[_Waiting], started: float) -> None:
        """Each request's rows, with the time it waited here added to its queue time."""
        rows = answer.embeddings
        start = 0
        for waiting in group:
            count = len(waiting.items)
            part = None if answer.error is not None else np.asarray(rows[start : start + count])
            waited_ms = (started - waiting.since) * 1e3
            if not waiting.future.done():
                waiting.future.set_result(
                    replace(answer, embeddings=part, queue_ms=answer.queue_ms + waited_ms)
                )
            start += count
