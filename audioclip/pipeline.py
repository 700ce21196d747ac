"""One path per modality from an input item to an embedding: decode -> collate -> forward.

``decode`` (CPU, thread-safe) turns one client item into a prepared item under the ``Limits``:
text -> token ids under the 77-token rule, image -> the reference's 224x224x3 uint8 crop, audio ->
float32 ``[C, N]`` at 44.1 kHz. Prepared items are small and typed, so they cross processes as they
are: the router decodes, a tower only collates and runs forwards. ``collate`` cuts a batch of
prepared items into forwards (texts by length, clips by shape) as tensors on the device, and
``forward`` runs them and returns rows in input order. The served towers, the in-process CLI and
both benchmarks call these same functions, so raw and served figures measure the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypeVar

import numpy as np
import torch

from .audio_input import DEFAULT_MAX_SECONDS, SAMPLE_RATE, load_audio
from .batching import equal_groups, length_groups, pad_token_ids, split_overhead_tokens
from .errors import InvalidInputError, Reason
from .image_input import DEFAULT_MAX_PIXELS, IMAGE_SIZE, crop_to_uint8, normalize_pixels
from .tokenizer import CONTEXT_LENGTH, EOT_TOKEN, tokenize_to_ids
from .windows import WindowSpec, fit_length

if TYPE_CHECKING:
    from .model import AudioCLIP


@dataclass(frozen=True)
class Limits:
    """What a request and its items may be; checked while decoding, from the header where it tells."""

    max_items: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_audio_seconds: float = DEFAULT_MAX_SECONDS
    max_text_chars: int = 20_000
    max_windows: int = 4096  # windows per request
    max_windowed_audio_seconds: float = 7200.0  # a clip's length when it is cut into windows

    def for_windows(self, windows: WindowSpec | None) -> Limits:
        """The limits of a windowed request: a clip may be as long as the windowed limit allows and
        as makes at most ``max_windows`` windows (so the header's duration refuses it before
        decoding)."""
        if windows is None:
            return self
        seconds = min(self.max_windowed_audio_seconds, windows.max_seconds(self.max_windows))
        return replace(self, max_audio_seconds=seconds)


@dataclass(frozen=True)
class Options:
    """Per-request decoding choices."""

    truncate: bool = False  # cut texts over the context length instead of refusing them
    windows: WindowSpec | None = None  # cut clips into windows (audio), instead of one clip each


DEFAULT_LIMITS = Limits()
DEFAULT_OPTIONS = Options()


@dataclass(frozen=True)
class TextItem:
    """``[SOT, *bpe, EOT]`` token ids, at most the context length."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageItem:
    """A uint8 ``[224, 224, 3]`` crop, or float32 ``[3, 224, 224]`` CLIP-normalised pixels
    (``normalized``: sent with ``preprocess=false``)."""

    pixels: np.ndarray
    normalized: bool = False


@dataclass(frozen=True)
class AudioItem:
    """float32 ``[C, N]`` (C in 1, 2), int16 range, 44.1 kHz."""

    samples: np.ndarray


Prepared = TextItem | ImageItem | AudioItem
P = TypeVar("P", TextItem, ImageItem, AudioItem)


class Group(NamedTuple):
    """One forward: the batch positions it answers and its input tensor."""

    positions: list[int]
    inputs: torch.Tensor


def as_item_list(items: Any) -> list:
    """A request's items as a list: a list, tuple or other iterable of items, not one str/bytes."""
    if isinstance(items, str | bytes | bytearray | memoryview | np.ndarray) or not hasattr(items, "__iter__"):
        raise InvalidInputError(
            f"items must be a list, not {type(items).__name__}", reason=Reason.UNSUPPORTED_TYPE
        )
    return list(items)


def count_check(items: Sequence[Any], limits: Limits) -> None:
    if len(items) > limits.max_items:
        raise InvalidInputError(
            f"{len(items)} items is over the limit of {limits.max_items} per request",
            reason=Reason.TOO_MANY_ITEMS,
        )


