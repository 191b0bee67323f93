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


def test_ngram_keys_unpack_back_to_their_tokens():
    tokens = np.array([[4, 1, 3, 2]])
    keys = explain.ngram_keys(tokens, 3, 6)
    assert keys[:2].tolist() == [-1, -1]
    assert explain.unpack(int(keys[3]), 3, 6) == (1, 3, 2)
