"""The explanation finder and scorer on constructed latents whose precision and recall are known."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import explain

VOCAB = ["<s>", " a", " b", " c", "d", "\n"]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 6, (200, 24))  # no <s> inside
    tokens[:, 0] = 0
    counted = np.ones_like(tokens, dtype=bool)
    counted[:, 0] = False  # the first position is left out, as the harvest does
    heldout = np.zeros(200, dtype=bool)
    heldout[150:] = True
    return tokens, counted, heldout


def firings_where(*masks):
    """Latent i fires (value 1 + position noise) wherever masks[i] is True."""
    latent, position, value = [], [], []
    for i, mask in enumerate(masks):
        where = np.flatnonzero(mask)
        latent.append(np.full(len(where), i))
        position.append(where)
        value.append(1.0 + (where % 7) / 10)
    return np.concatenate(latent), np.concatenate(position), np.concatenate(value)


def explained(corpus, *masks):
    tokens, counted, heldout = corpus
    masks = [m.reshape(-1) & counted.reshape(-1) for m in masks]
    latent, position, value = firings_where(*masks)
    return explain.explain_latents(tokens, counted, heldout, latent, position, value, len(masks) + 1, VOCAB)


def heldout_scores(corpus, fires, predicted):
    """Naive precision and recall on the held-out contexts."""
    tokens, counted, heldout = corpus
    scope = counted & heldout[:, None]
    fires, predicted = fires & scope, predicted & scope
    return (fires & predicted).sum() / predicted.sum(), (fires & predicted).sum() / fires.sum()


def previous(tokens):
    before = np.full_like(tokens, -1)
    before[:, 1:] = tokens[:, :-1]
    return before


def test_a_bigram_latent_gets_its_bigram_with_perfect_scores(corpus):
    tokens = corpus[0]
    bigram = (tokens == 3) & (previous(tokens) == 2)  # " c" after " b"
    found = explained(corpus, bigram)[0]
    assert found["patterns"] == [[2, 3]] and found["text"] == " b⟦ c⟧"
    assert found["precision"] == 1.0 and found["recall"] == 1.0 and found["f1"] == 1.0
    assert found["firings"] == (bigram & corpus[1] & corpus[2][:, None]).sum()


def test_a_two_token_latent_gets_both_tokens(corpus):
    tokens = corpus[0]
    found = explained(corpus, (tokens == 4) | (tokens == 5))[0]
    assert sorted(found["patterns"]) == [[4], [5]]
    assert "⟦d⟧" in found["text"] and "⟦↵⟧" in found["text"]  # newlines shown as ↵
    assert found["precision"] == 1.0 and found["recall"] == 1.0


def test_a_noisy_latent_gets_the_exact_heldout_precision_and_recall(corpus):
    tokens = corpus[0]
    rng = np.random.default_rng(1)
    fires = ((tokens == 1) & (rng.random(tokens.shape) < 0.7)) | ((tokens == 2) & (rng.random(tokens.shape) < 0.05))
    found = explained(corpus, fires)[0]
    assert found["patterns"] == [[1]]  # " b" at 5 % would lower F1
    precision, recall = heldout_scores(corpus, fires, tokens == 1)
    assert found["precision"] == pytest.approx(precision) and found["recall"] == pytest.approx(recall)
    assert 0.6 < precision < 0.8 and 0.85 < recall < 0.99
    assert found["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_explanations_are_plain_json(corpus):
    import json

    tokens = corpus[0]
    found = explained(corpus, tokens == 1, (tokens == 3) & (previous(tokens) == 2))
    assert json.loads(json.dumps(found)) == found


def test_a_dead_latent_has_no_explanation(corpus):
    tokens = corpus[0]
    found = explained(corpus, tokens == 1)
    assert found[1] == {"text": "", "patterns": [], "precision": None, "recall": None, "f1": None,
                        "matches": 0, "firings": 0}


def test_every_ngram_is_a_range_of_trigram_ids():
    tokens = np.array([[4, 1, 3, 2], [1, 3, 2, 2]])
    index = explain.NgramIndex(tokens, 6)
    ends = np.array([3, 6])  # " b c" ending at t=3 of the first context, and at t=2 of the second
    for n, pattern in ((1, [-1, -1, 2]), (2, [-1, 3, 2]), (3, [1, 3, 2])):
        exists, lo, hi = index.ranges(ends, n)
        assert exists.all() and (index.pattern(ends, n) == pattern).all()
        positions = np.flatnonzero((index.id >= lo[0]) & (index.id < hi[0]))
        at = [tuple(tokens.reshape(-1)[p - n + 1 : p + 1]) for p in positions]
        assert set(at) == {tuple(pattern[-n:])} and len(positions) == {1: 3, 2: 2, 3: 2}[n]
    assert not index.ranges(np.array([1]), 3)[0][0]  # no trigram ends at the second token


def matches_of(tokens, pattern):
    """(C, T) bool: where the token pattern (first to last) ends."""
    where = np.ones_like(tokens, dtype=bool)
    for back, token in enumerate(reversed(pattern)):
        shifted = np.full_like(tokens, -1)
        shifted[:, back:] = tokens[:, : tokens.shape[1] - back]
        where &= shifted == token
    return where


def test_every_reported_score_matches_a_naive_count_of_its_patterns(corpus):
    tokens = corpus[0]
    rng = np.random.default_rng(2)
    before = previous(tokens)
    masks = [((tokens == t) & (before == b) & (rng.random(tokens.shape) < p)) | (rng.random(tokens.shape) < noise)
             for t, b, p, noise in ((1, 2, 0.9, 0.01), (3, 4, 0.5, 0.05), (5, 1, 1.0, 0.0), (2, 3, 0.3, 0.1))]
    for fires, found in zip(masks, explained(corpus, *masks)):
        assert found["patterns"]
        predicted = np.zeros_like(tokens, dtype=bool)
        for pattern in found["patterns"]:
            predicted |= matches_of(tokens, pattern)
        precision, recall = heldout_scores(corpus, fires & corpus[1], predicted)
        assert found["precision"] == pytest.approx(precision) and found["recall"] == pytest.approx(recall)


# "a", the two halves of "😀" (each alone decodes to U+FFFD, as the vocab has them), " b"
SPLIT_VOCAB = ["a", "\ufffd", "\ufffd", " b"]
SPLIT_BYTES = ["a".encode().hex(), "f09f", "9880", " b".encode().hex()]


def test_a_pattern_over_a_split_character_shows_the_character():
    writer = explain.PatternWriter(SPLIT_VOCAB, SPLIT_BYTES)
    assert writer.text([0, 1, 2]) == "a⟦😀⟧"  # the character on the token that completes it
    assert writer.text([1, 2, 3]) == "😀⟦ b⟧"
    assert writer.text([0, 1]) == "a⟦\ufffd⟧"  # fires on a character's first bytes: no character yet
    assert writer.text([2]) == "⟦\ufffd⟧"  # a character's last bytes alone: the vocab's one U+FFFD
    assert writer.text([0, 3]) == "a⟦ b⟧"  # no split character: the vocab strings


def test_without_token_bytes_patterns_use_the_vocab_strings():
    assert explain.PatternWriter(SPLIT_VOCAB).text([0, 1, 2]) == "a\ufffd⟦\ufffd⟧"


def test_explanations_over_split_characters_name_the_character(corpus):
    """A latent that fires on the token completing a split character (and not on the same token
    after other bytes) is explained with that character."""
    tokens = np.tile([0, 1, 2, 3, 3, 2], (40, 4))  # "a😀 b b" then a stray last half
    counted = np.ones_like(tokens, dtype=bool)
    heldout = np.zeros(40, dtype=bool)
    heldout[30:] = True
    flat = tokens.reshape(-1)
    position = np.flatnonzero((flat == 2) & (np.roll(flat, 1) == 1))
    latent, value = np.zeros(len(position), dtype=np.int64), np.ones(len(position))
    found = explain.explain_latents(tokens, counted, heldout, latent, position, value, 1, SPLIT_VOCAB,
                                    token_bytes=SPLIT_BYTES)
    assert "😀⟧" in found[0]["text"] and "\ufffd" not in found[0]["text"]