class Pipeline(ABC, Generic[P]):
    """The contract of one modality. Instances hold only deployment-wide choices, so one instance
    serves every request and thread."""

    modality: ClassVar[str]
    item_type: ClassVar[type]

    @abstractmethod
    def decode(self, item: Any, limits: Limits = DEFAULT_LIMITS, options: Options = DEFAULT_OPTIONS) -> P:
        """One client item -> its prepared form; raises ``InvalidInputError``."""

    def prepare(self, item: Any, limits: Limits = DEFAULT_LIMITS, options: Options = DEFAULT_OPTIONS) -> P:
        """A prepared item checked (it may come from any caller), anything else decoded."""
        return (
            self.check(item, limits)
            if isinstance(item, self.item_type)
            else self.decode(item, limits, options)
        )

    @abstractmethod
    def check(self, item: P, limits: Limits = DEFAULT_LIMITS) -> P:
        """A prepared item that ``collate`` can take (shape, dtype, length), or ``InvalidInputError``."""

    def prepare_all(
        self, items: Sequence[Any], limits: Limits = DEFAULT_LIMITS, options: Options = DEFAULT_OPTIONS
    ) -> list[P]:
        """Every item prepared; the first failure raises naming its position."""
        items = as_item_list(items)
        count_check(items, limits)
        out = []
        for index, item in enumerate(items):
            try:
                out.append(self.prepare(item, limits, options))
            except InvalidInputError as err:
                raise err.at_index(index) from None
        return out

    @abstractmethod
    def collate(self, items: Sequence[P], device: torch.device | str) -> list[Group]:
        """Prepared items -> the forwards that embed them, as tensors on ``device``."""

    @abstractmethod
    def encode(self, model: AudioCLIP, inputs: torch.Tensor) -> torch.Tensor:
        """One forward: ``[B, embed_dim]`` float32."""

    def forward(self, model: AudioCLIP, groups: Sequence[Group]) -> np.ndarray:
        """Run the forwards of ``collate``: float32 ``[N, embed_dim]`` rows in input order."""
        size = sum(len(g.positions) for g in groups)
        out = np.empty((size, model.config.embed_dim), dtype=np.float32)
        for group in groups:
            out[group.positions] = self.encode(model, group.inputs).cpu().numpy()
        return out

    def embed(self, model: AudioCLIP, items: Sequence[P]) -> np.ndarray:
        """collate + forward of prepared items on the model's device (unnormalised rows)."""
        if not items:
            return np.zeros((0, model.config.embed_dim), dtype=np.float32)
        return self.forward(model, self.collate(items, model.device))

    def usage_tokens(self, items: Sequence[P]) -> int:
        """Tokens billed for these items (OpenAI's ``usage``): text only."""
        return 0

    def warmup_item(self) -> P:
        """A small valid item, for a replica's first forward."""
        raise NotImplementedError


class TextPipeline(Pipeline[TextItem]):
    modality, item_type = "text", TextItem

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        self.context_length = context_length

    def decode(
        self, item: Any, limits: Limits = DEFAULT_LIMITS, options: Options = DEFAULT_OPTIONS
    ) -> TextItem:
        if not isinstance(item, str):
            raise InvalidInputError(
                f"text must be a string, not {type(item).__name__}", reason=Reason.NOT_A_STRING
            )
        if len(item) > limits.max_text_chars:
            raise InvalidInputError(
                f"text has {len(item)} characters, over the limit of {limits.max_text_chars}",
                reason=Reason.TEXT_TOO_MANY_CHARS,
            )
        [ids] = tokenize_to_ids([item], self.context_length, truncate=options.truncate)
        return TextItem(tuple(ids))

    def check(self, item: TextItem, limits: Limits = DEFAULT_LIMITS) -> TextItem:
        ids = item.ids
        if not 2 <= len(ids) <= self.context_length or not all(
            isinstance(i, int) and 0 <= i <= EOT_TOKEN for i in ids
        ):
            raise InvalidInputError(
                f"token ids must be 2..{self.context_length} ints in [0, {EOT_TOKEN}]",
                reason=Reason.BAD_SHAPE,
            )
        return item

    def collate(self, items: Sequence[TextItem], device: torch.device | str) -> list[Group]:
        """Forwards of similar-length texts, each padded only to its longest."""
        groups = length_groups([len(t.ids) for t in items], split_overhead_tokens(device))
        return [Group(g, pad_token_ids([items[i].ids for i in g]).to(device)) for g in groups]

    def encode(self, model: AudioCLIP, inputs: torch.Tensor) -> torch.Tensor:
        return model.encode_tokens(inputs)

    def usage_tokens(self, items: Sequence[TextItem]) -> int:
        return sum(len(t.ids) for t in items)

    def warmup_item(self) -> TextItem:
        return self.decode("warm up")


