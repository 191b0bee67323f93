"""Each latent's full-text search document, built by the loader from the harvest: what the
latent is explained as, and what it fires on, in words.

    columns = search_documents(arrays, vocab, explanations)   # latent_search's columns

A document has three weighted fields (app/fulltext.py ranks them; BM25 on SQLite, ts_rank_cd on
PostgreSQL):

- `explanation` (weight A): every explanation of the latent, from any source: a list of
  (latent index, source, text) rows, such as the harvest's n-gram patterns (`ngram`) or a
  language model's sentences;
- `fires_on` (weight B): the word each firing is on, over the latent's top examples (the
  strongest firing of each) and its quantile samples (firings spread over its whole range), a word
  repeated 1 + log2(count) times, so that what it fires on most weighs most without one word
  drowning the rest; and, counted the same way where it is at least a quarter of the
  latent's firings, the firing token's role in Python source
  (app/python_roles.py: "comment", "string literal docstring", `for`'s "the for statement
  looping"), so that a query in words ("loops", "comments") finds what no token spells;
- `context` (weight C): the words just before (CONTEXT_BEFORE tokens) and after (CONTEXT_AFTER)
  those firings, counted the same way, those around at least two of them: `except` before the token a latent fires on is how
  a query in words ("exception handling") finds a latent that fires inside exception handlers.

Words are runs of letters, digits and underscores in the context's text, so a word spans the
tokens it is made of (` Key`, `Error` -> `KeyError`; ` error`, `_handler` -> `error_handler`); each
is written whole (lower-cased) and, when it is an identifier of several
parts, also split (`KeyError` -> `keyerror key error`, `error_handler` -> `error handler`,
`utf8` -> `utf 8`), so that "error" finds `KeyError` and `error_handler`. Queries are read the
same way (`index_words`).
"""

from __future__ import annotations

import heapq
import json
import math
import re
from bisect import bisect_right
from functools import lru_cache
from itertools import accumulate
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from app.python_roles import roles

CONTEXT_BEFORE = 8  # tokens before a firing whose words are its context
CONTEXT_AFTER = 2
MAX_FIRES_ON = 24  # distinct words kept per latent, the most frequent
MAX_CONTEXT = 24
# A word around one firing only says little, and in every document it makes common code words
# (self, error, return) so frequent that BM25's inverse document frequency ignores them for all.
CONTEXT_LEAST = 2
CONTEXT_SHARE = 0.1  # ... and around at least this share of its firings: the neighbours it keeps
MAX_ROLES = 4  # Python roles (comment, string literal, a keyword's words) kept per latent
ROLE_SHARE = 0.25  # ... those of at least this share of its firings
TOP_TOKENS = 6  # firing tokens shown beside a search result
MAX_WORD = 60  # characters: longer runs (hashes, base64) are no words anyone types
WORD = re.compile(r"[^\W_]+")  # letters and digits; `_` separates the parts of an identifier
IDENTIFIER = re.compile(r"\w+")
PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+|[^\W\d_A-Za-z]+")


class ExplanationText(NamedTuple):
    """One explanation of one latent, as the search document takes it."""

    latent: int
    source: str  # "ngram" (the harvest's token patterns), or another explainer's name
    text: str


def identifier_parts(word: str) -> list[str]:
    """The parts of an identifier, lower-cased: camelCase, snake_case and digits split
    (`HTTPServer2` -> http, server, 2); [] for a word of one part."""
    parts = [part.lower() for piece in word.split("_") for part in PART.findall(piece)]
    return parts if len(parts) > 1 else []


def index_words(text: str) -> list[str]:
    """The words of `text` as documents and queries are indexed: each identifier lower-cased,
    whole, then its parts when it has several (`self.error_handler` -> self, error, handler;
    `KeyError` -> keyerror, key, error)."""
    words: list[str] = []
    for identifier in IDENTIFIER.findall(text):
        if len(identifier) > MAX_WORD:
            continue
        whole = [w.lower() for w in WORD.findall(identifier)]
        words += whole if len(whole) > 1 else whole + identifier_parts(identifier)
        if len(whole) > 1:  # snake_case: its parts are the words; camelCase parts inside them too
            words += [part for w in WORD.findall(identifier) for part in identifier_parts(w)]
    return words


