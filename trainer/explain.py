"""Explanations without an LLM: a latent's token pattern, scored on held-out contexts.

The pattern has the form of Neuron2Graph's (Foote et al. 2023): the token the latent fires on,
and the preceding tokens that matter. N2G finds those by re-running the model on pruned
prompts; we find them from the harvest's own statistics, at no extra model cost:

1. candidates: for each of the latent's strongest firings on the non-held-out contexts, the
   n-grams (n = 1..3) that end at the firing token;
2. a candidate counts on those contexts: `matches` = positions where the n-gram occurs,
   `hits` = those where the latent fires; a longer n-gram is kept only where its preceding
   tokens raise the F1 score, i.e. where they matter;
3. greedily, up to three disjoint patterns whose union has the best F1 (a pattern and a longer
   one ending in it are never both kept: the longer one is a subset);
4. the union is scored on the held-out contexts, which steps 1-3 never saw: precision = share
   of its matches where the latent fires, recall = share of the latent's firings it matches.

"Fires" means a non-zero activation; positions left out of the harvest's statistics (the first
of each context, special tokens) are neither matches nor firings.
"""

from __future__ import annotations

import numpy as np

MAX_N = 3  # longest pattern: the firing token and two before it
MAX_PATTERNS = 3
MIN_GAIN = 0.005  # a pattern joins the union only if it raises F1 by more than this
METHOD = {
    "method": "token n-gram patterns (N2G-style) found on the top firings, scored on held-out contexts",
    "max_n": MAX_N,
    "max_patterns": MAX_PATTERNS,
}
VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def ngram_keys(tokens: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """(C * T,) an int64 key of the n tokens ending at each position, -1 where the context has
    fewer than n tokens up to there."""
    C, T = tokens.shape
    keys = np.full((C, T), -1, dtype=np.int64)
    key = tokens[:, n - 1 :].astype(np.int64)
    for back in range(1, n):
        key = key + tokens[:, n - 1 - back : T - back].astype(np.int64) * vocab_size**back
    keys[:, n - 1 :] = key
    return keys.reshape(-1)


class Counter:
    """How often each key occurs at a set of positions, and, per latent, at its firings there."""

    def __init__(self, keys: np.ndarray, where: np.ndarray, firing_latent: np.ndarray, firing_position: np.ndarray):
        self.table, self.occurrences = np.unique(keys[where & (keys >= 0)], return_counts=True)
        fired = keys[firing_position]
        known = fired >= 0
        composite = firing_latent[known].astype(np.int64) * (len(self.table) + 1) + np.searchsorted(self.table, fired[known])
        self.fired = np.sort(composite)
        self.width = len(self.table) + 1

    def _ids(self, keys: np.ndarray) -> np.ndarray:
        """Each key's row in the table, or len(table) (a row that counts nothing) when absent."""
        ids = np.searchsorted(self.table, keys)
        present = ids < len(self.table)
        present[present] = self.table[ids[present]] == keys[present]
        return np.where(present, ids, len(self.table))

    def matches(self, keys: np.ndarray) -> np.ndarray:
        counts = np.append(self.occurrences, 0)
        return counts[self._ids(keys)]

    def hits(self, latents: np.ndarray, keys: np.ndarray) -> np.ndarray:
        composite = latents.astype(np.int64) * self.width + self._ids(keys)
        return np.searchsorted(self.fired, composite, side="right") - np.searchsorted(self.fired, composite)


def explain_latents(tokens: np.ndarray, counted: np.ndarray, heldout: np.ndarray, latent: np.ndarray,
                    position: np.ndarray, value: np.ndarray, n_latents: int, vocab: list[str],
                    n_examples: int = 20) -> list[dict]:
    """One explanation per latent (see the module docstring). tokens, counted: (C, T); heldout:
    (C,) bool; latent, position, value: the firings (any order), position = context * T + t."""
    C, T = tokens.shape
    V = len(vocab)
    heldout_position = np.repeat(heldout, T)  # (C T,)
    found_on = counted.reshape(-1) & ~heldout_position
    scored_on = counted.reshape(-1) & heldout_position
    train = ~heldout_position[position]
    firings_train = np.bincount(latent[train], minlength=n_latents)
    firings_heldout = np.bincount(latent[~train], minlength=n_latents)

    # Candidates: the n-grams ending at each latent's n_examples strongest non-held-out firings.
    order = np.lexsort((-value[train], latent[train]))
    top_latent, top_position = latent[train][order], position[train][order]
    starts = np.searchsorted(top_latent, np.arange(n_latents))
    keep = np.arange(len(top_latent)) - starts[top_latent] < n_examples
    top_latent, top_position = top_latent[keep], top_position[keep]

    candidates = {}  # n -> (latents, keys, train matches, train hits, heldout matches, heldout hits)
    for n in range(1, MAX_N + 1):
        keys = ngram_keys(tokens, n, V)
        found, scored = (Counter(keys, where, latent[side], position[side])
                         for where, side in ((found_on, train), (scored_on, ~train)))
        pairs = np.unique(np.stack([top_latent, keys[top_position]], 1), axis=0)
        pairs = pairs[pairs[:, 1] >= 0]
        lat, key = pairs[:, 0], pairs[:, 1]
        candidates[n] = (lat, key, found.matches(key), found.hits(lat, key), scored.matches(key), scored.hits(lat, key))

    by_latent: list[list] = [[] for _ in range(n_latents)]
    for n, (lat, key, m, h, m_ho, h_ho) in candidates.items():
        for row in zip(lat.tolist(), key.tolist(), m.tolist(), h.tolist(), m_ho.tolist(), h_ho.tolist()):
            by_latent[row[0]].append((unpack(row[1], n, V), *row[2:]))
    return [
        explain_one(by_latent[l], int(firings_train[l]), int(firings_heldout[l]), vocab) for l in range(n_latents)
    ]


def unpack(key: int, n: int, vocab_size: int) -> tuple[int, ...]:
    """The token ids of an n-gram key, first to last."""
    ids = []
    for _ in range(n):
        key, token = divmod(key, vocab_size)
        ids.append(token)
    return tuple(reversed(ids))


def f1(hits: int, matches: int, firings: int) -> float:
    """2PR / (P + R) with P = hits / matches, R = hits / firings."""
    return 2 * hits / (matches + firings) if matches + firings else 0.0


def choose_patterns(candidates: list[tuple], firings: int) -> list[tuple]:
    """Greedy union of up to MAX_PATTERNS disjoint candidates with the best F1 on the contexts
    they were found on. A candidate is (pattern, matches, hits, ...)."""
    chosen: list[tuple] = []
    best = 0.0
    for _ in range(MAX_PATTERNS):
        step = None
        for candidate in candidates:
            if any(ends_with(candidate[0], c[0]) for c in chosen):
                continue  # already covered by a shorter chosen pattern (or chosen itself)
            union = [c for c in chosen if not ends_with(c[0], candidate[0])] + [candidate]
            score = f1(sum(c[2] for c in union), sum(c[1] for c in union), firings)
            if score > best + MIN_GAIN:
                step, best = union, score
        if step is None:
            break
        chosen = step
    return chosen


def ends_with(pattern: tuple, suffix: tuple) -> bool:
    """True when `pattern` matches only where `suffix` does (it ends with it)."""
    return len(pattern) >= len(suffix) and pattern[len(pattern) - len(suffix) :] == suffix


def explain_one(candidates: list[tuple], firings_train: int, firings_heldout: int, vocab: list[str]) -> dict:
    chosen = choose_patterns(candidates, firings_train)
    matches = sum(c[3] for c in chosen)
    hits = sum(c[4] for c in chosen)
    return {
        "text": " | ".join(pattern_text(c[0], vocab) for c in chosen),
        "patterns": [list(c[0]) for c in chosen],
        "precision": hits / matches if matches else None,
        "recall": hits / firings_heldout if firings_heldout else None,
        "f1": f1(hits, matches, firings_heldout) if chosen and matches + firings_heldout else None,
        "matches": matches,
        "firings": firings_heldout,
    }


def show(token: str) -> str:
    for char, mark in VISIBLE.items():
        token = token.replace(char, mark)
    return token


def pattern_text(pattern: tuple, vocab: list[str]) -> str:
    """`socket.⟦AF⟧`: the preceding tokens, then the firing token in brackets."""
    *before, firing = pattern
    return "".join(show(vocab[t]) for t in before) + "⟦" + show(vocab[firing]) + "⟧"
