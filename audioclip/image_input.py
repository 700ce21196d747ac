"""Image decoding and CLIP preprocessing, split so a CPU router and a GPU tower share the work.

The reference transform is PIL ``Resize(224, BICUBIC)`` -> ``CenterCrop(224)`` -> ``convert("RGB")``
-> ``ToTensor`` -> ``Normalize``. :func:`crop_to_uint8` runs the geometric part on the PIL image with
torchvision (the same calls as the reference, so the pixels are identical) and yields a small uint8
array that is cheap to ship; :func:`normalize_pixels` does the arithmetic on any device.
:func:`preprocess_images_torch` is a faster, approximate alternative that resizes tensors on the
device; it is not what the model was trained with (see its docstring for the measured gap).

Decoding untrusted bytes is guarded: the pixel count is checked from the header before any pixel
is decoded, and every Pillow failure becomes an :class:`InvalidInputError` with a ``reason`` tag.
Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) still applies on top of ``max_pixels``.

HEIC/HEIF photos (the iPhone's default) open through pillow-heif's Pillow plugin, registered here,
so they take the same path as every other format.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
import pillow_heif
import torch
import torchvision.transforms.functional as tvf
import torchvision.transforms.v2.functional as tvf2
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from audioclip.errors import InvalidInputError, Reason, describe

pillow_heif.register_heif_opener()

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
DEFAULT_MAX_PIXELS = 50_000_000

ImageLike = bytes | bytearray | memoryview | Image.Image | np.ndarray

# What Pillow raises on corrupt or truncated data while parsing headers, EXIF or pixels.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error)
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> PIL mode


def _check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Refuse huge images before their pixels are allocated (decompression bombs)."""
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit {max_pixels}",
            reason=Reason.TOO_MANY_PIXELS,
        )


def _open_encoded(data: bytes | bytearray | memoryview, max_pixels: int) -> Image.Image:
    """Parse the header only; the pixel count is known before decoding starts."""
    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as err:
        raise InvalidInputError(
            f"image is too large to decode: {describe(err)}", reason=Reason.TOO_MANY_PIXELS
        ) from err
    except _DECODE_ERRORS as err:
        raise InvalidInputError(
            f"cannot decode image bytes: {describe(err)}", reason=Reason.UNDECODABLE
        ) from err
    _check_pixel_count(*image.size, max_pixels)
    return image