def explanation_field(texts: list[str]) -> str:
    """The explanations as one field: their text, then their identifiers split."""
    return " . ".join(" ".join(index_words(text)) for text in texts if text)


def weighted(counts: dict[str, int], limit: int, least: int = 1) -> str:
    """The most frequent `limit` words of those counted at least `least` times, each written
    1 + log2(count) times (its parts too)."""
    kept = [(-count, word) for word, count in counts.items() if count >= least]
    ranked = [(word, -negative) for negative, word in heapq.nsmallest(limit, kept)]  # most frequent, then by word
    return " ".join(" ".join([indexed(word)] * (1 + int(math.log2(count)))) for word, count in ranked)


@lru_cache(maxsize=1 << 16)
def indexed(word: str) -> str:
    """index_words of one word (or role), joined: the same few thousand recur in every document."""
    return " ".join(index_words(word))


class ContextWords:
    """The words of the harvest's contexts: for each (context, position), the id of the word that
    token is part of (-1: none, e.g. punctuation or spaces), and each word's text; and the id of
    the token's role in Python source (app.python_roles: "comment", "the for statement looping"),
    in the same id space."""

    def __init__(self, token_ids: np.ndarray, used: np.ndarray, vocab: list[str]):
        self.row = np.full(len(token_ids), -1, dtype=np.int64)  # context id -> row of word_of
        self.row[used] = np.arange(len(used))
        self.words: list[str] = []
        ids: dict[str, int] = {}
        T = token_ids.shape[1]
        self.word_of = np.full((len(used), T), -1, dtype=np.int64)  # (U, T)
        self.role_of = np.full((len(used), T), -1, dtype=np.int64)  # (U, T)
        for r, context in enumerate(token_ids[used].tolist()):
            pieces = [vocab[t] if 0 <= t < len(vocab) else "" for t in context]
            text = "".join(pieces)
            ends = list(accumulate(len(p) for p in pieces))  # each token's end offset in the text
            word_row, role_row = [-1] * T, [-1] * T
            for start, end, role in roles(text):
                role_id = self._id(ids, role)
                for position in range(bisect_right(ends, start), min(T, bisect_right(ends, max(start, end - 1)) + 1)):
                    role_row[position] = role_id
            for match in IDENTIFIER.finditer(text):  # `error_handler` whole: index_words splits it
                word = match.group()
                if len(word) > MAX_WORD:
                    continue
                word_id = self._id(ids, word)
                for position in range(bisect_right(ends, match.start()), min(T, bisect_right(ends, match.end() - 1) + 1)):
                    if word_row[position] < 0:  # a token holding two words keeps the first
                        word_row[position] = word_id
            self.word_of[r] = word_row
            self.role_of[r] = role_row
        self.T = T

    def _id(self, ids: dict[str, int], word: str) -> int:
        found = ids.get(word)
        if found is None:
            found = ids[word] = len(self.words)
            self.words.append(word)
        return found

    def at(self, context: np.ndarray, position: np.ndarray, of: str = "word_of") -> np.ndarray:
        """The word ids (or role ids) at (context, position) pairs, -1 outside the context or
        where none is."""
        inside = (position >= 0) & (position < self.T)
        found = np.full(len(context), -1, dtype=np.int64)
        found[inside] = getattr(self, of)[self.row[context[inside]], position[inside]]
        return found


