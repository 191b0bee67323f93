"""Each token's piece of a text: byte-level BPE splits a character over several tokens, and the
pieces must still join into the text, each character on the token that completes it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.tokens import BYTE_OF, TokenPiece, pieces_of_bytes, token_bytes, token_pieces, vocab_bytes

SPLIT_TEXTS = ["Ünïcödé ✓ — and 😀 emoji", "日本語のテキスト", "tab\tnew\nline  spaces", "a😀😀b\U0001F9D1\u200d\U0001F52C"]


def test_the_byte_alphabet_is_a_bijection_of_the_256_bytes():
    assert sorted(BYTE_OF.values()) == list(range(256))
    assert BYTE_OF["Ġ"] == ord(" ") and BYTE_OF["Ċ"] == ord("\n") and BYTE_OF["A"] == ord("A")
    assert token_bytes("ĠðŁĺ") == " 😀".encode()[:4]
    assert token_bytes("▁word") is None  # SentencePiece's space: not a byte-level token


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_pieces_join_into_the_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(piece.text for piece in pieces) == text
    assert "\ufffd" not in "".join(piece.text for piece in pieces)


def test_a_split_character_goes_to_the_token_that_completes_it(tokenizer):
    ids = tokenizer("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the tiny tokenizer is expected to split an emoji into byte tokens"
    pieces = token_pieces(tokenizer, ids)
    assert [piece.text for piece in pieces] == [""] * (len(ids) - 1) + ["😀"]
    assert [piece.carries for piece in pieces] == [True] * (len(ids) - 1) + [False]
    # Each token alone decodes to U+FFFD: what the probe showed before.
    assert all("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_bytes_cut_off_at_the_end_are_a_replacement_character(tokenizer):
    ids = tokenizer("ok 😀", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids[:-1])  # the emoji's last byte missing
    assert pieces[-1] == TokenPiece(pieces[-1].text, False) and pieces[-1].text.endswith("\ufffd")


def test_other_tokenizers_decode_one_token_at_a_time():
    vocab = {0: "▁hello", 1: "▁world"}
    fake = SimpleNamespace(convert_ids_to_tokens=lambda ids: [vocab[i] for i in ids],
                           decode=lambda ids: vocab[ids[0]].replace("▁", " "))
    assert token_pieces(fake, [0, 1]) == [TokenPiece(" hello", False), TokenPiece(" world", False)]


def test_vocab_bytes_cut_a_text_as_the_tokenizer_does(tokenizer):
    raw = vocab_bytes(tokenizer, len(tokenizer))
    assert raw is not None and len(raw) == len(tokenizer)
    for text in SPLIT_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert pieces_of_bytes([bytes.fromhex(raw[i]) for i in ids]) == token_pieces(tokenizer, ids)
    fake = SimpleNamespace(convert_ids_to_tokens=lambda ids: ["▁a" for _ in ids])
    assert vocab_bytes(fake, 3) is None  # not byte-level: no bytes to give


def test_the_harvest_keeps_each_tokens_bytes(tiny_run, tokenizer):
    """The tiny run's harvest holds token_bytes.json, one entry per vocab.json token."""
    from trainer import runfolder

    harvest = runfolder.load_harvest(tiny_run)
    assert harvest.token_bytes is not None and len(harvest.token_bytes) == len(harvest.vocab)
    assert harvest.token_bytes[: len(tokenizer)] == vocab_bytes(tokenizer, len(tokenizer))
    whole = [i for i, h in enumerate(harvest.token_bytes[: len(tokenizer)]) if "\ufffd" not in harvest.vocab[i]]
    assert all(bytes.fromhex(harvest.token_bytes[i]).decode() == harvest.vocab[i] for i in whole[:2000])
