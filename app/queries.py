"""The query layer: plain dataclasses that both the HTML pages and their `.json` twins render.

Each `*_json(urls)` method gives the stable JSON shape (documented in the OpenAPI schema by the
routes); templates read the same objects' attributes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from sqlalchemy import asc, desc, select
from sqlalchemy.orm import Session

from app.models import Context, Example, Latent, Sae
from app.urls import URLs

SortKey = Literal["density", "max_activation", "index"]
Order = Literal["desc", "asc"]
MAX_EXAMPLES = 20


@dataclass
class SaeSummary:
    id: str
    model: str
    layer: int
    n_latents: int
    k: int
    fvu: float | None
    l0: float | None
    dead_fraction: float | None

    def as_json(self, urls: URLs) -> dict:
        return asdict(self) | {"url": urls.sae(self.id), "json_url": urls.sae(self.id, fmt="json")}


@dataclass
class SaeDetail(SaeSummary):
    d_in: int
    context_length: int | None
    cfg: dict
    metrics: dict
    created_at: str


@dataclass
class LatentRow:
    index: int
    density: float
    max_activation: float
    mean_activation: float

    def as_json(self, urls: URLs, sae_id: str) -> dict:
        return asdict(self) | {"url": urls.feature(sae_id, self.index)}


@dataclass
class LatentPage:
    """One page of an SAE's latents, in the order the query string asks for."""

    sae: SaeDetail
    latents: list[LatentRow]
    sort: SortKey
    order: Order
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    def as_json(self, urls: URLs) -> dict:
        state = {"sort": self.sort, "order": self.order, "per_page": self.per_page}
        return {
            "sae": asdict(self.sae),
            "latents": [latent.as_json(urls, self.sae.id) for latent in self.latents],
            "sort": self.sort,
            "order": self.order,
            "page": self.page,
            "per_page": self.per_page,
            "total": self.total,
            "pages": self.pages,
            "prev": urls.sae(self.sae.id, fmt="json", page=self.page - 1, **state) if self.page > 1 else None,
            "next": urls.sae(self.sae.id, fmt="json", page=self.page + 1, **state) if self.page < self.pages else None,
        }


@dataclass
class TopExample:
    rank: int
    context_id: int
    max_activation: float
    tokens: list[str]
    token_ids: list[int]
    activations: list[float]


@dataclass
class Feature:
    """One latent: its statistics, top examples, and neighbours by index."""

    sae_id: str
    index: int
    n_latents: int
    density: float
    max_activation: float
    mean_activation: float
    top_examples: list[TopExample] = field(default_factory=list)

    @property
    def prev_index(self) -> int | None:
        return self.index - 1 if self.index > 0 else None

    @property
    def next_index(self) -> int | None:
        return self.index + 1 if self.index + 1 < self.n_latents else None

    def as_json(self, urls: URLs) -> dict:
        def link(index):
            return None if index is None else urls.feature(self.sae_id, index, fmt="json")

        return {
            "sae_id": self.sae_id,
            "index": self.index,
            "density": self.density,
            "max_activation": self.max_activation,
            "mean_activation": self.mean_activation,
            "top_examples": [dict(vars(example)) for example in self.top_examples],  # shallow: asdict deep-copies every list
            "prev": link(self.prev_index),
            "next": link(self.next_index),
            "url": urls.feature(self.sae_id, self.index),
            "sae_url": urls.sae(self.sae_id, fmt="json"),
        }


# ---------------------------------------------------------------- queries


def list_saes(session: Session) -> list[SaeSummary]:
    rows = session.execute(select(Sae).order_by(Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.id)).scalars()
    return [_summary(row) for row in rows]


def get_sae(session: Session, sae_id: str) -> SaeDetail | None:
    row = session.get(Sae, sae_id)
    if row is None:
        return None
    return SaeDetail(
        **asdict(_summary(row)),
        d_in=row.d_in,
        context_length=row.context_length,
        cfg=json.loads(row.cfg),
        metrics=json.loads(row.metrics),
        created_at=row.created_at.isoformat() if row.created_at else "",
    )


def sae_run_dir(session: Session, sae_id: str) -> str | None:
    return session.execute(select(Sae.run_dir).where(Sae.id == sae_id)).scalar_one_or_none()


def list_latents(
    session: Session, sae_id: str, sort: SortKey = "density", order: Order = "desc", page: int = 1, per_page: int = 50
) -> LatentPage | None:
    sae = get_sae(session, sae_id)
    if sae is None:
        return None
    column = {"density": Latent.density, "max_activation": Latent.max_activation, "index": Latent.index}[sort]
    direction = desc if order == "desc" else asc
    # Index breaks ties, in the same direction: a stable page order that the latents indexes
    # (sae_id, column, index) give without sorting, scanned forwards or backwards.
    order_by = [direction(column)] + ([direction(Latent.index)] if sort != "index" else [])
    query = (
        select(Latent.index, Latent.density, Latent.max_activation, Latent.mean_activation)
        .where(Latent.sae_id == sae_id)
        .order_by(*order_by)
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    latents = [LatentRow(*row) for row in session.execute(query)]
    # The loader writes one row per latent: no need to count them on every page view.
    return LatentPage(sae=sae, latents=latents, sort=sort, order=order, page=page, per_page=per_page,
                      total=sae.n_latents)


def get_feature(session: Session, sae_id: str, index: int, n_examples: int = MAX_EXAMPLES) -> Feature | None:
    row = session.execute(
        select(Latent, Sae.n_latents).join(Sae, Sae.id == Latent.sae_id).where(Latent.sae_id == sae_id, Latent.index == index)
    ).first()
    if row is None:
        return None
    latent, n_latents = row
    examples = session.execute(
        select(Example.rank, Example.context_id, Example.max_activation, Example.activations, Context.tokens, Context.token_ids)
        .join(Context, (Context.sae_id == Example.sae_id) & (Context.context_id == Example.context_id))
        .where(Example.sae_id == sae_id, Example.latent_index == index)
        .order_by(Example.rank)
        .limit(n_examples)
    )
    return Feature(
        sae_id=sae_id,
        index=index,
        n_latents=n_latents,
        density=latent.density,
        max_activation=latent.max_activation,
        mean_activation=latent.mean_activation,
        top_examples=[
            TopExample(
                rank=rank,
                context_id=context_id,
                max_activation=max_activation,
                tokens=json.loads(tokens),
                token_ids=np.frombuffer(token_ids, dtype="<i4").tolist(),
                activations=[round(a, 4) for a in np.frombuffer(activations, dtype="<f2").astype(float).tolist()],
            )
            for rank, context_id, max_activation, activations, tokens, token_ids in examples
        ],
    )


def latent_max_activations(session: Session, sae_id: str, indices: list[int]) -> dict[int, float]:
    """Each latent's harvest max, for shading probe results on the same scale as feature pages."""
    if not indices:
        return {}
    rows = session.execute(
        select(Latent.index, Latent.max_activation).where(Latent.sae_id == sae_id, Latent.index.in_(sorted(set(indices))))
    )
    return {index: max_activation for index, max_activation in rows}


def _summary(row: Sae) -> SaeSummary:
    return SaeSummary(
        id=row.id, model=row.model, layer=row.layer, n_latents=row.n_latents, k=row.k,
        fvu=row.fvu, l0=row.l0, dead_fraction=row.dead_fraction,
    )
