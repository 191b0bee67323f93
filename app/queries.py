"""The query layer: plain dataclasses that both the HTML pages and their `.json` twins render.

Each `as_json(urls)` method gives the stable JSON shape (documented in the OpenAPI schema by the
routes); templates read the same objects' attributes. This module: the SAE index and each SAE's
page (its latents sorted and filtered); app/features.py the feature page, app/search.py search.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from sqlalchemy import asc, desc, func, select
from sqlalchemy.orm import Session

from app.models import LadderRung, Latent, Sae
from app.urls import URLs
from trainer.thresholds import DENSE_THRESHOLD

SortKey = Literal["density", "max_activation", "explanation_f1", "index"]
Order = Literal["desc", "asc"]


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
class DensityHistogram:
    """Latents per bin of log10(density), computed at load time (app.loader.density_histogram)."""

    log10_edges: list[float]
    counts: list[int]
    dead: int  # never fired in the harvest
    dense: int  # fired on more than dense_threshold of the tokens
    dense_threshold: float


@dataclass
class SaeDetail(SaeSummary):
    d_in: int
    context_length: int | None
    cfg: dict
    metrics: dict
    created_at: str
    harvest: dict  # harvest.json: tokens seen, bins, seed, excluded positions and tokens
    density_histogram: DensityHistogram | None  # None for SAEs loaded before migration 0004
    n_explained: int  # latents with a scored explanation
    ladder_id: str | None = None  # the scaling ladder it is a rung of (app.ladders)


@dataclass
class Explanation:
    """A latent's automatic explanation: a token pattern (`⟦ ⟧` marks the token it fires on,
    ` | ` joins alternatives), scored on held-out contexts the pattern was not found on."""

    text: str
    patterns: list[list[int]]  # token ids, the last one the firing token
    precision: float | None  # share of the pattern's matches where the latent fires
    recall: float | None  # share of the latent's firings that the pattern matches
    f1: float | None
    matches: int | None
    firings: int | None

    @classmethod
    def of(cls, latent: Latent, patterns: str | None) -> "Explanation | None":
        if not latent.explanation:
            return None
        return cls(latent.explanation, json.loads(patterns or "[]"), latent.explanation_precision,
                   latent.explanation_recall, latent.explanation_f1, latent.explanation_matches, latent.explanation_firings)

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class LatentRow:
    index: int
    density: float
    max_activation: float
    mean_activation: float
    explanation: str | None
    explanation_f1: float | None

    def as_json(self, urls: URLs, sae_id: str) -> dict:
        return asdict(self) | {"url": urls.feature(sae_id, self.index)}


@dataclass
class LatentFilter:
    """Which latents the list shows. Every filter is a range of density: sorted by density, a
    filtered page is one range of the index that sorts it; in another order the database reads
    the range (at most one SAE's latents) and sorts it, or walks the sort's index, as it judges."""

    min_density: float | None = None
    max_density: float | None = None
    hide_dead: bool = False  # density 0: never fired in the harvest
    hide_dense: bool = False  # density above DENSE_THRESHOLD

    @property
    def active(self) -> bool:
        return self != LatentFilter()

    def conditions(self) -> list:
        found = []
        if self.min_density is not None:
            found.append(Latent.density >= self.min_density)
        if self.max_density is not None:
            found.append(Latent.density <= self.max_density)
        if self.hide_dead:
            found.append(Latent.density > 0)
        if self.hide_dense:
            found.append(Latent.density <= DENSE_THRESHOLD)
        return found

    def as_query(self) -> dict:
        """The filter as URL parameters (absent when off)."""
        return {"min_density": self.min_density, "max_density": self.max_density,
                "hide_dead": 1 if self.hide_dead else None, "hide_dense": 1 if self.hide_dense else None}

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class LatentPage:
    """One page of an SAE's latents, in the order and with the filters the query string asks for.
    Sorted by explanation score, it lists the latents whose explanation was scored."""

    sae: SaeDetail
    latents: list[LatentRow]
    sort: SortKey
    order: Order
    page: int
    per_page: int
    total: int  # latents that pass the filters
    filters: LatentFilter

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    def query(self, **changes) -> dict:
        """The page's query string with `changes` (None drops a key), always in one order."""
        state = {"sort": self.sort, "order": self.order, "page": self.page, "per_page": self.per_page,
                 **self.filters.as_query()}
        return state | changes

    def as_json(self, urls: URLs) -> dict:
        return {
            "sae": asdict(self.sae),
            "latents": [latent.as_json(urls, self.sae.id) for latent in self.latents],
            "sort": self.sort,
            "order": self.order,
            "filters": self.filters.as_json(),
            "page": self.page,
            "per_page": self.per_page,
            "total": self.total,
            "pages": self.pages,
            "prev": urls.sae(self.sae.id, fmt="json", **self.query(page=self.page - 1)) if self.page > 1 else None,
            "next": urls.sae(self.sae.id, fmt="json", **self.query(page=self.page + 1)) if self.page < self.pages else None,
        }


# ---------------------------------------------------------------- queries


def list_saes(session: Session) -> list[SaeSummary]:
    rows = session.execute(select(Sae).order_by(Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.id)).scalars()
    return [_summary(row) for row in rows]


SUMMARY_COLUMNS = (Sae.id, Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.fvu, Sae.l0, Sae.dead_fraction)


def get_sae_summary(session: Session, sae_id: str | None = None) -> SaeSummary | None:
    """An SAE's summary, or the first SAE's (by id) without `sae_id`: the columns alone, for pages
    that need no more (search). get_sae's full row parses cfg, metrics and harvest JSON."""
    query = select(*SUMMARY_COLUMNS)
    query = query.where(Sae.id == sae_id) if sae_id is not None else query.order_by(Sae.id).limit(1)
    row = session.execute(query).one_or_none()
    return None if row is None else SaeSummary(*row)


def get_sae(session: Session, sae_id: str) -> SaeDetail | None:
    row = session.get(Sae, sae_id)
    if row is None:
        return None
    histogram = json.loads(row.density_histogram) if row.density_histogram else None
    return SaeDetail(
        **asdict(_summary(row)),
        d_in=row.d_in,
        context_length=row.context_length,
        cfg=json.loads(row.cfg),
        metrics=json.loads(row.metrics),
        created_at=row.created_at.isoformat() if row.created_at else "",
        harvest=json.loads(row.harvest or "{}"),
        density_histogram=DensityHistogram(**histogram) if histogram else None,
        n_explained=row.n_explained,
        ladder_id=session.execute(select(LadderRung.ladder_id).where(LadderRung.sae_id == sae_id)).scalar_one_or_none(),
    )


def list_latents(
    session: Session, sae_id: str, sort: SortKey = "density", order: Order = "desc", page: int = 1, per_page: int = 50,
    filters: LatentFilter = LatentFilter(),
) -> LatentPage | None:
    sae = get_sae(session, sae_id)
    if sae is None:
        return None
    column = getattr(Latent, sort)
    direction = desc if order == "desc" else asc
    conditions = [Latent.sae_id == sae_id, *filters.conditions()]
    if sort == "explanation_f1":
        conditions.append(Latent.explanation_f1.is_not(None))  # NULLs sort differently per backend
    # Index breaks ties, in the same direction: a stable page order that the latents indexes
    # (sae_id, column, index) give without sorting, scanned forwards or backwards.
    order_by = [direction(column)] + ([direction(Latent.index)] if sort != "index" else [])
    query = (
        select(Latent.index, Latent.density, Latent.max_activation, Latent.mean_activation, Latent.explanation,
               Latent.explanation_f1)
        .where(*conditions)
        .order_by(*order_by)
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    latents = [LatentRow(*row) for row in session.execute(query)]
    return LatentPage(sae=sae, latents=latents, sort=sort, order=order, page=page, per_page=per_page,
                      total=_count(session, sae, sort, conditions, filters), filters=filters)


def _count(session: Session, sae: SaeDetail, sort: SortKey, conditions: list, filters: LatentFilter) -> int:
    """The loader counted what an unfiltered list holds; a filter's count is one index range."""
    if not filters.active:
        return sae.n_explained if sort == "explanation_f1" else sae.n_latents
    return session.execute(select(func.count()).select_from(Latent).where(*conditions)).scalar_one()  # one index range


def _summary(row: Sae) -> SaeSummary:
    return SaeSummary(
        id=row.id, model=row.model, layer=row.layer, n_latents=row.n_latents, k=row.k,
        fvu=row.fvu, l0=row.l0, dead_fraction=row.dead_fraction,
    )
