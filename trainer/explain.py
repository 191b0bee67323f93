"""Explanations without an LLM: a latent's token pattern, scored on held-out contexts.

The pattern has the form of Neuron2Graph's (Foote et al. 2023): the token the latent fires on,
and the preceding tokens that matter. N2G finds those by re-running the model on pruned
prompts; we find them from the harvest's own statistics, at no extra model cost:

1. candidates: the n-grams (n = 1..3) that end at the firing token, for the latent's 20
   strongest firings on the non-held-out contexts and 20 more drawn at random from them (so
   that patterns covering its weaker firings compete too);
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

import numpy as np
import torch

from trainer.grouping import first_per_group, random_keys

MAX_N = 3  # longest pattern: the firing token and two before it
MAX_PATTERNS = 5
MAX_CANDIDATES = 16  # per latent, the best on their own, for the greedy union
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


def count_codes(sorted_codes: torch.Tensor, codes: np.ndarray) -> np.ndarray:
    """How often each of `codes` occurs in `sorted_codes`."""
    query = torch.from_numpy(codes)
    return (torch.searchsorted(sorted_codes, query, right=True) - torch.searchsorted(sorted_codes, query)).numpy()


def explain_latents(tokens: np.ndarray, counted: np.ndarray, heldout: np.ndarray, latent: np.ndarray,
                    position: np.ndarray, value: np.ndarray, n_latents: int, vocab: list[str],
                    n_examples: int = 20, seed: int = 0) -> list[dict]:
    """One explanation per latent (see the module docstring). tokens, counted: (C, T); heldout:
    (C,) bool; latent, position, value: the firings (any order), position = context * T + t.
    Candidates come from each latent's `n_examples` strongest firings and as many drawn at random
    (seeded: the patterns that cover its weaker firings too)."""
    C, T = tokens.shape
    V = len(vocab)
    heldout_position = np.repeat(heldout, T)  # (C T,)
    found_on = counted.reshape(-1) & ~heldout_position
    scored_on = counted.reshape(-1) & heldout_position
    train = ~heldout_position[position]
    firings_train = np.bincount(latent[train], minlength=n_latents)
    firings_heldout = np.bincount(latent[~train], minlength=n_latents)

    # Candidate sources: the strongest and some random non-held-out firings of each latent.
    lt, pt = latent[train], position[train]
    groups, generator = torch.from_numpy(lt), torch.Generator().manual_seed(seed)
    sources = torch.cat([
        first_per_group(groups, torch.from_numpy(value[train]).float(), n_examples, n_latents, descending=True),
        first_per_group(groups, random_keys(len(lt), generator), n_examples, n_latents),
    ]).numpy()
    source_latent, source_position = lt[sources], pt[sources]

    columns = []  # per n: latent, pattern tokens, train matches/hits, held-out matches/hits
    for n in range(1, MAX_N + 1):
        keys = ngram_keys(tokens, n, V)
        table, key_id = np.unique(keys, return_inverse=True)  # key_id: each position's n-gram
        usable = keys >= 0
        occurrences = [np.bincount(key_id[where & usable], minlength=len(table)) for where in (found_on, scored_on)]
        fired = []  # per split: sorted (latent, n-gram) codes of the firings
        for side in (train, ~train):
            at = usable[position[side]]
            codes = (latent[side][at].astype(np.int64) << 32) | key_id[position[side][at]]
            fired.append(torch.sort(torch.from_numpy(codes)).values)
        codes = np.unique((source_latent.astype(np.int64) << 32) | key_id[source_position])
        lat, kid = codes >> 32, codes & 0xFFFFFFFF
        ok = table[kid] >= 0
        lat, kid, codes = lat[ok], kid[ok], codes[ok]
        tokens_of = np.stack([unpack_array(table[kid], n, V, back) for back in range(MAX_N - 1, -1, -1)], 1)
        columns.append((lat, tokens_of, occurrences[0][kid], count_codes(fired[0], codes),
                         occurrences[1][kid], count_codes(fired[1], codes)))
    lat, pattern, m, h, m_ho, h_ho = (np.concatenate(parts) for parts in zip(*columns))

    # Keep each latent's best candidates on their own (F1 on the non-held-out contexts).
    own_f1 = torch.from_numpy(2 * h / (m + firings_train[lat])).float()
    keep = first_per_group(torch.from_numpy(lat), own_f1, MAX_CANDIDATES, n_latents, descending=True).numpy()
    by_latent = np.split(keep, np.searchsorted(lat[keep], np.arange(1, n_latents)))
    explanations = []
    for l, rows in enumerate(by_latent):
        candidates = [(tuple(int(t) for t in pattern[r] if t >= 0), int(m[r]), int(h[r]), int(m_ho[r]), int(h_ho[r]))
                      for r in rows]
        explanations.append(explain_one(candidates, int(firings_train[l]), int(firings_heldout[l]), vocab))
    return explanations


def unpack_array(keys: np.ndarray, n: int, vocab_size: int, back: int) -> np.ndarray:
    """The token `back` places before the last of each n-gram key, -1 where the n-gram is shorter."""
    if back >= n:
        return np.full(len(keys), -1, dtype=np.int64)
    return (keys // vocab_size**back) % vocab_size


def unpack(key: int, n: int, vocab_size: int) -> tuple[int, ...]:
    """The token ids of an n-gram key, first to last."""
    keys = np.array([key], dtype=np.int64)
    return tuple(int(unpack_array(keys, n, vocab_size, back)[0]) for back in range(n - 1, -1, -1))


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
