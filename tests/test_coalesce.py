"""Router-side batching (``deployments.coalesce``): fewer handle calls, the same rows, errors kept apart.

The tower here is a coroutine that answers each item with a row made from the item itself, after
yielding to the loop (as a handle call does), so a wrong split shows as a wrong row.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from audioclip import InvalidInputError, Reason
from deployments.coalesce import Coalescer
from deployments.core import TowerAnswer


class Tower:
    def __init__(self, bad: int | None = None, gone: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.bad, self.gone = bad, gone

    async def send(self, modality: str, items: list[int]) -> TowerAnswer:
        self.calls.append(list(items))
        await asyncio.sleep(0.01)
        if self.gone:
            raise ConnectionError("tower replica died")
        if self.bad in items:
            error = InvalidInputError(f"item {items.index(self.bad)} is bad", reason=Reason.BAD_SHAPE)
            return TowerAnswer(None, error, 0.0, 1.0, "sha")
        rows = np.array([[float(i)] * 4 for i in items], dtype=np.float32)
        return TowerAnswer(rows, None, 0.5, 1.0, "sha")


def run(coalescer: Coalescer, requests: list[list[int]]) -> list:
    async def main():
        return await asyncio.gather(
            *(coalescer.embed_prepared("text", items) for items in requests), return_exceptions=True
        )

    return asyncio.run(main())


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    tower = Tower()
    requests = [[i] for i in range(10)] + [[100, 101]]
    answers = run(Coalescer(tower.send, 1, {"text": 32}), requests)
    assert len(tower.calls) == 2  # the first alone (a free slot), the other ten in the next call
    assert tower.calls[1] == [i for items in requests[1:] for i in items]
    for items, answer in zip(requests, answers, strict=True):
        assert answer.error is None
        assert answer.embeddings[:, 0].tolist() == items
    assert answers[5].queue_ms > answers[0].queue_ms  # time waiting in the router counts as queueing


def test_a_call_never_carries_more_than_a_tower_batch():
    tower = Tower()
    run(Coalescer(tower.send, 1, {"text": 4}), [[i] for i in range(11)])
    assert [len(c) for c in tower.calls] == [1, 4, 4, 2]


def test_requests_of_a_full_batch_or_with_coalescing_off_go_alone():
    tower = Tower()
    run(Coalescer(tower.send, 0, {"text": 32}), [[i] for i in range(5)])
    assert len(tower.calls) == 5
    tower = Tower()
    run(Coalescer(tower.send, 1, {"text": 2}), [[1, 2], [3, 4], [5, 6]])
    assert tower.calls == [[1, 2], [3, 4], [5, 6]]


def test_an_error_in_a_shared_call_reaches_only_the_request_at_fault():
    tower = Tower(bad=7)
    requests = [[i] for i in range(5)] + [[6, 7]] + [[8]]
    answers = run(Coalescer(tower.send, 1, {"text": 32}), requests)
    [failed] = [a for a in answers if a.error is not None]
    assert failed is answers[5] and "item 1 is bad" in str(failed.error)  # its own position
    for items, answer in zip(requests, answers, strict=True):
        if answer is not failed:
            assert answer.embeddings[:, 0].tolist() == items


def test_a_lost_tower_fails_every_request_of_the_call():
    tower = Tower(gone=True)
    answers = run(Coalescer(tower.send, 1, {"text": 32}), [[i] for i in range(4)])
    assert all(isinstance(a, ConnectionError) for a in answers)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_no_more_calls_in_flight_than_the_slots(slots):
    tower = Tower()
    out, peak = 0, 0

    async def counted(modality, items):
        nonlocal out, peak
        out += 1
        peak = max(peak, out)
        try:
            return await tower.send(modality, items)
        finally:
            out -= 1

    coalescer = Coalescer(counted, slots, {"text": 32})
    answers = run(coalescer, [[i] for i in range(40)])
    assert peak == slots and all(a.error is None for a in answers)
    assert coalescer.stats.requests["text"] == 40 and coalescer.stats.calls["text"] == len(tower.calls)
