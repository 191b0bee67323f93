"""The feature page's query object: one latent with everything the harvest knows about it.

    feature = get_feature(session, sae_id, index)   # None when there is no such latent
    feature.as_json(urls)                            # the .json twin

Five reads by primary key (the latent with its details and SAE, its examples with their contexts,
the token strings of its logit effects, its family across a ladder's sizes (app.families), the
explanations of its neighbours and family), so the page costs the same at 64 latents or at
65,536 (bench/feature_page.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.families import AcrossSizes, across_sizes
from app.models import LATENT_BLOBS, Context, LadderRung, Latent, LatentDetail, Sae, Vocab
from app.models import Example as ExampleRow
from app.queries import Explanation
from app.urls import URLs

Window = Literal["snippet", "full"]  # the page's examples: around each firing, or whole contexts
# The snippet shown by default: the tokens before the firing token matter most to what it means.
SNIPPET_BEFORE, SNIPPET_AFTER = 10, 4


@dataclass
class Example:
    """One context a latent fired in: the latent's activation on every token of it."""

    bin: int  # 0 = top examples, 1..Q = quantile bins (Q = the highest)
    rank: int
    context_id: int
    position: int  # the firing shown: the context's peak (top) or the sampled token (quantile)
    max_activation: float  # over the whole context
    tokens: list[str]
    token_ids: list[int]
    activations: list[float]

    @property
    def activation(self) -> float:
        """The latent's activation on the token at `position`."""
        return self.activations[self.position] if self.position < len(self.activations) else 0.0

    @property
    def snippet(self) -> tuple[int, int]:
        """[start, end) of the tokens around `position` that the page shows by default."""
        return max(0, self.position - SNIPPET_BEFORE), min(len(self.tokens), self.position + SNIPPET_AFTER + 1)

    def as_json(self) -> dict:
        return {"rank": self.rank, "context_id": self.context_id, "position": self.position,
                "activation": self.activation, "max_activation": self.max_activation, "snippet": list(self.snippet),
                "tokens": self.tokens, "token_ids": self.token_ids, "activations": self.activations}


@dataclass
class QuantileBin:
    """Examples sampled from one activation quantile: firings between `low` and `high`."""

    bin: int  # 1..Q
    low: float
    high: float
    share: float  # of the latent's firings that fall in this bin
    examples: list[Example]

    def as_json(self) -> dict:
        return {"bin": self.bin, "low": self.low, "high": self.high, "share": self.share,
                "examples": [example.as_json() for example in self.examples]}


@dataclass
class Histogram:
    edges: list[float]  # H + 1 increasing bin edges
    counts: list[int]  # H

    def as_json(self) -> dict:
        return {"edges": self.edges, "counts": self.counts}


@dataclass
class TokenEffect:
    token_id: int
    token: str
    value: float  # the change of the token's logit per unit of activation

    def as_json(self) -> dict:
        return {"token_id": self.token_id, "token": self.token, "value": self.value}


@dataclass
class Neighbour:
    index: int
    cosine: float  # between the two latents' decoder directions
    explanation: str | None
    density: float
    explanation_f1: float | None = None  # the explanation's held-out score (dims a weak one)


@dataclass(frozen=True)
class SaeSource:
    """What the probe needs to tell whether it can run an SAE here (ProbeService.unavailable_for)."""

    id: str
    model: str
    run_dir: str
    content_hash: str


