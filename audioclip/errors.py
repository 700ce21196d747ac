"""Exception types of the model library.

They are all ``ValueError`` subclasses where the cause is bad input, so callers that
only know about ``ValueError`` still catch them; the serving layer maps them to 4xx.
"""

from __future__ import annotations


class AudioCLIPError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointError(AudioCLIPError):
    """A checkpoint does not match the architecture (keys, shapes) or cannot be read."""


class InvalidInputError(AudioCLIPError, ValueError):
    """An input item (image, audio clip, text) cannot be used.

    ``index`` is the item's position in its batch when known, so a caller can say which
    item was wrong; ``reason`` is a short machine-readable tag (e.g. ``"undecodable"``).
    """

    def __init__(self, message: str, *, index: int | None = None, reason: str = "invalid") -> None:
        super().__init__(message)
        self.index = index
        self.reason = reason


class TextTooLongError(InvalidInputError):
    """A text has more tokens than the context length and truncation was not asked for."""

    def __init__(self, index: int, num_tokens: int, context_length: int) -> None:
        super().__init__(
            f"text {index} has {num_tokens} tokens, more than the context length {context_length}; "
            "shorten it or pass truncate=True",
            index=index,
            reason="text_too_long",
        )
        self.num_tokens = num_tokens
        self.context_length = context_length
