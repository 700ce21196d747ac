"""Exception types of the model library.

They are all ``ValueError`` subclasses where the cause is bad input, so callers that
only know about ``ValueError`` still catch them; the serving layer maps them to 4xx.
"""

from __future__ import annotations

import copy
import re


class AudioCLIPError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointError(AudioCLIPError):
    """A checkpoint does not match the architecture (keys, shapes) or cannot be read."""


class InvalidInputError(AudioCLIPError, ValueError):
    """An input item (image, audio clip, text) cannot be used.

    ``index`` is the item's position in its request when known, so a caller can say which
    item was wrong; ``reason`` is a short machine-readable tag (e.g. ``"undecodable"``).
    Instances pickle with their fields, so they cross Ray process boundaries intact.
    """

    def __init__(self, message: str, *, index: int | None = None, reason: str = "invalid") -> None:
        self.detail = message
        self.index = index
        self.reason = reason
        super().__init__(self._render())

    def _render(self) -> str:
        return self.detail if self.index is None else f"item {self.index}: {self.detail}"

    def at_index(self, index: int) -> InvalidInputError:
        """This error re-addressed to the item's position in the caller's request."""
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
            reason="text_too_long",
        )
        self.num_tokens = num_tokens
        self.context_length = context_length


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def describe(err: BaseException) -> str:
    """A library exception's text without object reprs (``<_io.BytesIO object at 0x...>``),
    fit to show a client."""
    text = _OBJECT_REPR.sub("", str(err)).strip(" :")
    return text or type(err).__name__