@dataclass
class Feature:
    """One latent: statistics, histograms, examples, logit effects, neighbours, explanation."""

    sae_id: str
    index: int
    n_latents: int
    n_tokens: int | None  # harvest tokens the statistics are over
    density: float
    max_activation: float
    mean_activation: float
    histogram: Histogram
    top_examples: list[Example]
    quantiles: list[QuantileBin]  # highest bin first, those with a share of firings or an example
    n_quantiles: int  # Q, the harvest's quantile bins
    logit_top: list[TokenEffect]
    logit_bottom: list[TokenEffect]
    logit_histogram: Histogram
    neighbours: list[Neighbour]
    explanation: Explanation | None
    excluded_positions: list[int]
    excluded_tokens: list[tuple[int, str]]  # (token id, token)
    explanation_method: str | None = None  # harvest.json's explanation: how it was found
    heldout_contexts: int | None = None  # ... and on how many held-out contexts it was scored
    source: SaeSource | None = None  # where the SAE's weights are: can the probe run it here?
    family: AcrossSizes | None = None  # its nearest latents in the other sizes of its ladder

    @property
    def prev_index(self) -> int | None:
        return self.index - 1 if self.index > 0 else None

    @property
    def next_index(self) -> int | None:
        return self.index + 1 if self.index + 1 < self.n_latents else None

    @property
    def firings(self) -> int | None:
        """Harvest tokens it fired on (density x tokens)."""
        return None if self.n_tokens is None else round(self.density * self.n_tokens)

    def as_json(self, urls: URLs) -> dict:
        def link(index):
            return None if index is None else urls.feature(self.sae_id, index, fmt="json")

        return {
            "sae_id": self.sae_id,
            "index": self.index,
            "density": self.density,
            "firings": self.firings,
            "n_tokens": self.n_tokens,
            "max_activation": self.max_activation,
            "mean_activation": self.mean_activation,
            "histogram": self.histogram.as_json(),
            "top_examples": [example.as_json() for example in self.top_examples],
            "quantiles": [quantile.as_json() for quantile in self.quantiles],
            "logits": {"top": [t.as_json() for t in self.logit_top], "bottom": [t.as_json() for t in self.logit_bottom],
                       "histogram": self.logit_histogram.as_json()},
            "neighbours": [{"index": n.index, "cosine": n.cosine, "explanation": n.explanation, "density": n.density,
                            "url": urls.feature(self.sae_id, n.index, fmt="json")} for n in self.neighbours],
            "explanation": self.explanation.as_json() if self.explanation else None,
            "excluded": {"positions": self.excluded_positions, "token_ids": [i for i, _ in self.excluded_tokens],
                         "tokens": [t for _, t in self.excluded_tokens]},
            "prev": link(self.prev_index),
            "next": link(self.next_index),
            "random": urls.random_feature(self.sae_id, fmt="json"),
            "url": urls.feature(self.sae_id, self.index),
            "sae_url": urls.sae(self.sae_id, fmt="json"),
            "across_sizes": self.family.as_json(urls) if self.family else None,
        }


# ---------------------------------------------------------------- the query


