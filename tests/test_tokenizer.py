"""Tokenizer parity with the reference ids (golden vectors, AUDIOCLIP.md tables) and its edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from audioclip import tokenizer as tok
from audioclip.errors import InvalidInputError, TextTooLongError

GOLDEN = Path(__file__).parent / "data" / "golden"
SOT, EOT = tok.SOT_TOKEN, tok.EOT_TOKEN


def _bpe(text: str) -> list[int]:
    return tok.get_tokenizer().encode(text)


def test_constants_and_vocab_size() -> None:
    assert (SOT, EOT, tok.CONTEXT_LENGTH) == (49406, 49407, 77)
    assert tok.get_tokenizer().vocab_size == 49408
    assert tok.get_tokenizer() is tok.get_tokenizer()


def test_golden_tokens_exact() -> None:
    texts = json.loads((GOLDEN / "manifest.json").read_text())["texts"]
    expected = np.load(GOLDEN / "golden.npz")["text_tokens"]
    ours = tok.tokenize(texts)
    assert ours.dtype == torch.int64
    assert ours.shape == (len(texts), 77)
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        (
            "The sound of a Thunderstorm &amp; heavy   RAIN!!",
            [49406, 518, 3608, 539, 320, 12005, 261, 4200, 2443, 748, 49407],
        ),
    ],
)
def test_reference_table_examples(text: str, expected: list[int]) -> None:
    assert tok.tokenize_to_ids([text]) == [expected]


def test_empty_string_is_sot_eot() -> None:
    assert tok.tokenize_to_ids([""]) == [[SOT, EOT]]
    assert tok.tokenize_to_ids(["  \t\n "]) == [[SOT, EOT]]


def test_single_str_is_one_text() -> None:
    assert tok.tokenize_to_ids("a dog") == [[SOT, *_bpe("a dog"), EOT]]
    assert tok.tokenize("a dog").shape == (1, 77)


def test_emoji_and_cjk_round_trip_through_bytes() -> None:
    for text in ["🐶 woof 👍🏽", "狗在叫", "犬が吠える"]:
        ids = _bpe(text)
        assert ids, text
        assert all(0 <= i < 49406 for i in ids)
        assert tok.get_tokenizer().decode(ids).replace(" ", "") == text.replace(" ", "")


def test_html_entities_unescaped_twice() -> None:
    amp = _bpe("&")
    assert _bpe("&amp;") == amp
    assert _bpe("&amp;amp;") == amp
    assert _bpe("&lt;b&gt;") == _bpe("<b>")


def test_mojibake_fixed_by_ftfy() -> None:
    assert _bpe("cafÃ©") == _bpe("café")
    assert _bpe("cafÃ©") != _bpe("cafa")


def test_literal_special_tokens_map_to_ids() -> None:
    ids = tok.tokenize_to_ids(["a <|endoftext|> b"])[0]
    assert ids == [SOT, 320, EOT, 321, EOT]
    assert _bpe("<|startoftext|>") == [SOT]


def test_whitespace_collapse_and_case_folding() -> None:
    assert _bpe("a \t\n  photo\u00a0of   a CAT") == _bpe("a photo of a cat")
    assert _bpe("HeLLo WORLD") == _bpe("hello world")


def test_digits_are_split() -> None:
    assert _bpe("2024") == [_bpe(d)[0] for d in "2024"]


def test_exactly_context_length_passes_and_one_more_raises() -> None:
    assert len(_bpe("a " * 75)) == 75
    ids = tok.tokenize_to_ids(["ok", "a " * 75])
    assert len(ids[1]) == 77
    with pytest.raises(TextTooLongError) as info:
        tok.tokenize_to_ids(["ok", "a " * 76])
    assert info.value.index == 1
    assert info.value.num_tokens == 78
    assert info.value.context_length == 77
    assert info.value.reason == "text_too_long"


def test_truncate_keeps_eot_last() -> None:
    ids = tok.tokenize_to_ids(["a " * 200], truncate=True)[0]
    assert len(ids) == 77
    assert ids[0] == SOT
    assert ids[-1] == EOT
    assert ids[1:-1] == [320] * 75
    padded = tok.tokenize(["a " * 200, "dog"], truncate=True)
    assert padded[0, -1].item() == EOT
    assert padded[1, 3:].eq(0).all()


def test_custom_context_length_pads_with_zero() -> None:
    out = tok.tokenize(["a dog"], context_length=10)
    assert out.tolist() == [[SOT, 320, 1929, EOT, 0, 0, 0, 0, 0, 0]]


def test_non_string_item_is_rejected_with_index() -> None:
    with pytest.raises(InvalidInputError) as info:
        tok.tokenize_to_ids(["fine", 42])  # type: ignore[list-item]
    assert info.value.index == 1
    assert info.value.reason == "not_a_string"


def test_decode_round_trip() -> None:
    text = "a photo of an astronaut, riding a horse!"
    assert tok.get_tokenizer().decode(_bpe(text)).strip() == "a photo of an astronaut , riding a horse !"
    assert tok.get_tokenizer().decode(_bpe("hello world")) == "hello world "


def test_vocab_checksum_mismatch_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    genuine = tok.VOCAB_PATH.read_bytes()
    fake.write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 0xFF]))
    monkeypatch.setattr(tok, "VOCAB_PATH", fake)
    with pytest.raises(tok.VocabFileError, match="sha256"):
        tok.BPETokenizer()


def test_missing_vocab_raises(tmp_path: Path) -> None:
    with pytest.raises(tok.VocabFileError, match="cannot read"):
        tok.BPETokenizer(tmp_path / "absent.txt.gz")
