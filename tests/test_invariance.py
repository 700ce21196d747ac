"""Batching invariances the serving layer relies on: padding and batch-mates never change an embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import audioclip
from audioclip.batching import length_groups, pad_token_ids
from audioclip.tokenizer import tokenize_to_ids

TEXTS = [
    "a dog barking",
    "the sound of rain on a tin roof during a long summer thunderstorm at night",
    "",
    "piano",
    "café crème — 3.14 dB",
]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_text_padding_to_77_equals_padding_to_the_longest(model):
    padded_77 = audioclip.tokenize(TEXTS)
    longest = pad_token_ids(audioclip.tokenize_to_ids(TEXTS))
    assert longest.shape[1] < 77
    assert _close(model.encode_tokens(longest), model.encode_tokens(padded_77))


def test_text_after_eot_is_ignored(model):
    tokens = audioclip.tokenize(TEXTS)
    noisy = tokens.clone()
    for row in range(len(TEXTS)):
        end = int(tokens[row].argmax()) + 1
        noisy[row, end:] = torch.randint(1, 49000, (77 - end,))
    assert torch.equal(model.encode_tokens(noisy), model.encode_tokens(tokens))


@pytest.mark.parametrize("batch_size", [1, 2, 8, 32])
def test_text_batch_sizes_agree(model, batch_size):
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(batch_size)]
    together = model.encode_text(texts)
    alone = torch.cat([model.encode_text([t]) for t in texts])
    assert together.shape == (batch_size, 1024)
    assert _close(together, alone)


def test_image_batch_independence(model, golden):
    pixels = torch.from_numpy(golden["image_input"])
    rng = torch.Generator().manual_seed(0)
    others = torch.randn(7, 3, 224, 224, generator=rng)
    alone = model.encode_image(pixels[:1])
    mixed = model.encode_image(torch.cat([others[:3], pixels[:1], others[3:]]))
    assert _close(mixed[3:4], alone)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 2, 8, 32])
def test_image_batch_sizes_agree(model, golden, batch_size):
    pixels = torch.from_numpy(golden["image_input"])
    batch = pixels[torch.arange(batch_size) % 3]
    out = model.encode_image(batch)
    assert _close(out, torch.from_numpy(golden["image_embedding"])[torch.arange(batch_size) % 3], rel=1e-4)


@pytest.mark.parametrize("norm", ["running", "per_clip"])
def test_audio_batch_independence(shared_weights, golden, norm, one_torch_thread):
    model = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("audio",), audio_norm=norm)
    clip = torch.from_numpy(golden["audio_input_1"][:, :44100])  # 1 s
    rng = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 1, 44100, generator=rng) * 3000
    alone = model.encode_audio(clip[None])
    mixed = model.encode_audio(torch.cat([noise[:2], clip[None], noise[2:]]))
    assert _close(mixed[2:3], alone, rel=1e-5)


def test_audio_norm_modes_differ_and_validate(shared_weights, golden):
    clip = torch.from_numpy(golden["audio_input_0"][:, :44100])[None]
    running = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("audio",))
    per_clip = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("audio",), audio_norm="per_clip")
    a, b = running.encode_audio(clip), per_clip.encode_audio(clip)
    cos = torch.nn.functional.cosine_similarity(a, b).item()
    assert cos < 0.999, "per-clip statistics must change the features"
    with pytest.raises(ValueError, match="audio_norm"):
        running.set_audio_norm("batch")


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 2, 8, 32])
def test_audio_batch_sizes_agree(model, golden, batch_size):
    clips = torch.from_numpy(
        np.stack([golden["audio_input_1"][:, i * 4410 : i * 4410 + 22050] for i in range(4)])
    )
    batch = clips[torch.arange(batch_size) % 4]
    together = model.encode_audio(batch)
    alone = torch.cat([model.encode_audio(clips[i : i + 1]) for i in range(4)])[torch.arange(batch_size) % 4]
    assert _close(together, alone, rel=1e-4)


def test_stereo_is_the_sum_of_channel_features(model, golden):
    stereo = torch.from_numpy(golden["audio_input_2"])[None]
    audio = model.audio
    with torch.inference_mode():
        left = audio.features(audio.log_spectrogram(stereo[:, :1]))
        right = audio.features(audio.log_spectrogram(stereo[:, 1:]))
        expected = audio.fc(left + right)
    assert _close(model.encode_audio(stereo), expected, rel=1e-5)


def test_encode_audio_rejects_bad_shapes(model):
    with pytest.raises(audioclip.InvalidInputError):
        model.encode_audio(torch.zeros(1, 3, 1000))
    with pytest.raises(audioclip.InvalidInputError):
        model.encode_audio(torch.zeros(1000))
    with pytest.raises(audioclip.InvalidInputError):
        model.encode_image(torch.zeros(1, 3, 225, 225))


def test_fbsp_filter_bank_is_cached_and_follows_its_parameters(shared_weights):
    model = audioclip.AudioCLIP.from_state_dict(
        {k: v.copy() for k, v in shared_weights.items()}, towers=("audio",)
    )
    fbsp = model.audio.fbsp
    with torch.inference_mode():
        first = fbsp.cached_weights()
        assert fbsp.cached_weights() is first  # built once, reused
    with torch.no_grad():
        fbsp.fc.add_(0.5)  # an in-place parameter update must invalidate the cache
    with torch.inference_mode():
        second = fbsp.cached_weights()
        assert second is not first
        fresh = fbsp.complex_weights()
    assert torch.equal(second[0], fresh[0]) and torch.equal(second[1], fresh[1])


def test_channels_last_audio_and_image_agree_with_nchw(shared_weights, golden):
    nchw = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("image", "audio"))
    nhwc = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("image", "audio")).use_channels_last()
    assert nhwc.audio.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    clip = torch.from_numpy(golden["audio_input_0"][:, :44100])[None]
    assert _close(nhwc.encode_audio(clip), nchw.encode_audio(clip), rel=1e-4)
    pixels = torch.from_numpy(golden["image_input"][:1])
    assert _close(nhwc.encode_image(pixels), nchw.encode_image(pixels), rel=1e-5)


def test_folding_refuses_per_clip_audio_statistics(shared_weights):
    model = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("audio",), audio_norm="per_clip")
    with pytest.raises(ValueError, match="per_clip"):
        model.fold_batchnorm()
    model.set_audio_norm("running")
    model.fold_batchnorm()
    with pytest.raises(ValueError, match="folded"):
        model.set_audio_norm("per_clip")


def test_length_groups_split_mixed_batches_and_keep_uniform_ones():
    mixed = [12] * 24 + [60] * 8
    groups = length_groups(mixed, overhead_tokens=64)
    assert sorted(i for g in groups for i in g) == list(range(32))  # a partition
    assert [sorted(g) for g in groups] == [list(range(24)), list(range(24, 32))]
    assert length_groups([10, 11, 12, 13, 14], overhead_tokens=64) == [[0, 1, 2, 3, 4]]
    assert length_groups(mixed, overhead_tokens=10_000) == [sorted(range(32), key=lambda i: mixed[i])]
    assert length_groups([], overhead_tokens=64) == []


def test_text_embeddings_do_not_depend_on_the_length_groups(model):
    long = [f"a long description number {i} of " + "birds singing " * 12 for i in range(3)]
    texts = ["a dog", "rain", *long]
    ids = tokenize_to_ids(texts, model.config.context_length)
    together = model.encode_tokens(pad_token_ids(ids))
    assert len(length_groups([len(x) for x in ids], overhead_tokens=0)) >= 2
    apart = model.encode_token_ids(ids, overhead_tokens=0)
    assert _close(apart, together, rel=1e-5)
    assert _close(model.encode_text(texts), together, rel=1e-5)  # encode_text splits the same way