def get_feature(session: Session, sae_id: str, index: int) -> Feature | None:
    # Whether the SAE is a rung of a ladder, in the same read: most are not, and they skip the
    # family query.
    rung = select(LadderRung.ladder_id).where(LadderRung.sae_id == Sae.id).scalar_subquery()
    row = session.execute(
        select(Latent, LatentDetail, Sae.n_latents, Sae.harvest, Sae.id, Sae.model, Sae.run_dir, Sae.content_hash,
               rung.label("ladder_id"))
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
    family = across_sizes(session, sae_id, index) if row.ladder_id else None
    neighbour_index = arrays["neighbour_index"].tolist()
    summaries = latent_summaries(session, {sae_id: neighbour_index} | (family.wanted() if family else {}))
    if family:
        family.describe(summaries)
    return Feature(
        sae_id=sae_id, index=index, n_latents=n_latents, n_tokens=harvest.get("n_tokens"),
        density=latent.density, max_activation=latent.max_activation, mean_activation=latent.mean_activation,
        histogram=Histogram(np.linspace(0, latent.max_activation, len(arrays["histogram"]) + 1).tolist(),
                            arrays["histogram"].tolist()),
        top_examples=top_examples,
        quantiles=quantile_bins(arrays["quantile_edges"], arrays["quantile_share"], by_bin),
        n_quantiles=len(arrays["quantile_share"]),
        logit_top=effects(arrays["logit_top_ids"], arrays["logit_top_values"], tokens),
        logit_bottom=effects(arrays["logit_bottom_ids"], arrays["logit_bottom_values"], tokens),
        logit_histogram=Histogram(np.linspace(getattr(detail, "logit_min", 0), getattr(detail, "logit_max", 0),
                                              len(arrays["logit_histogram"]) + 1).tolist(),
                                  arrays["logit_histogram"].tolist()),
        neighbours=[Neighbour(i, round(c, 6), *summaries[sae_id, i])
                    for i, c in zip(neighbour_index, arrays["neighbour_cosine"].tolist()) if (sae_id, i) in summaries],
        explanation=Explanation.of(latent, getattr(detail, "explanation_patterns", None)),
        excluded_positions=[int(p) for p in harvest.get("excluded_positions", [])],
        excluded_tokens=[(i, tokens.get(i, "")) for i in excluded_ids],
        explanation_method=explained.get("method"),
        heldout_contexts=explained.get("heldout_contexts"),
        source=SaeSource(*row[4:8]),
        family=family,
    )


def examples(session: Session, sae_id: str, index: int) -> tuple[list[Example], dict[int, list[Example]]]:
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
    by_bin: dict[int, list[Example]] = {}
    for bin_, rank, context_id, position, max_activation, activations, tokens, token_ids in rows:
        if context_id not in contexts:
            contexts[context_id] = json.loads(tokens), np.frombuffer(token_ids, dtype="<i4").tolist()
        values = np.frombuffer(activations, dtype="<f2").astype(np.float64).round(4).tolist()
        by_bin.setdefault(bin_, []).append(Example(bin_, rank, context_id, position, max_activation, *contexts[context_id], values))
    return by_bin.pop(0, []), by_bin


def quantile_bins(edges: np.ndarray, share: np.ndarray, by_bin: dict[int, list[Example]]) -> list[QuantileBin]:
    """Bins that hold a share of the firings or an example, highest first; within a bin, the
    sampled firings strongest first (the harvest samples them in no order)."""
    def strongest_first(examples: list[Example]) -> list[Example]:
        return sorted(examples, key=lambda example: (-example.activation, example.rank))

    bins = [QuantileBin(q + 1, float(edges[q]), float(edges[q + 1]), float(share[q]), strongest_first(by_bin.get(q + 1, [])))
            for q in range(len(share))]
    return [b for b in reversed(bins) if b.share > 0 or b.examples]


def token_strings(session: Session, sae_id: str, token_ids: list[int]) -> dict[int, str]:
    if not token_ids:
        return {}
    rows = session.execute(select(Vocab.token_id, Vocab.token)
                           .where(Vocab.sae_id == sae_id, Vocab.token_id.in_(sorted(set(token_ids)))))
    return dict(rows.all())


def effects(ids: np.ndarray, values: np.ndarray, tokens: dict[int, str]) -> list[TokenEffect]:
    return [TokenEffect(i, tokens.get(i, ""), round(v, 6)) for i, v in zip(ids.tolist(), values.tolist())]


def latent_summaries(session: Session, wanted: dict[str, list[int]]) -> dict[tuple[str, int], tuple[str | None, float, float | None]]:
    """(explanation, density, explanation F1) of latents of one or more SAEs, {(sae_id, index): ...}:
    the page's neighbours and family in one read, a primary-key range per SAE."""
    conditions = [and_(Latent.sae_id == sae_id, Latent.index.in_(sorted(set(indices))))
                  for sae_id, indices in wanted.items() if indices]
    if not conditions:
        return {}
    rows = session.execute(select(Latent.sae_id, Latent.index, Latent.explanation, Latent.density, Latent.explanation_f1)
                           .where(or_(*conditions)))
    return {(sae_id, index): (explanation, density, f1) for sae_id, index, explanation, density, f1 in rows}


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
