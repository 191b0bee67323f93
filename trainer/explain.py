"""Explanations without an LLM: a latent's token pattern, scored on held-out contexts.

The pattern has the form of Neuron2Graph's (Foote et al. 2023): the token the latent fires on,
and the preceding tokens that matter. N2G finds those by re-running the model on pruned
prompts; we find them from the harvest's own statistics, at no extra model cost:

1. candidates: the n-grams (n = 1..3) that end at the firing token, for the latent's 20
   strongest firings on the non-held-out contexts and 20 more spread evenly over all of them in
   order of strength from a seeded random offset (so that patterns covering its weaker firings
   compete too);
2. a candidate counts on those contexts: `matches` = positions where the n-gram occurs,
   `hits` = those where the latent fires; a longer n-gram is kept only where its preceding
   tokens raise the F1 score, i.e. where they matter;
3. greedily, up to five disjoint patterns whose union has the best F1 (a pattern and a longer
   one ending in it are never both kept: the longer one is a subset);
4. the union is scored on the held-out contexts, which steps 1-3 never saw: precision = share
   of its matches where the latent fires, recall = share of the latent's firings it matches.

"Fires" means a non-zero activation; positions left out of the harvest's statistics (the first
of each context, special tokens) are neither matches nor firings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.grouping import first_per_group, rank_within, sort_within, spread_within
from trainer.tokens import VocabBytes

MAX_N = 3  # longest pattern: the firing token and two before it
MAX_PATTERNS = 5
MAX_CANDIDATES = 16  # per latent, the best on their own, for the greedy union
MIN_GAIN = 0.005  # a pattern joins the union only if it raises F1 by more than this
METHOD = {
    "method": "token n-gram patterns (N2G-style) found on the strongest firings and a sample spread over the rest, scored on held-out contexts",
    "max_n": MAX_N,
    "max_patterns": MAX_PATTERNS,
}
VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


class NgramIndex:
    """Every position's n-grams (n <= MAX_N) ending there, as ranges of one sorted id space.

    Each position gets the key of its reversed trigram (its token, the previous one, the one
    before that; the sentinel V where the context has no token). Sorted, the keys put all trigrams
    ending in one bigram, and all bigrams ending in one token, next to each other: every n-gram is
    a range [lo, hi) of trigram ids, and a count over positions or firings is a difference of two
    prefix sums or of two binary searches. One id per position replaces a sort per n."""

    def __init__(self, tokens: np.ndarray, vocab_size: int):
        C, T = tokens.shape
        self.base = vocab_size + 1
        self.sentinel = vocab_size
        key = np.zeros((C, T), dtype=np.int64)
        for back in range(MAX_N):  # key = ((token * base) + previous) * base + the one before
            shifted = np.full((C, T), vocab_size, dtype=np.int64)
            shifted[:, back:] = tokens[:, : T - back]
            key = key * self.base + shifted
        self.table, inverse = np.unique(key.reshape(-1), return_inverse=True)  # sorted keys
        self.id = inverse.reshape(-1)  # (C T,) each position's trigram id

    def tokens_back(self, key: np.ndarray, back: int) -> np.ndarray:
        """The token `back` places before the last of each trigram key (the sentinel where none)."""
        return key // self.base ** (MAX_N - 1 - back) % self.base

    def ranges(self, position: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the n-gram ending at each position: (exists, lo, hi), its ids [lo, hi)."""
        key = self.table[self.id[position]]
        width = self.base ** (MAX_N - n)
        prefix = key // width  # the last n tokens
        exists = self.tokens_back(key, n - 1) != self.sentinel
        return exists, np.searchsorted(self.table, prefix * width), np.searchsorted(self.table, (prefix + 1) * width)

    def pattern(self, position: np.ndarray, n: int) -> np.ndarray:
        """(len, MAX_N) the n-gram's tokens, first to last, right-aligned, -1 before them."""
        key = self.table[self.id[position]]
        columns = [self.tokens_back(key, back) if back < n else np.full(len(key), -1) for back in range(MAX_N - 1, -1, -1)]
        return np.stack(columns, 1)


def prefix_counts(ids: np.ndarray, n_ids: int) -> np.ndarray:
    """(n_ids + 1,) cumulative counts of `ids`: the count over [lo, hi) is c[hi] - c[lo]."""
    return np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=n_ids))])


