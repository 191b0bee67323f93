"""Full-text search over the latents' search documents (app/search_documents.py), ranked by
relevance, on either backend behind one function:

    hits = rank_latents(session, sae_id, "exception handling", limit=20)   # [(latent, score, top_tokens)]

- SQLite: FTS5 with the porter stemmer, ranked by BM25 with a weight per field (the migration
  configures FTS5's `rank`, so that `ORDER BY rank` is the index's own order).
- PostgreSQL: `to_tsvector('english', ...)` (the Snowball stemmer) per field with `setweight`,
  a GIN index, ranked by `ts_rank_cd` (cover density) with the weights below.

A query is never handed to either parser as typed: it is read into words (`query_words`: runs of
letters and digits, lower-cased), and each word becomes a quoted term, so FTS5's
syntax (`"`, `*`, `NEAR`, `-`, `:`, `^`) and tsquery's (`&`, `|`, `!`, `<->`, `:*`) are only ever
text. The words are OR-ed, each also as a prefix of its stem ("handling" -> handl*, which finds
`handler`, a stem Porter and Snowball keep apart): a latent matching more of them, in a heavier
field, more often, ranks first.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import NamedTuple

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from app.models import SEARCH_TABLE
from app.search_documents import MAX_WORD, WORD

MAX_WORDS = 12  # words of a query that count
MIN_PREFIX = 4  # shorter words are matched whole only ("if" must not find "iframe")
CANDIDATES = 5  # times the limit: the best by BM25 that SQLite re-ranks by the words they have
# Field weights: an explanation's word counts most, then what the latent fires on, then the words
# around. SQLite's are BM25 weights (migration 0008 writes them into FTS5's rank); PostgreSQL's are
# ts_rank_cd's for the labels D, C, B, A (D unused).
COLUMN_WEIGHTS = (8.0, 3.0, 1.0)
POSTGRES_WEIGHTS = "{0.0, 0.125, 0.375, 1.0}"


class FullTextHit(NamedTuple):
    latent: int
    score: float  # relevance: higher is better (BM25 on SQLite, ts_rank_cd on PostgreSQL; not comparable)
    top_tokens: list[str]  # the tokens it fires on most


def query_words(q: str) -> list[str]:
    """The words of a query, lower-cased, split at underscores (as both engines split words),
    each once, at most MAX_WORDS. A camelCase word stays whole: documents hold it whole as well as
    in parts, and its parts as query words would also match every `key` and every `error`."""
    return list(dict.fromkeys(word.lower() for word in WORD.findall(q) if len(word) <= MAX_WORD))[:MAX_WORDS]


def fts5_query(words: list[str]) -> str:
    """An FTS5 MATCH expression: each word a quoted string (its quotes doubled, although words
    have none), OR-ed, with the prefix form of longer words."""
    terms = []
    for word in words:
        quoted = '"' + word.replace('"', '""') + '"'
        terms += [quoted, quoted + "*"] if len(word) >= MIN_PREFIX else [quoted]
    return " OR ".join(terms)


def word_tsquery(word: str) -> str:
    """One word as a to_tsquery expression: quoted as a lexeme, with its prefix form when long."""
    quoted = "'" + word.replace("'", "''").replace("\\", "\\\\") + "'"
    return f"{quoted} | {quoted}:*" if len(word) >= MIN_PREFIX else quoted


def tsquery(words: list[str]) -> str:
    """A to_tsquery expression: each word (letters and digits only, as query_words makes them)
    quoted as a lexeme, OR-ed, with the prefix form of longer words."""
    return " | ".join(word_tsquery(word) for word in words)


def rank_latents(session: Session, sae_id: str, q: str, limit: int = 20) -> list[FullTextHit]:
    """The latents of `sae_id` whose search document matches `q`, most relevant first (on
    PostgreSQL ties go to the lower index; FTS5 orders ties itself)."""
    words = query_words(q)
    if not words:
        return []
    if session.get_bind().dialect.name == "postgresql":
        # ts_rank_cd has no inverse document frequency, so a word found often outweighs two words
        # found once; times the number of the query's words the document has (Lucene's "coord"),
        # a latent matching more of them ranks first, as BM25's sum of per-word scores gives.
        coverage = " + ".join(f"(document @@ to_tsquery('english', :w{i}))::int" for i in range(len(words)))
        rows = session.execute(text(
            f"SELECT latent, ts_rank_cd('{POSTGRES_WEIGHTS}', document, query) * ({coverage}) AS score, top_tokens "
            f"FROM {SEARCH_TABLE}, to_tsquery('english', :query) AS query "
            "WHERE sae_id = :sae_id AND document @@ query ORDER BY score DESC, latent LIMIT :limit"),
            {"query": tsquery(words), "sae_id": sae_id, "limit": limit,
             **{f"w{i}": word_tsquery(word) for i, word in enumerate(words)}}).all()
    else:
        rows = fts5_ranked(session, sae_id, words, limit)
    return [FullTextHit(int(latent), float(score), json.loads(tokens)) for latent, score, tokens in rows]


def fts5_ranked(session: Session, sae_id: str, words: list[str], limit: int) -> list[tuple[int, float, str]]:
    """(latent, score, top_tokens), best first: BM25 in FTS5's own order, then, for a query of
    several words, the best CANDIDATES x limit re-ranked by BM25 times the number of the query's
    words each has, as PostgreSQL ranks (one look-up per word among those candidates' rows).
    BM25 alone lets a document with one word many times ("handle") outrank one with both
    ("except" and "handler") for "exception handling"."""
    rows = session.execute(text(
        f"SELECT rowid, latent, -rank AS score, top_tokens FROM {SEARCH_TABLE} "
        f"WHERE {SEARCH_TABLE} MATCH :query AND sae_id = :sae_id ORDER BY rank LIMIT :limit"),
        {"query": fts5_query(words), "sae_id": sae_id, "limit": limit * (CANDIDATES if len(words) > 1 else 1)}).all()
    if len(words) < 2 or not rows:
        return [(latent, score, tokens) for _, latent, score, tokens in rows]
    found = text(f"SELECT rowid FROM {SEARCH_TABLE} WHERE {SEARCH_TABLE} MATCH :query AND rowid IN :rowids"
                 ).bindparams(bindparam("rowids", expanding=True))
    coverage = Counter()
    for word in words:
        coverage.update(session.execute(found, {"query": fts5_query([word]), "rowids": [row[0] for row in rows]}).scalars())
    ranked = sorted(rows, key=lambda row: (-row.score * coverage[row.rowid], row.latent))[:limit]
    return [(row.latent, row.score * coverage[row.rowid], row.top_tokens) for row in ranked]
