"""CLIP's byte-level BPE tokenizer, id-for-id compatible with the AudioCLIP/OpenAI reference.

The text tower was trained on these exact ids, so every step (ftfy, double HTML unescape,
whitespace collapse, lower-casing, the split pattern, the byte map and the merge ranks) follows
the reference; any deviation would silently change embeddings. Unlike the reference, long texts
can be truncated on request and errors name the offending item.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import itertools
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import ftfy
import regex
import torch

from audioclip.errors import AudioCLIPError, InvalidInputError, Reason, TextTooLongError

SOT_TOKEN = 49406
EOT_TOKEN = 49407
CONTEXT_LENGTH = 77

VOCAB_SIZE = 49408
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_PATH: Path = Path(str(resources.files("audioclip") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))

_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: the merges that fit between the byte tokens and specials
_END_OF_WORD = "</w>"
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_SPLIT_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


class VocabFileError(AudioCLIPError):
    """The BPE vocabulary file is missing or is not the one CLIP was trained with."""


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character so BPE never sees whitespace or control bytes.

    Printable Latin-1 bytes map to themselves; the others map to code points from 256 upwards in
    byte order. The dict's order (printable first) defines ids 0..255, as in the reference.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return mapping


def _read_verified(path: Path) -> bytes:
    """Read the vocab file and refuse it unless it is byte-identical to CLIP's, because other
    merge lists give valid-looking but wrong ids."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise VocabFileError(f"cannot read the BPE vocabulary {path}: {err}") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabFileError(
            f"BPE vocabulary {path} has sha256 {digest}, expected {VOCAB_SHA256}; "
            "the file is corrupt or not CLIP's bpe_simple_vocab_16e6.txt.gz"
        )
    return data


def _load_merges(path: Path) -> list[tuple[str, str]]:
    """Return the first 48894 merges (line 0 of the file is a version header)."""
    lines = gzip.decompress(_read_verified(path)).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # type: ignore[misc]


def _clean(text: str) -> str:
    """Normalise text the way the reference does before splitting it into words."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class BPETokenizer:
    """Byte-level BPE with CLIP's 49408-entry vocabulary; ``encode`` adds no SOT/EOT."""

    def __init__(self, vocab_path: Path | None = None, cache_size: int = 65536) -> None:
        merges = _load_merges(vocab_path if vocab_path is not None else VOCAB_PATH)
        self._byte_encoder = _byte_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        vocab = [*symbols, *(s + _END_OF_WORD for s in symbols), *("".join(m) for m in merges), *_SPECIALS]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = dict(enumerate(vocab))
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._bpe_cached = functools.lru_cache(maxsize=cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        """Number of ids; 49408 for CLIP's file."""
        return len(self._encoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one byte-mapped word, lowest merge rank first."""
        if word in _SPECIALS:
            return (word,)
        symbols = [*word[:-1], word[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            pairs = itertools.pairwise(symbols)
            best = min(pairs, key=lambda pair: self._ranks.get(pair, _NUM_MERGES))
            if best not in self._ranks:
                break
            symbols = _merge_pair(symbols, best)
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT; a literal special-token string maps to its id."""
        ids: list[int] = []
        for word in _SPLIT_PATTERN.findall(_clean(text)):
            mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self._encoder[token] for token in self._bpe_cached(mapped))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; each end-of-word marker becomes a space, as in the reference."""
        chars = "".join(self._decoder[int(i)] for i in ids)
        raw = bytes(self._byte_decoder[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair``, scanning left to right."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


@functools.cache
def get_tokenizer() -> BPETokenizer:
    """The shared tokenizer, loaded on first use so importing the package stays cheap."""
    return BPETokenizer()


def _as_text_list(texts: Sequence[str] | str) -> Sequence[str]:
    """Treat a bare string as one text rather than a sequence of characters."""
    return [texts] if isinstance(texts, str) else texts


def _fit(ids: list[int], index: int, context_length: int, truncate: bool) -> list[int]:
    """Enforce the context length: cut keeping EOT last, or raise naming the item."""
    if len(ids) <= context_length:
        return ids
    if not truncate:
        raise TextTooLongError(index, len(ids), context_length)
    return [*ids[: context_length - 1], EOT_TOKEN]


def tokenize_to_ids(
    texts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> list[list[int]]:
    """``[SOT, *bpe, EOT]`` per text, unpadded, so callers can batch to the longest item."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
    tokenizer = get_tokenizer()
    result = []
    for index, text in enumerate(_as_text_list(texts)):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"text {index} is a {type(text).__name__}, not a str", index=index, reason=Reason.NOT_A_STRING
            )
        ids = [SOT_TOKEN, *tokenizer.encode(text), EOT_TOKEN]
        result.append(_fit(ids, index, context_length, truncate))
    return result


def tokenize(
    texts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """Zero-padded int64 ``[B, context_length]`` ids, the reference ``clip.tokenize`` layout."""
    rows = tokenize_to_ids(texts, context_length, truncate)
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for row, ids in enumerate(rows):
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