def candidate_sources(latent: np.ndarray, by_value: np.ndarray, train: np.ndarray, n_latents: int,
                      n_examples: int, seed: int) -> np.ndarray:
    """Firing ids: each latent's `n_examples` strongest non-held-out firings, and as many more
    spread evenly over all of them in order of activation from a seeded random offset (a sample
    stratified by strength, so that patterns of the weaker firings compete too). `by_value`
    orders the firings by latent, then by ascending activation."""
    order = by_value[train[by_value]]
    counts = torch.from_numpy(np.bincount(latent[order], minlength=n_latents))
    spread, group, rank = spread_within(counts, n_examples, torch.Generator().manual_seed(seed))
    strongest = counts.cumsum(0)[group] - 1 - rank
    return order[torch.cat([strongest, spread]).numpy()]


def explain_latents(tokens: np.ndarray, counted: np.ndarray, heldout: np.ndarray, latent: np.ndarray,
                    position: np.ndarray, value: np.ndarray, n_latents: int, vocab: list[str],
                    n_examples: int = 20, seed: int = 0, by_value: np.ndarray | None = None,
                    token_bytes: list[str] | None = None) -> list[dict]:
    """One explanation per latent (see the module docstring). tokens, counted: (C, T); heldout:
    (C,) bool; latent, position, value: the firings (any order), position = context * T + t.
    by_value: the firings' order by latent, then ascending value, where the caller has it.
    token_bytes: each token's bytes in hex (byte-level BPE), to write a pattern holding a
    character split over tokens as that character (PatternWriter)."""
    C, T = tokens.shape
    heldout_position = np.repeat(heldout, T)  # (C T,)
    held = heldout_position[position]
    firings_train = np.bincount(latent[~held], minlength=n_latents)
    firings_heldout = np.bincount(latent[held], minlength=n_latents)
    if by_value is None:
        by_value = sort_within(torch.from_numpy(latent), torch.from_numpy(value).float()).numpy()
    sources = candidate_sources(latent, by_value, ~held, n_latents, n_examples, seed)

    index = NgramIndex(tokens, len(vocab))
    n_ids = len(index.table)
    flat_counted = counted.reshape(-1)
    matches = [prefix_counts(index.id[flat_counted & ~heldout_position], n_ids),
               prefix_counts(index.id[flat_counted & heldout_position], n_ids)]
    # Every firing as one sortable code (latent, trigram id), sorted apart for the non-held-out
    # and the held-out ones. They come grouped by latent, which a stable sort (timsort) turns to
    # account.
    codes = (latent.astype(np.int64) << 32) | index.id[position]
    fired = [np.sort(codes[~held], kind="stable"), np.sort(codes[held], kind="stable")]

    columns = []  # per n: latent, pattern tokens, train matches/hits, held-out matches/hits
    for n in range(1, MAX_N + 1):
        exists, lo, hi = index.ranges(position[sources], n)
        _, first = np.unique((latent[sources].astype(np.int64) << 32 | lo)[exists], return_index=True)
        which = np.flatnonzero(exists)[first]  # one source per distinct (latent, n-gram)
        lat, lo, hi = latent[sources[which]].astype(np.int64), lo[which], hi[which]
        low, high = (lat << 32) | lo, (lat << 32) | hi
        hits = [np.searchsorted(side, high) - np.searchsorted(side, low) for side in fired]
        columns.append((lat, index.pattern(position[sources[which]], n),
                        matches[0][hi] - matches[0][lo], hits[0], matches[1][hi] - matches[1][lo], hits[1]))
    lat, pattern, m, h, m_ho, h_ho = (np.concatenate(parts) for parts in zip(*columns))

    # Keep each latent's best candidates on their own (F1 on the non-held-out contexts).
    own_f1 = torch.from_numpy(2 * h / (m + firings_train[lat])).float()
    keep = first_per_group(torch.from_numpy(lat), own_f1, MAX_CANDIDATES, n_latents, descending=True).numpy()
    table = Candidates.of(lat[keep], pattern[keep], [m[keep], h[keep], m_ho[keep], h_ho[keep]], n_latents)
    chosen = choose_patterns(table, firings_train)
    writer = PatternWriter(vocab, token_bytes)
    return [describe(table, l, chosen[l], int(firings_heldout[l]), writer) for l in range(n_latents)]


def f1(hits, matches, firings):
    """2PR / (P + R) with P = hits / matches, R = hits / firings (arrays or numbers; 0 where both are 0)."""
    total = matches + firings
    return np.where(total > 0, 2 * hits / np.maximum(total, 1), 0.0)


