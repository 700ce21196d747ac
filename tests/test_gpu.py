"""The accelerator path: towers on CUDA agree with the golden vectors (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel, row_cosines

import audioclip

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model(shared_checkpoint):
    torch.backends.cuda.matmul.allow_tf32 = False  # golden vectors are fp32; TF32 is not
    torch.backends.cudnn.allow_tf32 = False
    return audioclip.AudioCLIP.from_checkpoint(shared_checkpoint, device="cuda:0")


def test_cuda_fp32_matches_golden(cuda_model, golden):
    image = cuda_model.encode_image(torch.from_numpy(golden["image_input"])).cpu().numpy()
    assert max_rel(image, golden["image_embedding"]) <= 1e-4
    text = cuda_model.encode_tokens(torch.from_numpy(golden["text_tokens"])).cpu().numpy()
    assert max_rel(text, golden["text_embedding"]) <= 1e-4
    for i in range(3):
        audio = cuda_model.encode_audio(torch.from_numpy(golden[f"audio_input_{i}"])[None])[0].cpu().numpy()
        assert row_cosines(audio, golden[f"audio_embedding_{i}"]).min() >= 0.9999


def test_cuda_fp16_towers_stay_close(shared_checkpoint, golden):
    model = audioclip.AudioCLIP.from_checkpoint(
        shared_checkpoint, device="cuda", towers=("image", "text"), dtype="fp16"
    )
    image = model.encode_image(torch.from_numpy(golden["image_input"])).cpu().numpy()
    text = model.encode_tokens(torch.from_numpy(golden["text_tokens"])).cpu().numpy()
    assert row_cosines(image, golden["image_embedding"]).min() >= 0.999
    assert row_cosines(text, golden["text_embedding"]).min() >= 0.999


def test_cuda_fp16_folded_nhwc_image_tower_stays_close(shared_checkpoint, golden):
    """The GPU default layout of the image tower (NHWC, BatchNorm folded) in fp16."""
    model = audioclip.AudioCLIP.from_checkpoint(
        shared_checkpoint, device="cuda", towers=("image",), dtype="fp16"
    )
    model.use_channels_last(True).fold_batchnorm()
    image = model.encode_image(torch.from_numpy(golden["image_input"])).cpu().numpy()
    assert row_cosines(image, golden["image_embedding"]).min() >= 0.999