class ImagePipeline(Pipeline[ImageItem]):
    modality, item_type = "image", ImageItem

    def __init__(self, fast_decode: bool = False) -> None:
        self.fast_decode = fast_decode  # JPEG draft decoding of large photos (not bit-exact)

    def decode(
        self, item: Any, limits: Limits = DEFAULT_LIMITS, options: Options = DEFAULT_OPTIONS
    ) -> ImageItem:
        """Encoded bytes, a PIL image or an HWC array -> the reference's 224x224 crop."""
        crop = crop_to_uint8(item, max_pixels=limits.max_pixels, fast_decode=self.fast_decode)
        return ImageItem(crop)

    def check(self, item: ImageItem, limits: Limits = DEFAULT_LIMITS) -> ImageItem:
        if item.normalized:
            return self.normalized(item.pixels)
        shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
        if (
            not isinstance(item.pixels, np.ndarray)
            or item.pixels.dtype != np.uint8
            or item.pixels.shape != shape
        ):
            raise InvalidInputError(f"an image crop must be uint8 {list(shape)}", reason=Reason.BAD_SHAPE)
        return item

    @staticmethod
    def normalized(pixels: np.ndarray) -> ImageItem:
        """Pixels the client already CLIP-normalised: float32 ``[3, 224, 224]``, finite."""
        shape = (3, IMAGE_SIZE, IMAGE_SIZE)
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.float32 or pixels.shape != shape:
            raise InvalidInputError(
                f"normalised pixels must be float32 {list(shape)}, got {pixels.dtype} {list(pixels.shape)}",
                reason=Reason.BAD_SHAPE,
            )
        if not np.isfinite(pixels).all():
            raise InvalidInputError("pixels contain NaN or inf", reason=Reason.NOT_FINITE)
        return ImageItem(pixels, normalized=True)

    def collate(self, items: Sequence[ImageItem], device: torch.device | str) -> list[Group]:
        """One forward; crops are normalised on the device (a GPU does it faster than the CPU)."""
        pixels = torch.empty(len(items), 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        crops = [i for i, item in enumerate(items) if not item.normalized]
        if crops:
            stacked = torch.from_numpy(np.stack([items[i].pixels for i in crops])).to(device)
            pixels[crops] = normalize_pixels(stacked)
        ready = [i for i, item in enumerate(items) if item.normalized]
        if ready:
            pixels[ready] = torch.from_numpy(np.stack([items[i].pixels for i in ready])).to(device)
        return [Group(list(range(len(items))), pixels)]

    def encode(self, model: AudioCLIP, inputs: torch.Tensor) -> torch.Tensor:
        return model.encode_image(inputs)

    def warmup_item(self) -> ImageItem:
        return ImageItem(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


class AudioPipeline(Pipeline[AudioItem]):
    modality, item_type = "audio", AudioItem

    def __init__(self, fixed_clip_seconds: float | None = None) -> None:
        self.fixed_clip_seconds = fixed_clip_seconds  # pad/crop every clip to this length

    def decode(
        self, item: Any, limits: Limits = DEFAULT_LIMITS, options: Options = DEFAULT_OPTIONS
    ) -> AudioItem:
        """Encoded bytes or a path (any rate libsndfile reads), or an ``(array, sample_rate)`` pair."""
        if isinstance(item, tuple) and len(item) == 2:
            clip = load_audio(item[0], sample_rate=item[1], max_seconds=limits.max_audio_seconds)
        else:
            clip = load_audio(item, max_seconds=limits.max_audio_seconds)
        if self.fixed_clip_seconds and options.windows is None:  # windows are fixed-length already
            clip = fit_length(clip, round(self.fixed_clip_seconds * SAMPLE_RATE))
        return AudioItem(clip)

    def check(self, item: AudioItem, limits: Limits = DEFAULT_LIMITS) -> AudioItem:
        clip = item.samples
        if (
            not isinstance(clip, np.ndarray)
            or clip.dtype != np.float32
            or clip.ndim != 2
            or clip.shape[0] not in (1, 2)
        ):
            raise InvalidInputError(
                "a prepared clip must be float32 [C in (1, 2), N]", reason=Reason.BAD_SHAPE
            )
        if clip.shape[1] == 0:
            raise InvalidInputError("audio has no samples", reason=Reason.EMPTY)
        seconds = clip.shape[1] / SAMPLE_RATE
        if seconds > limits.max_audio_seconds:
            raise InvalidInputError(
                f"audio is {seconds:.1f} s long, more than the limit {limits.max_audio_seconds:g} s",
                reason=Reason.AUDIO_TOO_LONG,
            )
        if not np.isfinite(clip).all():
            raise InvalidInputError("audio contains NaN or infinity", reason=Reason.NOT_FINITE)
        return item

    def collate(self, items: Sequence[AudioItem], device: torch.device | str) -> list[Group]:
        """Clips of equal shape share a forward; padding would change their embeddings."""
        groups = equal_groups([item.samples.shape for item in items])
        stack = [torch.from_numpy(np.stack([items[i].samples for i in g])) for g in groups]
        return [Group(g, clips.to(device)) for g, clips in zip(groups, stack, strict=True)]

    def encode(self, model: AudioCLIP, inputs: torch.Tensor) -> torch.Tensor:
        return model.encode_audio(inputs)

    def warmup_item(self) -> AudioItem:
        return AudioItem(np.zeros((1, SAMPLE_RATE), dtype=np.float32))


def pipelines(fast_decode: bool = False, fixed_clip_seconds: float | None = None) -> dict[str, Pipeline]:
    """One pipeline per modality, with the deployment-wide choices."""
    return {
        "text": TextPipeline(),
        "image": ImagePipeline(fast_decode),
        "audio": AudioPipeline(fixed_clip_seconds),
    }
