"""Exception types of the model library.

They are all ``ValueError`` subclasses where the cause is bad input, so callers that
only know about ``ValueError`` still catch them; the serving layer maps them to 4xx.
"""

from __future__ import annotations

import copy
import re
from enum import StrEnum


class Reason(StrEnum):
    """Why an input item cannot be used: the machine-readable tag every ``InvalidInputError``
    carries. The serving layer maps each one to an HTTP status in one table
    (``deployments/errors.py``); a test checks that the table covers every member."""

    # the item's type or structure
    UNSUPPORTED_TYPE = "unsupported_type"  # not bytes / an array / a string / ...
    NOT_A_STRING = "not_a_string"  # a text item that is no string
    NOT_BASE64 = "not_base64"  # a JSON item that is not base64 or a data URI (URLs are not fetched)
    BAD_ITEM = "bad_item"  # a rank query/candidate that is not {modality: value}
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    BAD_RANGE = "bad_range"  # float pixels outside [0, 1], samples outside [-1, 1]
    NOT_FINITE = "not_finite"
    EMPTY = "empty"
    UNDECODABLE = "undecodable"  # encoded bytes that the decoder refuses
    NOT_FOUND = "not_found"  # a path that does not exist (library callers only)
    # audio specifics
    BAD_SAMPLE_RATE = "bad_sample_rate"
    MISSING_SAMPLE_RATE = "missing_sample_rate"
    SAMPLE_RATE_MISMATCH = "sample_rate_mismatch"
    TOO_MANY_CHANNELS = "too_many_channels"
    BAD_WINDOW = "bad_window"  # window_s / hop_s / pool that cannot cut a clip
    # limits: the item is fine but too large for this service
    TEXT_TOO_LONG = "text_too_long"  # more tokens than the context length, without truncation
    TEXT_TOO_MANY_CHARS = "text_too_many_chars"  # over Limits.max_text_chars
    TOO_MANY_PIXELS = "too_many_pixels"  # over Limits.max_pixels
    AUDIO_TOO_LONG = "audio_too_long"  # over Limits.max_audio_seconds
    TOO_MANY_ITEMS = "too_many_items"  # a request over Limits.max_items
    TOO_MANY_WINDOWS = "too_many_windows"  # a windowed request over Limits.max_windows
    # the request asks for something this deployment does not have
    TOWER_NOT_SERVED = "tower_not_served"


class AudioCLIPError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointError(AudioCLIPError):
    """A checkpoint does not match the architecture (keys, shapes) or cannot be read."""


class InvalidInputError(AudioCLIPError, ValueError):
    """An input item (image, audio clip, text) cannot be used.

    ``index`` is the item's position in its request when known, so a caller can say which
    item was wrong; ``reason`` is a short machine-readable tag (a :class:`Reason`).
    Instances pickle with their fields, so they cross Ray process boundaries intact.
    """

    def __init__(self, message: str, *, index: int | None = None, reason: Reason) -> None:
        self.detail = message
        self.index = index
        self.reason = Reason(reason)
        super().__init__(self._render())

    def _render(self) -> str:
        return self.detail if self.index is None else f"item {self.index}: {self.detail}"

    def at_index(self, index: int | None) -> InvalidInputError:
        """This error re-addressed to the item's position in the caller's request (None: an item
        without a position, such as a rank query)."""
        clone = copy.copy(self)
        clone.index = index
        clone.args = (clone._render(),)
        return clone

    def __reduce__(self):
        return (_rebuild, (type(self), dict(vars(self))))

    def __str__(self) -> str:
        return self._render()


def _rebuild(cls: type[InvalidInputError], state: dict) -> InvalidInputError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    err.args = (err._render(),)
    return err


class TextTooLongError(InvalidInputError):
    """A text has more tokens than the context length and truncation was not asked for."""

    def __init__(self, index: int | None, num_tokens: int, context_length: int) -> None:
        super().__init__(
            f"text has {num_tokens} tokens, more than the context length {context_length}; "
            "shorten it or pass truncate=True",
            index=index,
            reason=Reason.TEXT_TOO_LONG,
        )
        self.num_tokens = num_tokens
        self.context_length = context_length


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def describe(err: BaseException) -> str:
    """A library exception's text without object reprs (``<_io.BytesIO object at 0x...>``),
    fit to show a client."""
    text = _OBJECT_REPR.sub("", str(err)).strip(" :")
    return text or type(err).__name__