def _decode_pixels(image: Image.Image) -> Image.Image:
    """Decode the pixels and apply the EXIF orientation, so a phone photo is upright."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise InvalidInputError(
            f"image is too large to decode: {describe(err)}", reason=Reason.TOO_MANY_PIXELS
        ) from err
    except _DECODE_ERRORS as err:
        raise InvalidInputError(f"cannot decode image: {describe(err)}", reason=Reason.UNDECODABLE) from err


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    """Quantise [0,1] floats to 8 bits the way an encoder would, refusing anything outside."""
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInputError("float image contains NaN or infinity", reason=Reason.BAD_RANGE)
    if values.min() < 0.0 or values.max() > 1.0:
        raise InvalidInputError(
            f"float image values must lie in [0, 1], got [{values.min()}, {values.max()}]",
            reason=Reason.BAD_RANGE,
        )
    return np.rint(values * 255.0).astype(np.uint8)


def _array_to_pil(array: np.ndarray, max_pixels: int) -> Image.Image:
    """Accept HW (grey), HW1 (grey), HW3 (RGB) or HW4 (RGBA) arrays, uint8 or float in [0,1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    channels = 1 if array.ndim == 2 else array.shape[-1]
    if array.ndim not in (2, 3) or channels not in _ARRAY_MODES:
        raise InvalidInputError(
            f"image array has shape {array.shape}; expected [H, W], [H, W, 3] (RGB) or [H, W, 4] (RGBA)",
            reason=Reason.BAD_SHAPE,
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(
            f"image array has an empty dimension: shape {array.shape}", reason=Reason.BAD_SHAPE
        )
    _check_pixel_count(array.shape[1], array.shape[0], max_pixels)
    if np.issubdtype(array.dtype, np.floating):
        array = _float_to_uint8(array)
    elif array.dtype != np.uint8:
        raise InvalidInputError(
            f"image array has dtype {array.dtype}; expected uint8 or float with values in [0, 1]",
            reason=Reason.BAD_DTYPE,
        )
    return Image.fromarray(np.ascontiguousarray(array), mode=_ARRAY_MODES[channels])


def to_pil(
    image: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS, draft_short_side: int | None = None
) -> Image.Image:
    """Turn encoded bytes, a PIL image or a numpy array into an upright, decoded PIL image.

    PIL images get the same EXIF handling as bytes, so ``Image.open(f)`` and ``f.read()`` agree
    (``exif_transpose`` drops the tag, so an already-transposed image is left alone).
    ``draft_short_side`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, keeping
    the short side at least that long: a 4000x3000 photo decodes several times faster.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        opened = _open_encoded(image, max_pixels)
        if draft_short_side and opened.format == "JPEG":
            scale = min(opened.size) / draft_short_side
            if scale >= 2:
                opened.draft("RGB", (int(opened.size[0] / scale), int(opened.size[1] / scale)))
        return _decode_pixels(opened)
    if isinstance(image, Image.Image):
        _check_pixel_count(*image.size, max_pixels)
        return _decode_pixels(image)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, max_pixels)
    raise InvalidInputError(
        f"unsupported image type {type(image).__name__}; pass encoded bytes, a PIL image or a numpy array",
        reason=Reason.UNSUPPORTED_TYPE,
    )


def crop_to_uint8(
    image: ImageLike, size: int = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS, fast_decode: bool = False
) -> np.ndarray:
    """Reference geometry: short side to ``size`` with PIL bicubic, centre crop, then RGB.

    Returns a writable uint8 ``[size, size, 3]`` array. The order (resize before RGB conversion)
    is the reference's, so palette and RGBA images give the reference's pixels too.
    ``fast_decode`` (opt-in, JPEG only) decodes large photos at a reduced scale whose short side
    stays >= 2 x ``size`` before the same bicubic resize; it is not bit-exact with the reference.
    """
    pil = to_pil(image, max_pixels, draft_short_side=2 * size if fast_decode else None)
    try:
        resized = tvf.resize(pil, [size], interpolation=InterpolationMode.BICUBIC)
        rgb = tvf.center_crop(resized, [size, size]).convert("RGB")
    except _DECODE_ERRORS as err:
        raise InvalidInputError(
            f"cannot resize image of mode {pil.mode}: {describe(err)}", reason=Reason.UNDECODABLE
        ) from err
    return np.array(rgb, dtype=np.uint8)


def _normalize_nchw(pixels: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize with torchvision's operation order, so CPU results are bit-identical."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    return pixels.to(torch.float32).div(255).sub(mean).div(std)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` (or ``[H,W,3]``) on any device -> normalised float32 ``[B,3,H,W]``."""
    if pixels.dtype != torch.uint8:
        raise InvalidInputError(f"pixels must be uint8, got {pixels.dtype}", reason=Reason.BAD_DTYPE)
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise InvalidInputError(
            f"pixels have shape {tuple(pixels.shape)}; expected [B, H, W, 3] or [H, W, 3]",
            reason=Reason.BAD_SHAPE,
        )
    return _normalize_nchw(pixels.permute(0, 3, 1, 2))


def preprocess_image(image: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The full reference transform: float32 ``[3, 224, 224]``."""
    return normalize_pixels(torch.from_numpy(crop_to_uint8(image, IMAGE_SIZE, max_pixels)))[0]


def _writable(array: np.ndarray) -> np.ndarray:
    """A contiguous, writable view or copy: torch refuses to wrap read-only numpy memory safely."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _hwc_to_chw_uint8(
    image: torch.Tensor | np.ndarray, index: int, device: torch.device | str
) -> torch.Tensor:
    """Validate one decoded RGB image and move it to the device as ``[3, H, W]`` uint8."""
    tensor = torch.from_numpy(_writable(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(
            f"image {index} is a {type(image).__name__}; expected a uint8 tensor or array",
            index=index,
            reason=Reason.UNSUPPORTED_TYPE,
        )
    if tensor.dtype != torch.uint8:
        raise InvalidInputError(
            f"image {index} has dtype {tensor.dtype}; expected uint8", index=index, reason=Reason.BAD_DTYPE
        )
    if tensor.ndim != 3 or tensor.shape[2] != 3 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise InvalidInputError(
            f"image {index} has shape {tuple(tensor.shape)}; expected non-empty [H, W, 3] RGB",
            index=index,
            reason=Reason.BAD_SHAPE,
        )
    return tensor.to(device, non_blocking=True).permute(2, 0, 1)


def preprocess_images_torch(
    images: Sequence[torch.Tensor | np.ndarray], device: torch.device | str = "cpu", size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Batched on-device approximation of the reference transform: float32 ``[B, 3, size, size]``.

    Each decoded RGB ``[H, W, 3]`` uint8 image is resized on ``device`` with torchvision's
    antialiased tensor bicubic (short side to ``size``), centre cropped and normalised. Resizing the
    uint8 tensor (rounded back to uint8, like PIL) rather than a float tensor keeps it close to the
    PIL path, but not bit-identical (PIL rounds between its two passes): measured on the three golden
    images with torchvision 0.29.1 on CPU, max abs 0.0150 (one 8-bit level, 1/255/std) and mean abs
    4.7e-5 in normalised units; upscaling random noise reached two levels (0.029). The float-tensor
    path of the CLIP demo differs by up to 0.075 (AUDIOCLIP.md section 5). Use :func:`preprocess_image`
    where reference parity matters.
    """
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.float32, device=device)
    crops = []
    for index, image in enumerate(images):
        chw = _hwc_to_chw_uint8(image, index, device)
        resized = tvf2.resize(chw, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        crops.append(tvf2.center_crop(resized, [size, size]))
    return _normalize_nchw(torch.stack(crops))
