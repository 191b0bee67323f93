"""Search an SAE's latents by explanation text and by token, from the database's indexes.

    result = search(session, sae, "def")

- By token: the query, as typed and stripped and with one leading space (` def`, `def`), is
  looked up in the SAE's vocabulary (index on the token text); for each token found, the latents
  that fire most on it, strongest first (the few rows of token_latents under its key).
- By explanation: the query's words (`terms`, the same normalisation the loader applies to
  explanations) are looked up in explanation_terms; a latent must have every word, best scored
  explanation first (one range of the key per word).
- A number (`123`, `#123`) also names a latent directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ExplanationTerm, Latent, TokenLatent, Vocab
from app.queries import SaeSummary
from app.urls import URLs

WORD = re.compile(r"\w+")
MAX_TERM = 100  # characters: longer words are not indexed (explanation_terms.term holds 200)
MAX_TERMS = 8  # words of a query that count
MAX_TOKENS = 6  # vocabulary entries a query can match (variants, and tokens that read the same)
LATENT = re.compile(r"#?(\d{1,9})")


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


@dataclass
class LatentHit:
    """A latent in the results, with what the list shows of it."""

    index: int
    density: float
    max_activation: float
    explanation: str | None
    explanation_f1: float | None

    def as_json(self, urls: URLs, sae_id: str) -> dict:
        return {"index": self.index, "density": self.density, "max_activation": self.max_activation,
                "explanation": self.explanation, "explanation_f1": self.explanation_f1,
                "url": urls.feature(sae_id, self.index)}


@dataclass
class TokenHit:
    """A latent that fires on a searched token."""

    latent: LatentHit
    mean_activation: float  # over every occurrence of the token, zeros included
    fire_rate: float  # share of the token's occurrences it fires on

    def as_json(self, urls: URLs, sae_id: str) -> dict:
        return self.latent.as_json(urls, sae_id) | {"mean_activation": self.mean_activation, "fire_rate": self.fire_rate}


@dataclass
class TokenMatch:
    token_id: int
    token: str
    occurrences: int | None  # in the harvest tokens (None: no latent listed for it)
    latents: list[TokenHit]

    def as_json(self, urls: URLs, sae_id: str) -> dict:
        return {"token_id": self.token_id, "token": self.token, "occurrences": self.occurrences,
                "latents": [hit.as_json(urls, sae_id) for hit in self.latents]}


@dataclass
class SearchResult:
    sae: SaeSummary | None  # None: no SAE to search
    q: str
    limit: int
    terms: list[str] = field(default_factory=list)
    latent: LatentHit | None = None  # the latent a number names
    tokens: list[TokenMatch] = field(default_factory=list)
    explanations: list[LatentHit] = field(default_factory=list)

    def as_json(self, urls: URLs) -> dict:
        sae_id = self.sae.id if self.sae else None
        return {
            "sae": sae_id,
            "q": self.q,
            "terms": self.terms,
            "limit": self.limit,
            "latent": self.latent.as_json(urls, sae_id) if self.latent else None,
            "tokens": [match.as_json(urls, sae_id) for match in self.tokens],
            "explanations": [hit.as_json(urls, sae_id) for hit in self.explanations],
            "url": urls.search(sae=sae_id, q=self.q),
        }


def search(session: Session, sae: SaeSummary | None, q: str, limit: int = 20) -> SearchResult:
    result = SearchResult(sae=sae, q=q, limit=limit, terms=terms(q)[:MAX_TERMS])
    if sae is None or not q.strip():
        return result
    if (number := LATENT.fullmatch(q.strip())) and int(number.group(1)) < sae.n_latents:
        result.latent = latent_hits(session, sae.id, [int(number.group(1))])[0]
    result.tokens = token_matches(session, sae.id, q, limit)
    result.explanations = explanation_matches(session, sae.id, result.terms, limit)
    return result


def token_matches(session: Session, sae_id: str, q: str, limit: int) -> list[TokenMatch]:
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
        hits = {hit.index: hit for hit in latent_hits(session, sae_id, [row.latent for row in rows])}
        matches.append(TokenMatch(token_id, token, rows[0].occurrences if rows else None,
                                  [TokenHit(hits[row.latent], row.mean_activation, row.fire_rate) for row in rows]))
    return matches


def explanation_matches(session: Session, sae_id: str, words: list[str], limit: int) -> list[LatentHit]:
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
    hits = {hit.index: hit for hit in latent_hits(session, sae_id, indices)}
    return [hits[index] for index in indices]


def latent_hits(session: Session, sae_id: str, indices: list[int]) -> list[LatentHit]:
    if not indices:
        return []
    rows = session.execute(
        select(Latent.index, Latent.density, Latent.max_activation, Latent.explanation, Latent.explanation_f1)
        .where(Latent.sae_id == sae_id, Latent.index.in_(sorted(set(indices))))
    )
    return [LatentHit(*row) for row in rows]
