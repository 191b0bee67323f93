"""The feature page's record: one latent with everything the harvest knows about it.

    feature = get_feature(session, sae_id, index, urls)   # None when there is no such latent

Six reads by primary key (the latent with its details and SAE, its examples with their contexts,
the token strings of its logit effects, its family across a ladder's sizes (app.families), the
explanations of its neighbours and family, its LLM explanations), so the page costs the same at 64 latents or at
65,536 (bench/feature_page.py).
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import Field, PrivateAttr, computed_field
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.ablation import AblationOut, stored_ablation
from app.families import AcrossSizesOut, across_sizes
from app.models import LATENT_BLOBS, Context, LadderRung, Latent, LatentDetail, Sae, Vocab
from app.models import Example as ExampleRow
from app.explanations import ExplanationSourceOut, llm_explanations, ranked
from app.queries import ExplanationOut, NeighbourOut, Record, SaeSource
from app.urls import URLs

Window = Literal["snippet", "full"]  # the page's examples: around each firing, or whole contexts
# The snippet shown by default: the tokens before the firing token matter most to what it means.
SNIPPET_BEFORE, SNIPPET_AFTER = 10, 4


class ExampleOut(Record):
    """One context a latent fired in: the latent's activation on every token of it."""

    bin: int = Field(exclude=True)  # 0 = top examples, 1..Q = quantile bins (Q = the highest)
    rank: int
    context_id: int
    position: int = Field(description="the token shown as firing: the context's peak, or the sampled token of a quantile bin")
    max_activation: float = Field(description="the latent's largest activation in this context")
    tokens: list[str]
    token_ids: list[int]
    activations: list[float] = Field(description="one per token, the latent's activation")
    copy_of: int | None = Field(None, description="a top example only: the rank of a stronger top example whose "
                                                  "snippet (the tokens around the firing) is the same, e.g. the same "
                                                  "code copied around the corpus; the page folds it into that one")
    copies: int = Field(0, description="a top example only: how many weaker top examples are copies of it")

    @computed_field(description="the latent's activation at position")
    @property
    def activation(self) -> float:
        return self.activations[self.position] if self.position < len(self.activations) else 0.0

    @computed_field(description="[start, end) of the tokens the page shows around position")
    @property
    def snippet(self) -> tuple[int, int]:
        return max(0, self.position - SNIPPET_BEFORE), min(len(self.tokens), self.position + SNIPPET_AFTER + 1)


class QuantileOut(Record):
    """Examples sampled from one activation quantile: firings between `low` and `high`."""

    bin: int = Field(description="1..Q, Q the highest")
    low: float
    high: float
    share: float = Field(description="share of the latent's firings between low and high")
    examples: list[ExampleOut]


class HistogramOut(Record):
    edges: list[float]  # H + 1 increasing bin edges
    counts: list[int]  # H


class TokenEffectOut(Record):
    token_id: int
    token: str
    value: float  # the change of the token's logit per unit of activation


class LogitsOut(Record):
    top: list[TokenEffectOut] = Field(description="tokens whose logit the latent raises most")
    bottom: list[TokenEffectOut] = Field(description="tokens whose logit it lowers most")
    histogram: HistogramOut = Field(description="every vocabulary token's logit effect")


class ExcludedOut(Record):
    positions: list[int] = Field(description="context positions left out of every statistic (attention sinks)")
    token_ids: list[int]
    tokens: list[str]


