"""Image decoding and preprocessing: golden parity, input forms, EXIF, hostile bytes, the torch path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from audioclip import image_input as ii
from audioclip.errors import InvalidInputError

GOLDEN = Path(__file__).parent / "data" / "golden"
IMAGE_FILES = ["astronaut.png", "coffee.png", "rocket.jpg"]


def _file_bytes(name: str) -> bytes:
    return (GOLDEN / "inputs" / name).read_bytes()


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _reason(excinfo: pytest.ExceptionInfo[InvalidInputError]) -> str:
    return excinfo.value.reason


@pytest.fixture(scope="module")
def golden_inputs() -> np.ndarray:
    return np.load(GOLDEN / "golden.npz")["image_input"]


@pytest.mark.parametrize("index", range(3))
def test_golden_parity_from_file_bytes(index: int, golden_inputs: np.ndarray) -> None:
    ours = ii.preprocess_image(_file_bytes(IMAGE_FILES[index]))
    assert ours.shape == (3, 224, 224)
    assert ours.dtype == torch.float32
    assert np.abs(ours.numpy() - golden_inputs[index]).max() <= 1e-5


def test_bytes_ndarray_and_pil_agree() -> None:
    data = _file_bytes("astronaut.png")
    pil = Image.open(io.BytesIO(data))
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    from_bytes = ii.preprocess_image(data)
    assert torch.equal(from_bytes, ii.preprocess_image(pil))
    assert torch.equal(from_bytes, ii.preprocess_image(pixels))
    assert torch.equal(from_bytes, ii.preprocess_image(bytearray(data)))
    assert torch.equal(from_bytes, ii.preprocess_image(memoryview(data)))


def test_normalize_matches_torchvision_to_tensor_normalize() -> None:
    crop = ii.crop_to_uint8(_file_bytes("coffee.png"))
    reference = transforms.Normalize(ii.CLIP_MEAN, ii.CLIP_STD)(transforms.ToTensor()(Image.fromarray(crop)))
    ours = ii.normalize_pixels(torch.from_numpy(crop))
    assert ours.shape == (1, 3, 224, 224)
    assert (ours[0] - reference).abs().max().item() <= 1e-6
    batch = ii.normalize_pixels(torch.from_numpy(np.stack([crop, crop[::-1].copy()])))
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[0], ours[0])


def test_crop_geometry_short_side_and_center() -> None:
    wide = np.zeros((100, 300, 3), dtype=np.uint8)
    wide[:, 150:, :] = 255  # right half white: the centre crop must show both halves
    crop = ii.crop_to_uint8(wide)
    assert crop.shape == (224, 224, 3)
    assert crop.dtype == np.uint8
    assert crop.flags.writeable
    assert crop[:, :100].max() == 0
    assert crop[:, 124:].min() == 255


def test_grayscale_and_single_channel_arrays() -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (90, 130), dtype=np.uint8)
    crop = ii.crop_to_uint8(gray)
    assert np.array_equal(crop[..., 0], crop[..., 1])
    assert np.array_equal(crop[..., 0], crop[..., 2])
    assert np.array_equal(crop, ii.crop_to_uint8(np.repeat(gray[..., None], 3, axis=2)))
    assert np.array_equal(crop, ii.crop_to_uint8(gray[..., None]))


def test_rgba_array_with_opaque_alpha_equals_rgb() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((120, 90, 1), 255, dtype=np.uint8)], axis=2)
    assert np.array_equal(ii.crop_to_uint8(rgba), ii.crop_to_uint8(rgb))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_array_quantised_to_the_same_uint8(dtype: type) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    as_float = (rgb.astype(np.float64) / 255.0).astype(dtype)
    assert np.array_equal(np.asarray(ii.to_pil(as_float)), rgb)
    assert np.array_equal(ii.crop_to_uint8(as_float), ii.crop_to_uint8(rgb))


@pytest.mark.parametrize("bad", [1.5, -0.01, np.nan, np.inf])
def test_float_array_out_of_range_rejected(bad: float) -> None:
    array = np.full((8, 8, 3), 0.5, dtype=np.float32)
    array[3, 4, 1] = bad
    with pytest.raises(InvalidInputError) as info:
        ii.to_pil(array)
    assert _reason(info) == "bad_range"


def test_exif_orientation_applied() -> None:
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:20, :30] = (255, 0, 0)  # red block in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    upright = ii.to_pil(data)
    assert upright.size == (40, 60)
    assert np.array_equal(np.asarray(upright), np.rot90(stored, k=-1))
    assert np.asarray(upright)[5, 35, 0] > 200  # the red corner moved to the top right
    assert torch.equal(ii.preprocess_image(data), ii.preprocess_image(np.rot90(stored, k=-1)))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose IHDR claims a huge size, as a hostile upload would."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_header_claiming_huge_size_is_refused() -> None:
    assert Image.open(io.BytesIO(_png_claiming(100, 100))).size == (100, 100)  # the fixture is a valid header
    with pytest.raises(InvalidInputError) as info:
        ii.to_pil(_png_claiming(100_000, 100_000))
    assert _reason(info) == "too_many_pixels"


def test_small_file_with_many_pixels_refused_before_decoding() -> None:
    data = _encode(Image.new("L", (4000, 3000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(InvalidInputError) as info:
        ii.to_pil(data, max_pixels=1_000_000)
    assert _reason(info) == "too_many_pixels"
    assert "12000000" in str(info.value)
    assert ii.to_pil(data, max_pixels=12_000_000).size == (4000, 3000)


def test_pixel_limit_applies_to_arrays_and_pil_images() -> None:
    array = np.zeros((100, 100, 3), dtype=np.uint8)
    for item in (array, Image.fromarray(array)):
        with pytest.raises(InvalidInputError) as info:
            ii.crop_to_uint8(item, max_pixels=9_999)
        assert _reason(info) == "too_many_pixels"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_file_bytes("rocket.jpg")[:5000], id="truncated-jpeg"),
        pytest.param(np.random.default_rng(4).bytes(4096), id="random-bytes"),
        pytest.param(b"\x00" + _file_bytes("astronaut.png")[1:], id="wrong-magic"),
        pytest.param(b"", id="empty"),
    ],
)
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(InvalidInputError) as info:
        ii.preprocess_image(data)
    assert _reason(info) == "undecodable"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros(10, dtype=np.uint8), "bad_shape"),
        (np.zeros((10, 10, 2), dtype=np.uint8), "bad_shape"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "bad_shape"),
        (np.zeros((2, 10, 10, 3), dtype=np.uint8), "bad_shape"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "bad_shape"),
        (np.zeros((10, 0), dtype=np.uint8), "bad_shape"),
        (np.zeros((10, 10, 3), dtype=np.uint16), "bad_dtype"),
        (np.zeros((10, 10, 3), dtype=np.int64), "bad_dtype"),
        (np.zeros((10, 10), dtype=bool), "bad_dtype"),
    ],
)
def test_bad_arrays(array: np.ndarray, reason: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        ii.to_pil(array)
    assert _reason(info) == reason
    assert str(array.shape) in str(info.value) or str(array.dtype) in str(info.value)


@pytest.mark.parametrize(
    "item", ["astronaut.png", None, [[0, 0, 0]], torch.zeros(4, 4, 3, dtype=torch.uint8)]
)
def test_unsupported_types(item: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        ii.to_pil(item)  # type: ignore[arg-type]
    assert _reason(info) == "unsupported_type"


def test_normalize_pixels_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError) as info:
        ii.normalize_pixels(torch.zeros(1, 4, 4, 3))
    assert _reason(info) == "bad_dtype"
    with pytest.raises(InvalidInputError) as info:
        ii.normalize_pixels(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    assert _reason(info) == "bad_shape"


def _decoded(name: str) -> np.ndarray:
    return np.asarray(ii.to_pil(_file_bytes(name)).convert("RGB"))


def test_torch_path_deviation_from_pil_path() -> None:
    reference = torch.stack([ii.preprocess_image(_file_bytes(name)) for name in IMAGE_FILES])
    ours = ii.preprocess_images_torch([_decoded(name) for name in IMAGE_FILES])
    assert ours.shape == reference.shape
    diff = (ours - reference).abs()
    max_abs, mean_abs = diff.max().item(), diff.mean().item()
    # Measured with torchvision 0.29.1 on CPU: max 0.0150 (one 8-bit level), mean 4.7e-5.
    message = f"torch path vs PIL path: max abs {max_abs:.4g}, mean abs {mean_abs:.3g}"
    assert max_abs < 0.02, message
    assert mean_abs < 1e-3, message


def test_torch_path_accepts_tensors_and_flags_bad_items() -> None:
    arrays = [_decoded("rocket.jpg"), _decoded("coffee.png")]
    from_arrays = ii.preprocess_images_torch(arrays)
    assert torch.equal(from_arrays, ii.preprocess_images_torch([torch.from_numpy(a.copy()) for a in arrays]))
    assert ii.preprocess_images_torch([]).shape == (0, 3, 224, 224)
    assert ii.preprocess_images_torch(arrays, size=64).shape == (2, 3, 64, 64)
    with pytest.raises(InvalidInputError) as info:
        ii.preprocess_images_torch([arrays[0], np.zeros((8, 8), dtype=np.uint8)])
    assert (info.value.index, info.value.reason) == (1, "bad_shape")
    with pytest.raises(InvalidInputError) as info:
        ii.preprocess_images_torch([arrays[0].astype(np.float32)])
    assert (info.value.index, info.value.reason) == (0, "bad_dtype")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_path_on_cuda_matches_cpu() -> None:
    arrays = [_decoded(name) for name in IMAGE_FILES]
    on_gpu = ii.preprocess_images_torch(arrays, device="cuda")
    assert on_gpu.device.type == "cuda"
    cpu = ii.preprocess_images_torch(arrays)
    reference = torch.stack([ii.preprocess_image(_file_bytes(name)) for name in IMAGE_FILES])
    gpu_vs_pil = (on_gpu.cpu() - reference).abs()
    message = f"cuda vs PIL: max abs {gpu_vs_pil.max().item():.4g}, mean abs {gpu_vs_pil.mean().item():.3g}"
    assert gpu_vs_pil.max().item() < 0.02, message
    assert (on_gpu.cpu() - cpu).abs().max().item() < 0.02, message
    crops = torch.from_numpy(np.stack([ii.crop_to_uint8(a) for a in arrays])).cuda()
    assert (ii.normalize_pixels(crops).cpu() - reference).abs().max().item() <= 1e-6


def test_fast_decode_of_a_large_jpeg_is_close_to_the_exact_path():
    """Opt-in JPEG draft decoding: measured on a 4000x3000 photo, 6.8x faster, max deviation
    0.028 (two 8-bit levels) and mean 0.003 in normalised units."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 4000)[None, :, None] * np.ones((3000, 1, 3))
    pixels = np.clip(ramp + rng.integers(0, 40, (3000, 4000, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    exact = ii.normalize_pixels(torch.from_numpy(ii.crop_to_uint8(buf.getvalue())))
    fast = ii.normalize_pixels(torch.from_numpy(ii.crop_to_uint8(buf.getvalue(), fast_decode=True)))
    diff = (exact - fast).abs()
    assert 0 < float(diff.max()) < 0.06 and float(diff.mean()) < 0.01, (float(diff.max()), float(diff.mean()))
    png = io.BytesIO()
    Image.fromarray(pixels[:600, :800]).save(png, "PNG")  # not a JPEG: fast_decode changes nothing
    assert np.array_equal(
        ii.crop_to_uint8(png.getvalue(), fast_decode=True), ii.crop_to_uint8(png.getvalue())
    )