def firings(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latent, context, position) of every firing the harvest shows: each top example's
    strongest token, and every quantile sample."""
    top = arrays["top_context"] >= 0  # (n, K)
    top_latent, _ = np.nonzero(top)
    top_position = arrays["top_activations"][top].argmax(-1)  # (N1,)
    quantile = arrays["quantile_context"] >= 0  # (n, Q, S)
    q_latent = np.nonzero(quantile)[0]
    return (np.concatenate([top_latent, q_latent]),
            np.concatenate([arrays["top_context"][top], arrays["quantile_context"][quantile]]).astype(np.int64),
            np.concatenate([top_position, arrays["quantile_position"][quantile]]).astype(np.int64))


def count_pairs(latent: np.ndarray, word: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (latent, word) pairs with their counts, words < 0 left out."""
    keep = word >= 0
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    width = int(word[keep].max()) + 1
    keys, counts = np.unique(latent[keep].astype(np.int64) * width + word[keep], return_counts=True)  # one int64 key per pair
    return keys // width, keys % width, counts


def per_latent(n: int, latent: np.ndarray, item: np.ndarray, counts: np.ndarray, name) -> list[dict[str, int]]:
    """Each latent's {item's name: count}, from pairs sorted by latent (count_pairs' order)."""
    out: list[dict[str, int]] = [{} for _ in range(n)]
    names = [name(i) for i in item.tolist()]
    counts = counts.tolist()
    bounds = np.searchsorted(latent, np.arange(n + 1)).tolist()
    for i in np.unique(latent).tolist():
        out[i] = dict(zip(names[bounds[i]:bounds[i + 1]], counts[bounds[i]:bounds[i + 1]]))
    return out


def search_documents(arrays: dict[str, np.ndarray], vocab: list[str],
                     explanations: Iterable[ExplanationText]) -> dict[str, np.ndarray | list]:
    """The latent_search columns of one SAE: a document per latent (app.loader writes them with
    the SAE). `explanations` may hold several rows per latent, from any sources."""
    n = len(arrays["density"])
    latent, context, position = firings(arrays)
    words = ContextWords(arrays["token_ids"], np.unique(context), vocab)
    on = words.at(context, position)
    fires_on = per_latent(n, *count_pairs(latent, on), name=words.words.__getitem__)
    # A role counts only where it is a good share of the latent's firings: nearly every latent
    # fires now and then inside a comment or a string, and a word in most documents ranks nothing.
    role_latent, role_id, role_count = count_pairs(latent, words.at(context, position, "role_of"))
    typical = role_count >= ROLE_SHARE * np.bincount(latent, minlength=n)[role_latent]
    role = per_latent(n, role_latent[typical], role_id[typical], role_count[typical], name=words.words.__getitem__)
    # Around each firing: each word once per firing, not the firing's own word.
    offsets = [d for d in range(-CONTEXT_BEFORE, CONTEXT_AFTER + 1) if d]
    around = np.stack([words.at(context, position + d) for d in offsets], 1)  # (F, W)
    around[around == on[:, None]] = -1
    around = np.sort(around, 1)
    around[:, 1:][around[:, 1:] == around[:, :-1]] = -1  # each word once per firing
    near = per_latent(n, *count_pairs(np.repeat(latent, len(offsets)), around.reshape(-1)), name=words.words.__getitem__)
    token = arrays["token_ids"][context, np.clip(position, 0, arrays["token_ids"].shape[1] - 1)]
    tokens = per_latent(n, *count_pairs(latent, token.astype(np.int64)), name=int)
    texts: list[list[str]] = [[] for _ in range(n)]
    for row in explanations:
        if 0 <= row.latent < n and row.text:
            texts[row.latent].append(row.text)
    return {
        "latent": np.arange(n, dtype=np.int64),
        "explanation": [explanation_field(t) for t in texts],
        "fires_on": [" ".join(filter(None, (weighted(counts, MAX_FIRES_ON), weighted(roles, MAX_ROLES))))
                     for counts, roles in zip(fires_on, role)],
        "context": [weighted(counts, MAX_CONTEXT, max(CONTEXT_LEAST, CONTEXT_SHARE * fired))
                    for counts, fired in zip(near, np.bincount(latent, minlength=n).tolist())],
        "top_tokens": [json.dumps([vocab[t] for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
                                   [:TOP_TOKENS] if 0 <= t < len(vocab)], ensure_ascii=False) for counts in tokens],
    }
