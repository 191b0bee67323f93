"""A latent's explanations and where each came from, best first: the harvest's token pattern
(scored by F1 on held-out tokens, trainer/explain.py) and those of language models (`saescope
explain`, scored by detection: balanced accuracy on held-out contexts, trainer/llm_explain.py).

The two scores are on different scales, so they are ranked by what each says beyond chance:
a pattern by its F1 (0 = it explains nothing), an LLM explanation by its informedness,
2 x balanced accuracy - 1 (0 = guessing, as good as saying "fires" to every context; 1 = perfect).

    rows = llm_explanation_rows(conn_or_session, sae_id)      # (sae_id, latent, source, text): for search
    by_latent = llm_explanations(session, sae_id, [3, 7])     # {latent: [ExplanationSourceOut]}
    attach_explanations(session, sae_id, hits)               # each hit's .explanations, best first
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from app.models import LatentExplanation

Kind = Literal["patterns", "llm"]


class ExplanationSourceOut(BaseModel):
    """One explanation of a latent, where it came from and how well it did on held-out text."""

    # as app.queries.Record (which this module cannot import: app.queries imports it)
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    kind: Kind = Field(description="'patterns': token n-grams read off the harvest; 'llm': a language model's")
    source: str = Field(description="'token patterns', or the language model's name")
    text: str
    score: float | None = Field(description="patterns: F1 on held-out tokens; llm: detection balanced accuracy on "
                                            "held-out contexts, half of them firing (0.5 = chance); null: not scored")
    n_scored: int | None = Field(None, description="llm: the held-out contexts scored")

    @computed_field(description="what ranks explanations of both kinds: F1, or 2 x balanced accuracy - 1 (0 = chance)")
    @property
    def rank_score(self) -> float | None:
        if self.score is None:
            return None
        return self.score if self.kind == "patterns" else max(0.0, 2 * self.score - 1)


def best_first(explanations: Iterable[ExplanationSourceOut]) -> list[ExplanationSourceOut]:
    """By rank_score, highest first, unscored last; ties keep the given order (patterns first)."""
    return sorted(explanations, key=lambda e: -1.0 if e.rank_score is None else -e.rank_score)


def pattern_explanation(text: str | None, f1: float | None) -> list[ExplanationSourceOut]:
    return [ExplanationSourceOut(kind="patterns", source="token patterns", text=text, score=f1)] if text else []


def llm_explanations(session: Session, sae_id: str, latents: Iterable[int]) -> dict[int, list[ExplanationSourceOut]]:
    """The LLM explanations of some latents of one SAE: one read of the primary key's range."""
    wanted = sorted(set(latents))
    if not wanted:
        return {}
    rows = session.execute(
        select(LatentExplanation.latent, LatentExplanation.source, LatentExplanation.text, LatentExplanation.score,
               LatentExplanation.n_scored)
        .where(LatentExplanation.sae_id == sae_id, LatentExplanation.latent.in_(wanted)))
    found: dict[int, list[ExplanationSourceOut]] = {}
    for latent, source, text, score, n_scored in rows:
        found.setdefault(latent, []).append(
            ExplanationSourceOut(kind="llm", source=source, text=text, score=score, n_scored=n_scored))
    return found


def ranked(pattern_text: str | None, pattern_f1: float | None, llm: list[ExplanationSourceOut]) -> list[ExplanationSourceOut]:
    """A latent's explanations of both kinds, best first."""
    return best_first(pattern_explanation(pattern_text, pattern_f1) + sorted(llm, key=lambda e: e.source))


def attach_explanations(session: Session, sae_id: str | None, hits: Iterable) -> None:
    """Set `.explanations` (best first) on latents as lists show them (app.queries.LatentHitOut:
    index, explanation, explanation_f1), with one read for all of them."""
    hits = [hit for hit in hits if hit is not None]
    if sae_id is None or not hits:
        return
    llm = llm_explanations(session, sae_id, (hit.index for hit in hits))
    for hit in hits:
        hit.explanations = ranked(hit.explanation, hit.explanation_f1, llm.get(hit.index, []))


def llm_explanation_rows(conn: Connection | Session, sae_id: str | None = None) -> list[tuple[str, int, str, str]]:
    """(sae_id, latent, source, text) of every LLM explanation, of one SAE or of all: what a search
    index over explanations reads. Call it inside the loader's transaction (app.loader
    write_llm_explanations is where an SAE's rows change) or on any session."""
    query = select(LatentExplanation.sae_id, LatentExplanation.latent, LatentExplanation.source, LatentExplanation.text)
    if sae_id is not None:
        query = query.where(LatentExplanation.sae_id == sae_id)
    return [tuple(row) for row in conn.execute(query.order_by(LatentExplanation.sae_id, LatentExplanation.latent,
                                                             LatentExplanation.source))]
