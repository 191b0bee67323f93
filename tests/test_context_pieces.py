"""Contexts as the loader stores them: a character split over several byte tokens is put back
together (on the token that completes it) instead of showing each part as U+FFFD."""

from __future__ import annotations

import json

import numpy as np

from app.loader import context_rows

# "a", the two halves of "😀" (each alone decodes to U+FFFD), " b"
VOCAB = ["a", "\ufffd", "\ufffd", " b"]
BYTES = ["a".encode().hex(), "f09f", "9880", " b".encode().hex()]


def stored_tokens(token_ids, token_bytes):
    rows = context_rows(np.array(token_ids), np.arange(len(token_ids)), VOCAB, token_bytes)
    return [json.loads(tokens) for tokens in rows.columns["tokens"]]


def test_a_split_character_is_whole_on_the_token_that_completes_it():
    assert stored_tokens([[0, 1, 2, 3]], BYTES) == [["a", "", "😀", " b"]]
    assert "".join(stored_tokens([[1, 2, 3, 0]], BYTES)[0]) == "😀 ba"


def test_contexts_without_split_characters_keep_the_vocab_strings():
    assert stored_tokens([[0, 3, 0]], BYTES) == [["a", " b", "a"]]


def test_without_token_bytes_each_token_is_its_vocab_string():
    """A harvest made before token_bytes.json, or a tokenizer that is not byte-level."""
    assert stored_tokens([[0, 1, 2, 3]], None) == [["a", "\ufffd", "\ufffd", " b"]]


def test_a_context_cut_inside_a_character_ends_in_a_replacement_character():
    assert stored_tokens([[0, 1]], BYTES) == [["a", "\ufffd"]]


def test_a_feature_page_chip_marks_the_carried_bytes_as_the_probe_does():
    from app.render import token_chips

    tokens = stored_tokens([[0, 1, 2, 3]], BYTES)[0]
    chips = str(token_chips(tokens, [0.0, 1.0, 2.0, 0.0], 2.0))
    assert chips.count('<span class="ws mark"') == 1 and "…</span>" in chips and "😀" in chips and "∅" not in chips