class FeatureOut(Record):
    """One latent: statistics, histograms, examples, logit effects, neighbours, explanation."""

    sae_id: str
    index: int
    density: float = Field(description="share of harvest tokens it fires on")
    n_tokens: int | None = Field(description="harvest tokens the statistics are over")
    max_activation: float
    mean_activation: float = Field(description="over the tokens it fires on")
    histogram: HistogramOut = Field(description="its non-zero activations in equal bins over (0, max_activation]")
    top_examples: list[ExampleOut]
    quantiles: list[QuantileOut] = Field(description="examples sampled per activation quantile, highest bin first")
    logits: LogitsOut
    neighbours: list[NeighbourOut] = Field(description="nearest latents by decoder cosine, most similar first")
    explanation: ExplanationOut | None = Field(description="the token pattern read off the harvest, with its scores")
    explanations: list[ExplanationSourceOut] = Field(
        description="every explanation, best first: the token pattern and those of language models (saescope explain)")
    excluded: ExcludedOut
    prev: str | None  # the twins of the latents before and after
    next: str | None
    random: str
    url: str
    sae_url: str
    across_sizes: AcrossSizesOut | None = Field(
        description="when the SAE is in a ladder's n series: its nearest latents in each other size")
    ablation: AblationOut | None = Field(
        None, description="what removing it changes over its first top examples, once computed (ablation_url computes it)")
    ablation_url: str = Field(description="the ablation section (computed on its first view, then kept); + .json")
    # what only the page shows
    n_latents: int = Field(exclude=True)
    n_quantiles: int = Field(exclude=True)  # Q, the harvest's quantile bins
    explanation_method: str | None = Field(None, exclude=True)  # harvest.json's explanation: how it was found
    heldout_contexts: int | None = Field(None, exclude=True)  # ... and on how many held-out contexts it was scored
    _source: SaeSource | None = PrivateAttr(None)

    @property
    def source(self) -> SaeSource | None:
        """Where the SAE's weights are: can the probe run it here? (read with the latent)"""
        return self._source

    @computed_field(description="harvest tokens it fires on")
    @property
    def firings(self) -> int | None:
        """Harvest tokens it fired on (density x tokens)."""
        return None if self.n_tokens is None else round(self.density * self.n_tokens)

    @property
    def prev_index(self) -> int | None:
        return self.index - 1 if self.index > 0 else None

    @property
    def next_index(self) -> int | None:
        return self.index + 1 if self.index + 1 < self.n_latents else None


# ---------------------------------------------------------------- the query