@dataclass
class Candidates:
    """Each latent's candidates as (n, C) slots, best on their own first; `valid` marks the used."""

    valid: np.ndarray  # (n, C) bool
    pattern: np.ndarray  # (n, C, MAX_N) tokens first to last, right-aligned, -1 before them
    m: np.ndarray  # (n, C) matches, hits, held-out matches, held-out hits
    h: np.ndarray
    m_ho: np.ndarray
    h_ho: np.ndarray

    @classmethod
    def of(cls, lat: np.ndarray, pattern: np.ndarray, counts: list[np.ndarray], n_latents: int) -> "Candidates":
        """From rows grouped by latent."""
        slot = rank_within(torch.from_numpy(lat), n_latents).numpy()
        valid = np.zeros((n_latents, MAX_CANDIDATES), dtype=bool)
        valid[lat, slot] = True
        grid = np.full((n_latents, MAX_CANDIDATES, MAX_N), -1, dtype=np.int64)
        grid[lat, slot] = pattern
        columns = []
        for count in counts:
            column = np.zeros((n_latents, MAX_CANDIDATES), dtype=np.int64)
            column[lat, slot] = count
            columns.append(column)
        return cls(valid, grid, *columns)

    def ends_with(self) -> np.ndarray:
        """(n, C, C): candidate i matches only where candidate j does (i ends with j)."""
        i, j = self.pattern[:, :, None, :], self.pattern[:, None, :, :]
        return ((j < 0) | (i == j)).all(-1)


def choose_patterns(table: Candidates, firings: np.ndarray) -> np.ndarray:
    """Greedily, for all latents at once: the union of up to MAX_PATTERNS candidates with the best
    F1 on the contexts they were found on, each step adding the candidate that raises it most
    (by more than MIN_GAIN). A candidate covered by a chosen shorter one is never added; adding a
    shorter one drops the chosen longer ones it covers. Returns (n, C) the step at which each
    candidate joined, -1 if not chosen."""
    n, C = table.valid.shape
    covers = table.ends_with()  # covers[l, i, j]: i ends with j
    step = np.full((n, C), -1)
    best = np.zeros(n)
    rows = np.arange(n)
    for round_ in range(MAX_PATTERNS):
        chosen = step >= 0
        blocked = (chosen[:, None, :] & covers).any(-1) | ~table.valid  # covered by a chosen one
        dropped = chosen[:, :, None] & covers  # [l, c, x]: chosen c would go if x joined
        h = (table.h * chosen).sum(1)[:, None] - np.einsum("lc,lcx->lx", table.h, dropped) + table.h
        m = (table.m * chosen).sum(1)[:, None] - np.einsum("lc,lcx->lx", table.m, dropped) + table.m
        score = np.where(blocked, -np.inf, f1(h, m, firings[:, None]))
        x = score.argmax(1)  # the first of equal scores, as in a loop over the candidates
        better = score[rows, x] > best + MIN_GAIN
        if not better.any():
            break
        step[better] = np.where(dropped[better, :, x[better]], -1, step[better])
        step[better, x[better]] = round_
        best[better] = score[better, x[better]]
    return step


def describe(table: Candidates, l: int, step: np.ndarray, firings_heldout: int, writer: "PatternWriter") -> dict:
    """Latent l's explanation: its chosen patterns, in the order they joined, scored held out."""
    chosen = [c for c in np.argsort(step, kind="stable") if step[c] >= 0]
    patterns = [[int(t) for t in table.pattern[l, c] if t >= 0] for c in chosen]
    matches, hits = int(table.m_ho[l, chosen].sum()), int(table.h_ho[l, chosen].sum())
    return {
        "text": " | ".join(writer.text(pattern) for pattern in patterns),
        "patterns": patterns,
        "precision": hits / matches if matches else None,
        "recall": hits / firings_heldout if firings_heldout else None,
        "f1": float(f1(hits, matches, firings_heldout)) if chosen and matches + firings_heldout else None,
        "matches": matches,
        "firings": firings_heldout,
    }


def show(token: str) -> str:
    for char, mark in VISIBLE.items():
        token = token.replace(char, mark)
    return token


class PatternWriter:
    """Patterns as text, `socket.⟦AF⟧`: the preceding tokens, then the firing token in brackets.
    Each token is its vocab string, except in a pattern holding part of a
    character split over byte tokens (an emoji, CJK), whose tokens are cut from the bytes they
    spell together (trainer/tokens.py): the character on the token that completes it, not one
    U+FFFD per part."""

    def __init__(self, vocab: list[str], token_bytes: list[str] | None = None):
        self.vocab, self.split = vocab, VocabBytes(token_bytes)

    def text(self, pattern: list[int]) -> str:
        pieces = self.split.pieces(pattern)
        # A token whose bytes make no character here (a fragment) keeps its vocab string.
        pieces = [self.vocab[t] if pieces is None or "\ufffd" in pieces[i].text else pieces[i].text
                  for i, t in enumerate(pattern)]
        *before, firing = pieces
        return "".join(show(p) for p in before) + "⟦" + show(firing) + "⟧"
