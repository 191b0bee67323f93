"""Search an SAE's latents by explanation text and by token, from the database's indexes.

    result = search(session, sae, "def", urls=urls)   # a SearchOut

- By token: the query, as typed and stripped and with one leading space (` def`, `def`), is
  looked up in the SAE's vocabulary (index on the token text); for each token found, the latents
  that fire most on it, strongest first (the few rows of token_latents under its key).
- By explanation: the query's words (`terms`, the same normalisation the loader applies to
  explanations) are looked up in explanation_terms; a latent must have every word, best scored
  explanation first (one range of the key per word).
- By meaning: the query's words, stemmed, against each latent's search document (its
  explanations, the words it fires on and the words around them; app/search_documents.py),
  ranked by relevance (app/fulltext.py: BM25 on SQLite, ts_rank_cd on PostgreSQL).
- A number (`123`, `#123`) also names a latent directly.
"""

from __future__ import annotations

import re

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.fulltext import query_words, rank_latents
from app.models import ExplanationTerm, Latent, TokenLatent, Vocab
from app.queries import LatentHitOut, Record, SaeSummary
from app.urls import URLs

WORD = re.compile(r"\w+")
MAX_TERM = 100  # characters: longer words are not indexed (explanation_terms.term holds 200)
MAX_TERMS = 8  # words of a query that count
MAX_TOKENS = 6  # vocabulary entries a query can match (variants, and tokens that read the same)
LATENT = re.compile(r"#?(\d{1,9})", re.ASCII)  # ASCII digits only, as every number the app reads (app.params)


def terms(text: str) -> list[str]:
    """The words of an explanation or a query, in order, each once: runs of letters, digits and
    underscores, case-folded (`socket.⟦AF⟧` -> socket, af)."""
    found = [word for word in WORD.findall(text.casefold()) if len(word) <= MAX_TERM]
    return list(dict.fromkeys(found))


def token_variants(query: str) -> list[str]:
    """Tokens a query may mean: as typed (leading spaces count: ` def` is its own token), stripped,
    and stripped with one leading space, in that order."""
    stripped = query.strip()
    variants = [query, stripped, " " + stripped] if stripped else [query]
    return [v for v in dict.fromkeys(variants) if v]


class TokenHitOut(LatentHitOut):
    """A latent that fires on a searched token."""

    mean_activation: float = Field(description="over every occurrence of the token, zeros included")
    fire_rate: float = Field(description="share of the token's occurrences it fires on")


class TokenMatchOut(Record):
    token_id: int
    token: str
    occurrences: int | None = Field(description="in the harvest tokens (null: no latent listed for it)")
    latents: list[TokenHitOut] = Field(description="the latents that fire most on it, strongest first")


class RankedHitOut(LatentHitOut):
    """A latent whose search document matches the query's words."""

    score: float = Field(description="relevance, higher first (BM25 on SQLite, ts_rank_cd on PostgreSQL)")
    fires_on: list[str] = Field(description="the tokens it fires on most in the harvest's examples")


class SearchOut(Record):
    """What a query finds in one SAE."""

    sae: str | None  # None: no SAE to search
    q: str
    terms: list[str] = Field(default_factory=list, description="the query's words, as explanations are indexed")
    limit: int
    latent: LatentHitOut | None = Field(None, description="the latent a number in q names")
    words: list[str] = Field(default_factory=list, description="the query's words as search by meaning reads them "
                                                               "(lower-cased, identifiers split)")
    ranked: list[RankedHitOut] = Field(default_factory=list,
                                       description="latents by meaning: their explanations, what they fire on and the "
                                                   "words around it matched against the query's words, most relevant first")
    tokens: list[TokenMatchOut] = Field(default_factory=list,
                                        description="tokens q may mean: as typed, stripped, with one leading space")
    explanations: list[LatentHitOut] = Field(default_factory=list,
                                             description="latents whose explanation has every word, best score first")
    url: str


