"""Golden parity: the public API on synthetic-v1 "shared" weights reproduces the reference outputs.

Tolerances are those of the golden README: preprocessing 1e-5 abs; image/text relative
1e-4 and cosine 0.99999; audio relative 2e-2 and cosine 0.9999 (rounding-sensitive front end).
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import INPUTS, max_rel, row_cosines

import audioclip

IMAGES = ("astronaut.png", "coffee.png", "rocket.jpg")


def test_image_preprocessing_from_file_bytes(golden):
    pixels = torch.stack([audioclip.preprocess_image((INPUTS / name).read_bytes()) for name in IMAGES])
    diff = np.abs(pixels.numpy() - golden["image_input"]).max()
    assert diff <= 1e-5, f"preprocessing max abs diff {diff}"


def test_image_embeddings(model, golden):
    pixels = torch.stack([audioclip.preprocess_image((INPUTS / name).read_bytes()) for name in IMAGES])
    ours = model.encode_image(pixels).numpy()
    assert ours.shape == (3, 1024) and ours.dtype == np.float32
    assert max_rel(ours, golden["image_embedding"]) <= 1e-4
    assert row_cosines(ours, golden["image_embedding"]).min() >= 0.99999


def test_tokens(manifest, golden):
    tokens = audioclip.tokenize(manifest["texts"])
    assert tokens.dtype == torch.long and tokens.shape == (4, 77)
    assert torch.equal(tokens, torch.from_numpy(golden["text_tokens"]))


def test_text_embeddings_from_strings(model, manifest, golden):
    ours = model.encode_text(manifest["texts"]).numpy()
    assert max_rel(ours, golden["text_embedding"]) <= 1e-4
    assert row_cosines(ours, golden["text_embedding"]).min() >= 0.99999


def test_text_embeddings_from_golden_tokens(model, golden):
    ours = model.encode_tokens(torch.from_numpy(golden["text_tokens"])).numpy()
    assert max_rel(ours, golden["text_embedding"]) <= 1e-4
    assert row_cosines(ours, golden["text_embedding"]).min() >= 0.99999


def test_audio_embeddings(model, golden):
    for i in range(3):
        clip = torch.from_numpy(golden[f"audio_input_{i}"])
        ours = model.encode_audio(clip[None])[0].numpy()
        ref = golden[f"audio_embedding_{i}"]
        assert max_rel(ours, ref) <= 2e-2, f"clip {i}"
        assert row_cosines(ours, ref).min() >= 0.9999, f"clip {i}"


def test_audio_from_wav_files_matches_stored_int16_samples(golden):
    """load_audio on the golden WAV files gives the stored samples up to the dither (sigma 32).

    The embeddings are compared on the stored arrays only: the dither fills digital silence,
    which moves the log spectrogram of silent bins from -180 dB to about -60 dB."""
    for i, name in enumerate(("speech_dog_44k.wav", "chord_44k.wav", "noise_stereo_44k.wav")):
        ours = audioclip.load_audio((INPUTS / name).read_bytes())
        stored = golden[f"audio_input_{i}"]
        assert ours.shape == stored.shape
        assert np.abs(ours - stored).max() < 32 * 8  # dither only, 8 sigma


def test_logit_scales(model):
    scales = model.logit_scales
    assert scales == audioclip.LogitScales(100.0, 100.0, 100.0)  # exp(log 100), clamped at 100


def test_folded_batchnorm_towers_keep_golden_parity(shared_weights, golden):
    """Folding BatchNorm into the convs (the served default for audio) changes only rounding."""
    model = audioclip.AudioCLIP.from_state_dict(shared_weights, towers=("image", "audio"))
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.use_channels_last(True).fold_batchnorm()
    assert batchnorms == 55 + 58  # image: stem 3 + 16 blocks x 3 + 4 downsamples; audio: + 5 gates
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.audio.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    image = model.encode_image(torch.from_numpy(golden["image_input"])).numpy()
    assert max_rel(image, golden["image_embedding"]) <= 1e-4
    assert row_cosines(image, golden["image_embedding"]).min() >= 0.99999
    for i in range(3):
        ours = model.encode_audio(torch.from_numpy(golden[f"audio_input_{i}"])[None])[0].numpy()
        ref = golden[f"audio_embedding_{i}"]
        assert max_rel(ours, ref) <= 2e-2, f"clip {i}"
        assert row_cosines(ours, ref).min() >= 0.9999, f"clip {i}"
