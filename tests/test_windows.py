"""Long recordings cut into windows: the rule, each window's vector against the same samples sent
alone, pooling, determinism, the limits, and the timeline of /v1/rank (core level, no Ray)."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from conftest import row_cosines
from test_core import InProcessTowers

import audioclip
from audioclip.audio_input import SAMPLE_RATE, load_audio
from audioclip.pipeline import DEFAULT_LIMITS, AudioItem, Limits, Options, pipelines
from audioclip.windows import WindowSpec, cut, fit_length, pooled
from deployments.core import EmbeddingCore


def _wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples.T, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _scene(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """``[1, N]`` float32: tones that change every second, so windows differ."""
    t = np.arange(int(seconds * rate)) / rate
    freq = 300.0 + 400.0 * (np.floor(t) % 5)
    return (0.4 * np.sin(2 * np.pi * np.cumsum(freq) / rate))[None].astype(np.float32)


@pytest.fixture(scope="module")
def towers(model):
    return InProcessTowers(model)


def _core(towers, limits: Limits = DEFAULT_LIMITS, chunk: int = 3) -> EmbeddingCore:
    return EmbeddingCore(
        towers,
        ["text", "audio"],
        pipelines(),
        limits,
        {"text": 8, "audio": chunk},
        ThreadPoolExecutor(2),
        chunks_in_flight=2,
    )


def test_the_window_rule_reaches_the_end_and_pads_the_tail_at_the_centre():
    spec = WindowSpec(5.0, 2.5)
    rate = 10
    clip = np.arange(120, dtype=np.float32)[None]  # 12 s at 10 Hz
    parts, times = cut(clip, spec, rate)
    assert spec.count(120, rate) == len(parts) == 4
    assert [(t.start_s, t.end_s) for t in times] == [(0.0, 5.0), (2.5, 7.5), (5.0, 10.0), (7.5, 12.0)]
    assert all(p.shape == (1, 50) for p in parts)
    assert np.shares_memory(parts[1], clip)  # full windows are views, not copies
    np.testing.assert_array_equal(parts[-1], fit_length(clip[:, 75:], 50))  # centred zeros on both sides
    assert parts[-1][0, 0] == 0 and parts[-1][0, -1] == 0
    assert WindowSpec(5.0).count(30, rate) == 1  # a clip shorter than a window is one padded window
    assert WindowSpec(5.0).count(100, rate) == 2 and WindowSpec(5.0).count(102, rate) == 3
    assert WindowSpec(5.0).count(101, rate) == 2  # a tail of 0.1 s is no window of its own
    assert spec.max_seconds(4) == 12.5  # the longest clip that makes 4 windows
    bad_specs = (
        dict(window_s=0.01),
        dict(window_s=5.0, hop_s=0.0),
        dict(window_s=float("nan")),
        dict(window_s=1e308),  # would overflow the sample count
        dict(window_s=5.0, hop_s=float("inf")),
    )
    for bad in bad_specs:
        with pytest.raises(audioclip.InvalidInputError) as info:
            WindowSpec(**bad)
        assert info.value.reason == "bad_window"


def test_each_window_is_the_vector_of_its_samples_sent_alone(towers):
    core = _core(towers)
    wav = _wav(_scene(7.0))
    windows = WindowSpec(2.0, 1.5, "none")
    result = asyncio.run(core.embed("audio", [wav], options=Options(windows=windows)))
    clip = load_audio(wav)
    spans = [(row.start_s, row.end_s) for row in result.windows]
    assert spans == [(0.0, 2.0), (1.5, 3.5), (3.0, 5.0), (4.5, 6.5), (6.0, 7.0)]
    assert {row.item for row in result.windows} == {0}
    alone = [
        fit_length(clip[:, round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)], 2 * SAMPLE_RATE)
        for a, b in spans
    ]
    each = np.concatenate([asyncio.run(core.embed("audio", [AudioItem(a)])).embeddings for a in alone])
    assert row_cosines(result.embeddings, each).min() > 0.99999
    again = asyncio.run(core.embed("audio", [wav], options=Options(windows=windows)))
    np.testing.assert_array_equal(again.embeddings, result.embeddings)  # repeatable: no random crop
    assert len({tuple(np.round(r[:4], 3)) for r in result.embeddings}) > 1  # the windows do differ


def test_pooling_combines_the_normalised_windows_of_each_clip(towers):
    core = _core(towers)
    clips = [_wav(_scene(4.0)), _wav(_scene(2.5))]
    none = asyncio.run(core.embed("audio", clips, options=Options(windows=WindowSpec(2.0, pool="none"))))
    assert [row.item for row in none.windows] == [0, 0, 1, 1]
    for pool in ("mean", "max"):
        result = asyncio.run(core.embed("audio", clips, options=Options(windows=WindowSpec(2.0, pool=pool))))
        assert result.embeddings.shape == (2, 1024)
        assert [(r.item, r.windows, r.end_s) for r in result.windows] == [(0, 2, 4.0), (1, 2, 2.5)]
        expected = pooled(none.embeddings, [2, 2], pool)
        np.testing.assert_allclose(result.embeddings, expected, rtol=1e-5, atol=1e-6)
    empty = asyncio.run(core.embed("audio", [], options=Options(windows=WindowSpec(2.0, pool="mean"))))
    assert empty.embeddings.shape == (0, 1024) and empty.windows == []  # found by schemathesis: was a 500
    unit = none.embeddings / np.linalg.norm(none.embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled(none.embeddings, [2, 2], "mean")[1], unit[2:].mean(0), rtol=1e-6)


def test_window_limits_refuse_before_the_tower_is_called(towers):
    limits = Limits(max_windows=3, max_windowed_audio_seconds=60.0)
    core = _core(towers, limits)
    towers.calls.clear()
    with pytest.raises(audioclip.InvalidInputError) as info:  # 8 s of 2-s windows: over 3 windows
        asyncio.run(core.embed("audio", [_wav(_scene(8.0))], options=Options(windows=WindowSpec(2.0))))
    assert info.value.reason == "audio_too_long" and info.value.index == 0
    with pytest.raises(audioclip.InvalidInputError) as info:  # 2 + 2 windows in one request
        clips = [_wav(_scene(4.0)), _wav(_scene(4.0))]
        asyncio.run(core.embed("audio", clips, options=Options(windows=WindowSpec(2.0))))
    assert info.value.reason == "too_many_windows"
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(core.embed("text", ["a"], options=Options(windows=WindowSpec(2.0))))
    assert info.value.reason == "bad_window"
    assert towers.calls == []
    # windowed, a clip may be longer than the unwindowed limit
    long_ok = Limits(max_audio_seconds=3.0, max_windows=10)
    result = asyncio.run(
        _core(towers, long_ok).embed("audio", [_wav(_scene(5.0))], options=Options(windows=WindowSpec(2.5)))
    )
    assert result.embeddings.shape == (1, 1024)
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(_core(towers, long_ok).embed("audio", [_wav(_scene(5.0))]))
    assert info.value.reason == "audio_too_long"


def test_a_windowed_rank_query_gives_a_timeline(towers, model, one_torch_thread):
    core = _core(towers)

    async def scales(sha256: str) -> dict:
        return model.logit_scales._asdict()

    wav = _wav(_scene(5.0))
    labels = [{"text": "a dog barking"}, {"text": "rain"}, {"text": "a siren"}]
    ranked = asyncio.run(core.rank({"audio": wav}, labels, scales, windows=WindowSpec(2.0)))
    assert [(e["start_s"], e["end_s"]) for e in ranked.timeline] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]
    clip = load_audio(wav)
    for entry in ranked.timeline:
        assert abs(sum(r["probability"] for r in entry["results"]) - 1) < 1e-6
        start, end = (round(entry[k] * SAMPLE_RATE) for k in ("start_s", "end_s"))
        alone = AudioItem(fit_length(clip[:, start:end], 2 * SAMPLE_RATE))
        direct = asyncio.run(core.rank({"audio": alone}, labels, scales))
        assert [r["index"] for r in entry["results"]] == [r["index"] for r in direct.results]
        got = [r["probability"] for r in entry["results"]]
        np.testing.assert_allclose(got, [r["probability"] for r in direct.results], rtol=1e-4)
    assert sorted(r["index"] for r in ranked.results) == [0, 1, 2]  # the whole clip, ranked too
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(core.rank({"text": "q"}, labels, scales, windows=WindowSpec(2.0)))
    assert (info.value.index, info.value.reason) == (None, "bad_window")
    with pytest.raises(audioclip.InvalidInputError) as info:
        asyncio.run(core.rank({"audio": b"not audio"}, labels, scales, windows=WindowSpec(2.0)))
    assert (info.value.index, info.value.reason) == (None, "undecodable")