def search(session: Session, sae: SaeSummary | None, q: str, limit: int = 20, urls: URLs = URLs()) -> SearchOut:
    sae_id = sae.id if sae else None
    result = SearchOut(sae=sae_id, q=q, limit=limit, terms=terms(q)[:MAX_TERMS], words=query_words(q),
                       url=urls.search(sae=sae_id, q=q))
    if sae is None or not q.strip():
        return result
    if (number := LATENT.fullmatch(q.strip())) and int(number.group(1)) < sae.n_latents:
        result.latent = latent_hits(session, sae.id, [int(number.group(1))], urls)[0]
    result.ranked = ranked_matches(session, sae.id, q, limit, urls)
    result.tokens = token_matches(session, sae.id, q, limit, urls)
    result.explanations = explanation_matches(session, sae.id, result.terms, limit, urls)
    return result


def ranked_matches(session: Session, sae_id: str, q: str, limit: int, urls: URLs = URLs()) -> list[RankedHitOut]:
    found = rank_latents(session, sae_id, q, limit)
    hits = {hit.index: hit for hit in latent_hits(session, sae_id, [hit.latent for hit in found], urls)}
    return [RankedHitOut(**dict(hits[hit.latent]), score=hit.score, fires_on=hit.top_tokens)
            for hit in found if hit.latent in hits]


def token_matches(session: Session, sae_id: str, q: str, limit: int, urls: URLs = URLs()) -> list[TokenMatchOut]:
    variants = token_variants(q)
    found = session.execute(
        select(Vocab.token_id, Vocab.token).where(Vocab.sae_id == sae_id, Vocab.token.in_(variants)).limit(MAX_TOKENS)
    ).all()
    found.sort(key=lambda row: (variants.index(row.token), row.token_id))  # as typed first
    matches = []
    for token_id, token in found:
        # The harvest keeps a few latents per token (its token_latents setting, 10): read them all
        # by the key and rank them here.
        rows = session.execute(
            select(TokenLatent.latent, TokenLatent.mean_activation, TokenLatent.fire_rate, TokenLatent.occurrences)
            .where(TokenLatent.sae_id == sae_id, TokenLatent.token_id == token_id)
        ).all()
        rows = sorted(rows, key=lambda row: (-row.mean_activation, row.latent))[:limit]
        hits = {hit.index: hit for hit in latent_hits(session, sae_id, [row.latent for row in rows], urls)}
        matches.append(TokenMatchOut(
            token_id=token_id, token=token, occurrences=rows[0].occurrences if rows else None,
            latents=[TokenHitOut(**dict(hits[row.latent]), mean_activation=row.mean_activation, fire_rate=row.fire_rate)
                     for row in rows]))
    return matches


def explanation_matches(session: Session, sae_id: str, words: list[str], limit: int,
                        urls: URLs = URLs()) -> list[LatentHitOut]:
    """Latents whose explanation has every word, best score first. Each word's latents are one
    range of the key (sae_id, term, latent); they are intersected and ranked here, which no
    query plan can turn into a read of the whole table."""
    scores: dict[int, float] | None = None
    for word in words:
        rows = session.execute(select(ExplanationTerm.latent, ExplanationTerm.score)
                               .where(ExplanationTerm.sae_id == sae_id, ExplanationTerm.term == word)).all()
        found = dict(rows)
        scores = found if scores is None else {latent: score for latent, score in scores.items() if latent in found}
        if not scores:
            return []
    if scores is None:
        return []
    indices = sorted(scores, key=lambda latent: (-scores[latent], latent))[:limit]
    hits = {hit.index: hit for hit in latent_hits(session, sae_id, indices, urls)}
    return [hits[index] for index in indices]


def latent_hits(session: Session, sae_id: str, indices: list[int], urls: URLs = URLs()) -> list[LatentHitOut]:
    if not indices:
        return []
    rows = session.execute(
        select(*LatentHitOut.columns).where(Latent.sae_id == sae_id, Latent.index.in_(sorted(set(indices))))
    )
    return [LatentHitOut.of(row, sae_id, urls) for row in rows]