def get_feature(session: Session, sae_id: str, index: int, urls: URLs = URLs()) -> FeatureOut | None:
    # Whether the SAE is a rung of a ladder, in the same read: most are not, and they skip the
    # family query.
    rung = select(LadderRung.ladder_id).where(LadderRung.sae_id == Sae.id).scalar_subquery()
    row = session.execute(
        select(Latent, LatentDetail, Sae.n_latents, Sae.harvest, *SaeSource.columns, rung.label("ladder_id"))
        .join(Sae, Sae.id == Latent.sae_id)
        .outerjoin(LatentDetail, (LatentDetail.sae_id == Latent.sae_id) & (LatentDetail.index == Latent.index))
        .where(Latent.sae_id == sae_id, Latent.index == index)
    ).first()
    if row is None:
        return None
    latent, detail, n_latents, harvest_json = row[:4]
    harvest = json.loads(harvest_json or "{}")
    explained = harvest.get("explanation") or {}  # how the harvest found and scored explanations
    # A latent loaded before migration 0004 has no details: its arrays read as empty.
    arrays = {name: blob(getattr(detail, name, None), dtype) for name, dtype in LATENT_BLOBS.items()}
    excluded_ids = [int(i) for i in harvest.get("excluded_token_ids", [])]
    logit_ids = [*arrays["logit_top_ids"].tolist(), *arrays["logit_bottom_ids"].tolist()]
    tokens = token_strings(session, sae_id, logit_ids + excluded_ids)
    top_examples, by_bin = examples(session, sae_id, index)
    family = across_sizes(session, sae_id, index, urls) if row.ladder_id else None
    neighbour_index = arrays["neighbour_index"].tolist()
    summaries = latent_summaries(session, {sae_id: neighbour_index} | (family.wanted() if family else {}))
    if family:
        family.describe(summaries)

    def link(neighbour: int | None) -> str | None:
        return None if neighbour is None else urls.feature(sae_id, neighbour, fmt="json")

    feature = FeatureOut(
        sae_id=sae_id, index=index, n_latents=n_latents, n_tokens=harvest.get("n_tokens"),
        density=latent.density, max_activation=latent.max_activation, mean_activation=latent.mean_activation,
        histogram=HistogramOut(edges=np.linspace(0, latent.max_activation, len(arrays["histogram"]) + 1).tolist(),
                               counts=arrays["histogram"].tolist()),
        top_examples=mark_copies(top_examples),
        quantiles=quantile_bins(arrays["quantile_edges"], arrays["quantile_share"], by_bin),
        n_quantiles=len(arrays["quantile_share"]),
        logits=LogitsOut(
            top=effects(arrays["logit_top_ids"], arrays["logit_top_values"], tokens),
            bottom=effects(arrays["logit_bottom_ids"], arrays["logit_bottom_values"], tokens),
            histogram=HistogramOut(edges=np.linspace(getattr(detail, "logit_min", 0), getattr(detail, "logit_max", 0),
                                                     len(arrays["logit_histogram"]) + 1).tolist(),
                                   counts=arrays["logit_histogram"].tolist())),
        neighbours=[NeighbourOut(index=i, cosine=round(c, 6), **summaries[sae_id, i], url=link(i))
                    for i, c in zip(neighbour_index, arrays["neighbour_cosine"].tolist()) if (sae_id, i) in summaries],
        explanation=ExplanationOut.of(latent, getattr(detail, "explanation_patterns", None)),
        explanations=ranked(latent.explanation, latent.explanation_f1, llm_explanations(session, sae_id, [index]).get(index, [])),
        excluded=ExcludedOut(positions=[int(p) for p in harvest.get("excluded_positions", [])], token_ids=excluded_ids,
                             tokens=[tokens.get(i, "") for i in excluded_ids]),
        explanation_method=explained.get("method"),
        heldout_contexts=explained.get("heldout_contexts"),
        prev=link(index - 1 if index > 0 else None), next=link(index + 1 if index + 1 < n_latents else None),
        random=urls.random_feature(sae_id, fmt="json"), url=urls.feature(sae_id, index),
        sae_url=urls.sae(sae_id, fmt="json"),
        across_sizes=family,
        ablation=stored_ablation(session, sae_id, index),
        ablation_url=urls.feature_ablation(sae_id, index),
    )
    feature._source = SaeSource.of(row)
    return feature


def examples(session: Session, sae_id: str, index: int) -> tuple[list[ExampleOut], dict[int, list[ExampleOut]]]:
    """The latent's top examples, and its quantile examples by bin, with their contexts' tokens
    (each context decoded once even when several examples show it). One read: each example's
    context comes by primary key through a subquery (a join left PostgreSQL free to hash every
    context of the SAE instead)."""
    def context_column(column):
        return (select(column).where(Context.sae_id == ExampleRow.sae_id, Context.context_id == ExampleRow.context_id)
                .scalar_subquery())

    rows = session.execute(
        select(ExampleRow.bin, ExampleRow.rank, ExampleRow.context_id, ExampleRow.position, ExampleRow.max_activation,
               ExampleRow.activations, context_column(Context.tokens), context_column(Context.token_ids))
        .where(ExampleRow.sae_id == sae_id, ExampleRow.latent_index == index)
    ).all()
    rows.sort(key=lambda row: (row[0], row[1]))  # (bin, rank) here, not in SQL: PostgreSQL may bitmap-scan and sort
    contexts: dict[int, tuple[list[str], list[int]]] = {}
    by_bin: dict[int, list[ExampleOut]] = {}
    for bin_, rank, context_id, position, max_activation, activations, tokens, token_ids in rows:
        if context_id not in contexts:
            contexts[context_id] = json.loads(tokens), np.frombuffer(token_ids, dtype="<i4").tolist()
        values = np.frombuffer(activations, dtype="<f2").astype(np.float64).round(4).tolist()
        context_tokens, context_ids = contexts[context_id]
        # built without validation: every value has its type already, and a page holds thousands of them
        by_bin.setdefault(bin_, []).append(ExampleOut.model_construct(
            bin=bin_, rank=rank, context_id=context_id, position=position, max_activation=max_activation,
            tokens=context_tokens, token_ids=context_ids, activations=values))
    return by_bin.pop(0, []), by_bin


