"""The embedding core on its own: no HTTP, no Ray, towers run in this process by the pipelines."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import INPUTS, assert_matches

import audioclip
from audioclip.pipeline import DEFAULT_LIMITS, Limits, Prepared, pipelines
from deployments.core import EmbeddingCore, MixedCheckpoints, TowerAnswer


class InProcessTowers:
    """A ``TowerClient`` that runs the tower's own collate + forward here, and records the calls.
    ``checkpoints``: the sha256 each call answers with, in turn (a rollout), then "sha"."""

    def __init__(self, model: audioclip.AudioCLIP) -> None:
        self.model = model
        self.pipelines = pipelines()
        self.calls: list[tuple[str, int]] = []
        self.checkpoints: list[str] = []

    async def embed_prepared(self, modality: str, items: list[Prepared]) -> TowerAnswer:
        self.calls.append((modality, len(items)))
        rows = self.pipelines[modality].embed(self.model, items)
        sha = self.checkpoints.pop(0) if self.checkpoints else "sha"
        return TowerAnswer(rows, None, 0.0, 1.0, sha)


@pytest.fixture(scope="module")
def towers(model):
    return InProcessTowers(model)


def _core(towers, chunk: int = 2, limits: Limits = DEFAULT_LIMITS) -> EmbeddingCore:
    return EmbeddingCore(
        towers, ["text", "image"], pipelines(), limits, {"text": chunk, "image": chunk}, ThreadPoolExecutor(2)
    )


def test_chunks_fan_out_and_come_back_in_order(towers, model):
    texts = [f"a sound number {i}" for i in range(5)]
    towers.calls.clear()
    result = asyncio.run(_core(towers).embed("text", texts))
    assert towers.calls == [("text", 2), ("text", 2), ("text", 1)]
    assert_matches(result.embeddings, model.encode_text(texts), 0.99999)
    ids = audioclip.tokenize_to_ids(texts)
    assert result.usage_tokens == sum(len(x) for x in ids) and result.checkpoints == {"sha"}


def test_an_item_error_names_its_position_in_the_request(towers):
    texts = ["ok", "fine", "word " * 100, "ok"]
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers).embed("text", texts))
    assert (info.value.index, info.value.reason) == (2, "text_too_long")
    images = [(INPUTS / "rocket.jpg").read_bytes(), b"not an image", b"nor this"]
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers).embed("image", images))
    assert (info.value.index, info.value.reason) == (1, "undecodable")  # the first bad one, always


def test_limits_and_unserved_towers_are_item_errors(towers):
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers, limits=Limits(max_items=3)).embed("text", ["a"] * 4))
    assert info.value.reason == "too_many_items"
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers, limits=Limits(max_text_chars=5)).embed("text", ["short", "too long"]))
    assert (info.value.index, info.value.reason) == (1, "text_too_many_chars")
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers).embed("audio", [b"x"]))
    assert info.value.reason == "tower_not_served"


def test_rank_maps_errors_to_candidates_and_scores_like_the_model(towers, model):
    image = (INPUTS / "rocket.jpg").read_bytes()

    async def scales(sha256: str) -> dict:
        assert sha256 == "sha"
        return model.logit_scales._asdict()

    labels = [{"text": "a rocket"}, {"text": "a cup of coffee"}, {"text": "a dog"}]
    ranked = asyncio.run(_core(towers).rank({"image": image}, labels, scales))
    vector = model.encode_image(audioclip.preprocess_image(image)[None]).numpy()[0]
    texts = model.encode_text([c["text"] for c in labels]).numpy()
    cosine = texts @ vector / np.linalg.norm(texts, axis=1) / np.linalg.norm(vector)
    assert [r["index"] for r in ranked.results] == list(np.argsort(-cosine, kind="stable"))
    assert abs(sum(r["probability"] for r in ranked.results) - 1) < 1e-6
    bad = [{"text": "ok"}, {"image": b"broken"}, {"text": "word " * 100}]
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers).rank({"text": "q"}, bad, scales))
    assert (info.value.index, info.value.reason) == (1, "undecodable")  # the first bad one by position
    full = [{"text": f"label {i}"} for i in range(3)]  # max_items candidates, and a text query too
    ranked = asyncio.run(_core(towers, limits=Limits(max_items=3)).rank({"text": "q"}, full, scales))
    assert sorted(r["index"] for r in ranked.results) == [0, 1, 2]
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers).rank({"video": "q"}, labels, scales))
    assert (info.value.index, info.value.reason) == (None, "bad_item")


def test_an_answer_never_mixes_checkpoints(towers, model):
    texts = [f"a sound number {i}" for i in range(4)]  # two chunks
    towers.checkpoints[:] = ["old", "new", "new", "new"]  # the first try mixes, the retry does not
    towers.calls.clear()
    result = asyncio.run(_core(towers).embed("text", texts))
    assert result.checkpoints == {"new"} and towers.calls == [("text", 2)] * 4  # two tries of two chunks
    assert_matches(result.embeddings, model.encode_text(texts), 0.99999)
    towers.checkpoints[:] = ["old", "new"] * 8  # still rolling after every retry: refused, never mixed
    with pytest.raises(MixedCheckpoints):
        asyncio.run(_core(towers).embed("text", texts))
    towers.checkpoints.clear()

    async def other_weights(sha256: str) -> dict:
        raise MixedCheckpoints("the store holds another checkpoint now")

    with pytest.raises(MixedCheckpoints):
        asyncio.run(_core(towers).rank({"text": "q"}, [{"text": "a"}], other_weights))


class CountingPool(ThreadPoolExecutor):
    """A real pool that counts the tasks it is given."""

    def __init__(self) -> None:
        super().__init__(2)
        self.tasks = 0

    def submit(self, *args, **kwargs):
        self.tasks += 1
        return super().submit(*args, **kwargs)


def test_short_texts_tokenize_on_the_loop_and_long_requests_in_the_pool(towers):
    pool = CountingPool()
    core = EmbeddingCore(towers, ["text"], pipelines(), DEFAULT_LIMITS, {"text": 32}, pool)
    short = ["a dog barks", "rain on a tin roof"]
    prepared, _ = asyncio.run(core.decode("text", short))
    assert pool.tasks == 0
    assert [item.ids for item in prepared] == [tuple(ids) for ids in audioclip.tokenize_to_ids(short)]
    many = [f"a sound number {i}" for i in range(12)]
    prepared, _ = asyncio.run(core.decode("text", many))
    assert pool.tasks == 1
    assert [item.ids for item in prepared] == [tuple(ids) for ids in audioclip.tokenize_to_ids(many)]
    with pytest.raises(audioclip.InvalidInputError) as info:  # inline, an error still names its item
        asyncio.run(core.decode("text", ["fine", "7" * 90]))  # 90 characters, 92 tokens (one a digit)
    assert (info.value.index, info.value.reason, pool.tasks) == (1, "text_too_long", 1)
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(core.decode("text", ["fine", 5]))
    assert (info.value.index, pool.tasks) == (1, 2)  # not a string: sent to the pool, as before
    asyncio.run(core.decode("text", ["x" * 200]))  # one long word (BPE is quadratic in it): the pool
    assert pool.tasks == 3