def mark_copies(examples: list[ExampleOut]) -> list[ExampleOut]:
    """Near-duplicate contexts (the same code copied around the corpus): a top example whose
    snippet's token ids equal a stronger one's, the firing at the same place in it, is marked a
    copy of it, and that one counts its copies. `examples` are strongest first."""
    first: dict[tuple, ExampleOut] = {}
    for example in examples:
        start, end = example.snippet
        key = (example.position - start, tuple(example.token_ids[start:end]))
        if (original := first.get(key)) is None:
            first[key] = example
        else:
            example.copy_of = original.rank
            original.copies += 1
    return examples


def quantile_bins(edges: np.ndarray, share: np.ndarray, by_bin: dict[int, list[ExampleOut]]) -> list[QuantileOut]:
    """Bins that hold a share of the firings or an example, highest first; within a bin, the
    sampled firings strongest first (the harvest samples them in no order)."""
    def strongest_first(examples: list[ExampleOut]) -> list[ExampleOut]:
        return sorted(examples, key=lambda example: (-example.activation, example.rank))

    bins = [QuantileOut(bin=q + 1, low=float(edges[q]), high=float(edges[q + 1]), share=float(share[q]),
                        examples=strongest_first(by_bin.get(q + 1, []))) for q in range(len(share))]
    return [b for b in reversed(bins) if b.share > 0 or b.examples]


def token_strings(session: Session, sae_id: str, token_ids: list[int]) -> dict[int, str]:
    if not token_ids:
        return {}
    rows = session.execute(select(Vocab.token_id, Vocab.token)
                           .where(Vocab.sae_id == sae_id, Vocab.token_id.in_(sorted(set(token_ids)))))
    return dict(rows.all())


def effects(ids: np.ndarray, values: np.ndarray, tokens: dict[int, str]) -> list[TokenEffectOut]:
    return [TokenEffectOut(token_id=i, token=tokens.get(i, ""), value=round(v, 6))
            for i, v in zip(ids.tolist(), values.tolist())]


def latent_summaries(session: Session, wanted: dict[str, list[int]]) -> dict[tuple[str, int], dict]:
    """The explanation, density and explanation F1 of latents of one or more SAEs, {(sae_id,
    index): {"explanation": ..., "density": ..., "explanation_f1": ...}}: the page's neighbours
    and family in one read, a primary-key range per SAE."""
    conditions = [and_(Latent.sae_id == sae_id, Latent.index.in_(sorted(set(indices))))
                  for sae_id, indices in wanted.items() if indices]
    if not conditions:
        return {}
    rows = session.execute(select(Latent.sae_id, Latent.index, Latent.explanation, Latent.density, Latent.explanation_f1)
                           .where(or_(*conditions)))
    return {(sae_id, index): {"explanation": explanation, "density": density, "explanation_f1": f1}
            for sae_id, index, explanation, density, f1 in rows}


def blob(data: bytes | None, dtype: str) -> np.ndarray:
    """A per-latent BLOB as an array (empty for rows loaded before migration 0004)."""
    return np.frombuffer(data, dtype=dtype) if data else np.zeros(0, dtype=dtype)


def random_index(session: Session, sae_id: str, rng) -> int | None:
    """A latent drawn uniformly among those that fired (any latent when none did), read as one
    step along the density index rather than by counting or scanning the table."""
    n_latents, histogram = session.execute(
        select(Sae.n_latents, Sae.density_histogram).where(Sae.id == sae_id)).one_or_none() or (None, None)
    if n_latents is None:
        return None
    dead = json.loads(histogram)["dead"] if histogram else 0
    if dead >= n_latents:
        return rng.randrange(n_latents)
    # Dead latents have density 0: the live ones are the last n - dead in density order.
    return session.execute(
        select(Latent.index).where(Latent.sae_id == sae_id).order_by(Latent.density, Latent.index)
        .offset(dead + rng.randrange(n_latents - dead)).limit(1)
    ).scalar_one()
