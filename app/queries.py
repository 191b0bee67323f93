"""The query layer's records and the SAE pages' queries.

Each record is a pydantic model declared once: the query functions build it, the templates read
its attributes, and its JSON (`model_dump`) is the `.json` twin's body, documented in
/openapi.json by the same class (app.pages). A field only a page shows is `exclude=True`; links
are fields, built by the query with the request's `URLs`. A record the JSON API gives out is named
`...Out`, the name /openapi.json has always given it (what generated clients bind to).

This module: the records several pages share (an SAE, a latent), the SAE index and each SAE's
page (its latents sorted and filtered); app/features.py the feature page, app/ladders.py the
ladders, app/search.py search, app/probe_view.py the probe.
"""

from __future__ import annotations

import json
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field
from sqlalchemy import Select, asc, desc, func, select
from sqlalchemy.orm import Session

from app.explanations import ExplanationSourceOut, attach_explanations
from app.models import LadderRung, Latent, Sae
from app.quality import QualityOut, detection, sae_quality, stored_explainability
from app.urls import URLs
from trainer.errors import RunFolderError
from trainer.runconfig import RunConfig
from trainer.thresholds import DENSE_THRESHOLD

SortKey = Literal["density", "max_activation", "explanation_f1", "index"]
Order = Literal["desc", "asc"]


class Record(BaseModel):
    """A record of the query layer (see the module's docstring)."""

    # Its JSON has every field, those with a default too: the schema says so to clients.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


# ---------------------------------------------------------------- an SAE


class SaeSummary(Record):
    """An SAE as every list of SAEs shows it (the index, the probe's selector)."""

    id: str
    model: str
    layer: int
    n_latents: int
    k: int
    fvu: float | None
    l0: float | None
    dead_fraction: float | None


class SaeOut(SaeSummary):
    """An SAE in the index, with its links."""

    url: str
    json_url: str


class SaeSource(BaseModel):
    """Where an SAE's weights and model come from: what the probe reads to tell whether it can
    run the SAE here (app.probe_availability)."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    run_dir: str
    content_hash: str

    columns: ClassVar[tuple] = (Sae.id, Sae.model, Sae.run_dir, Sae.content_hash)

    @classmethod
    def of(cls, row) -> SaeSource:
        """The record of a row that holds its `columns` (among others)."""
        return cls(**{column.key: getattr(row, column.key) for column in cls.columns})


class DensityHistogramOut(Record):
    """The SAE's latents per bin of log10(density)."""

    # computed at load time (app.loader.density_histogram)

    log10_edges: list[float] = Field(description="bin edges in log10(density), increasing")
    counts: list[int] = Field(description="latents per bin (dead latents are not in any bin)")
    dead: int = Field(description="latents that never fired in the harvest")
    dense: int = Field(description="latents firing on more than dense_threshold of the tokens")
    dense_threshold: float


class SaeDetailOut(SaeSummary):
    """An SAE as its own page shows it."""

    d_in: int
    context_length: int | None
    cfg: dict
    metrics: dict
    created_at: str
    harvest: dict = Field(description="harvest.json: tokens seen, bins, seed, excluded_positions, excluded_token_ids, ...")
    density_histogram: DensityHistogramOut | None = Field(description="null for SAEs loaded before migration 0004")
    n_explained: int = Field(description="latents with a scored explanation")
    ladder_id: str | None = Field(None, description="the scaling ladder it is a rung of (/ladders/{ladder_id}), or null")
    trained_positions: str | None = Field(None, description="the positions its training counted, e.g. 'all but the first "
                                          "position and special tokens' ('every position' for runs trained before the "
                                          "attention sink was left out); null for an SAE imported from another tool")
    quality: QualityOut | None = Field(None, description="probe loss, explainability and progressive-code FVU (app.quality)")


def trained_positions(cfg: dict) -> str | None:
    """What RunConfig says of the positions a run was trained on (None: imported, or unreadable)."""
    try:
        run = RunConfig.from_json(cfg)
    except RunFolderError:
        return None
    return run.positions.describe() if run.train else None


class IndexOut(Record):
    """The SAEs in the database (the index page lists the ladders too)."""

    saes: list[SaeOut]


# ---------------------------------------------------------------- a latent


class ExplanationOut(Record):
    """A latent's automatic explanation: a token pattern (`⟦ ⟧` marks the token it fires on,
    ` | ` joins alternatives), scored on held-out contexts the pattern was not found on."""

    text: str = Field(description="a token pattern: ⟦ ⟧ marks the token it fires on, ' | ' joins alternatives")
    patterns: list[list[int]] = Field(description="the same as token ids, the last one the firing token")
    precision: float | None = Field(description="on held-out contexts: share of the pattern's matches where it fires")
    recall: float | None = Field(description="on held-out contexts: share of its firings the pattern matches")
    f1: float | None
    matches: int | None
    firings: int | None

    @classmethod
    def of(cls, latent: Latent, patterns: str | None) -> "ExplanationOut | None":
        if not latent.explanation:
            return None
        return cls(text=latent.explanation, patterns=json.loads(patterns or "[]"), precision=latent.explanation_precision,
                   recall=latent.explanation_recall, f1=latent.explanation_f1, matches=latent.explanation_matches,
                   firings=latent.explanation_firings)


class LatentHitOut(Record):
    """A latent as lists show it (search results, the probe's latents), linking to its page."""

    index: int
    density: float = Field(description="share of harvested tokens it fires on")
    max_activation: float = Field(description="its largest activation in the harvest")
    explanation: str | None = Field(None, description="its automatic explanation (a token pattern, ⟦ ⟧ marking "
                                                      "the token it fires on), or null when the harvest found none")
    explanation_f1: float | None = Field(None, description="that explanation's F1 on held-out contexts (null: not scored)")
    url: str
    explanations: list[ExplanationSourceOut] = Field(
        default_factory=list, description="every explanation, the token pattern's and language models', best first "
                                          "(on the SAE page and in search results; empty in other lists)")

    # the columns it is read from (the url comes from the index)
    columns: ClassVar[tuple] = (Latent.index, Latent.density, Latent.max_activation, Latent.explanation,
                                Latent.explanation_f1)

    @classmethod
    def of(cls, row, sae_id: str, urls: URLs):
        """The record of a row of its `columns`."""
        return cls(**row._mapping, url=urls.feature(sae_id, row.index))


class LatentOut(LatentHitOut):
    """A latent in its SAE's list."""

    mean_activation: float = Field(description="over the tokens it fires on")

    columns: ClassVar[tuple] = (*LatentHitOut.columns, Latent.mean_activation)


class NeighbourOut(Record):
    """A latent near another by the cosine of their decoder directions: in the same SAE, or in
    another size of its ladder."""

    index: int
    cosine: float = Field(description="cosine similarity of the two decoder directions")
    explanation: str | None = None
    density: float | None = None  # None: not read (yet)
    url: str
    explanation_f1: float | None = Field(None, exclude=True)  # the page dims a weak explanation


# ---------------------------------------------------------------- an SAE's page


class LatentFilterOut(Record):
    """Which latents the list shows (null or false: no bound)."""

    # Every filter is a range of density: sorted by density, a filtered page is one range of the
    # index that sorts it; in another order the database reads the range (at most one SAE's
    # latents) and sorts it, or walks the sort's index, as it judges.

    min_density: float | None = None
    max_density: float | None = None
    hide_dead: bool = False  # density 0: never fired in the harvest
    hide_dense: bool = False  # density above DENSE_THRESHOLD

    @property
    def active(self) -> bool:
        return self != LatentFilterOut()

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


class SaePageOut(Record):
    """One page of an SAE's latents, in the order and with the filters the query string asks for.
    Sorted by explanation score, it lists the latents whose explanation was scored."""

    sae: SaeDetailOut
    latents: list[LatentOut]
    sort: SortKey
    order: Order
    filters: LatentFilterOut
    page: int
    per_page: int
    total: int = Field(description="latents that pass the filters (sorted by explanation_f1: those with a score)")
    prev: str | None = None  # the twins of the pages before and after
    next: str | None = None

    @computed_field
    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    def query(self, **changes) -> dict:
        """The page's query string with `changes` (None drops a key), always in one order."""
        state = {"sort": self.sort, "order": self.order, "page": self.page, "per_page": self.per_page,
                 **self.filters.as_query()}
        return state | changes


# ---------------------------------------------------------------- queries


SUMMARY_COLUMNS = (Sae.id, Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.fvu, Sae.l0, Sae.dead_fraction)


def list_saes(session: Session, urls: URLs = URLs()) -> IndexOut:
    rows = session.execute(select(*SUMMARY_COLUMNS).order_by(Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.id))
    return IndexOut(saes=[SaeOut(**row._mapping, url=urls.sae(row.id), json_url=urls.sae(row.id, fmt="json"))
                          for row in rows])


def get_sae_summary(session: Session, sae_id: str | None = None) -> SaeSummary | None:
    """An SAE's summary, or the first SAE's (by id) without `sae_id`: the columns alone, for pages
    that need no more (search). get_sae's full row parses cfg, metrics and harvest JSON."""
    query = select(*SUMMARY_COLUMNS)
    query = query.where(Sae.id == sae_id) if sae_id is not None else query.order_by(Sae.id).limit(1)
    row = session.execute(query).one_or_none()
    return None if row is None else SaeSummary(**row._mapping)


def get_sae(session: Session, sae_id: str, urls: URLs = URLs()) -> SaeDetailOut | None:
    row = session.get(Sae, sae_id)
    if row is None:
        return None
    histogram = json.loads(row.density_histogram) if row.density_histogram else None
    cfg, metrics = json.loads(row.cfg), json.loads(row.metrics)
    return SaeDetailOut(
        id=row.id, model=row.model, layer=row.layer, n_latents=row.n_latents, k=row.k,
        fvu=row.fvu, l0=row.l0, dead_fraction=row.dead_fraction,
        d_in=row.d_in,
        context_length=row.context_length,
        cfg=cfg,
        metrics=metrics,
        created_at=row.created_at.isoformat() if row.created_at else "",
        harvest=json.loads(row.harvest or "{}"),
        density_histogram=DensityHistogramOut(**histogram) if histogram else None,
        n_explained=row.n_explained,
        ladder_id=session.execute(select(LadderRung.ladder_id).where(LadderRung.sae_id == sae_id)).scalar_one_or_none(),
        trained_positions=trained_positions(cfg),
        quality=sae_quality(metrics, stored_explainability(row.explainability), sae_id, urls, detection(row.detection)),
    )


def list_latents(
    session: Session, sae_id: str, sort: SortKey = "density", order: Order = "desc", page: int = 1, per_page: int = 50,
    filters: LatentFilterOut = LatentFilterOut(), urls: URLs = URLs(),
) -> SaePageOut | None:
    sae = get_sae(session, sae_id, urls)
    if sae is None:
        return None
    query = latents_query(sae_id, sort, order, filters).limit(per_page).offset((page - 1) * per_page)
    latents = [LatentOut.of(row, sae_id, urls) for row in session.execute(query)]
    attach_explanations(session, sae_id, latents)
    listed = SaePageOut(sae=sae, latents=latents, sort=sort, order=order, page=page, per_page=per_page,
                        total=_count(session, sae, sort, _conditions(sae_id, sort, filters), filters), filters=filters)
    if listed.page > 1:
        listed.prev = urls.sae(sae_id, fmt="json", **listed.query(page=listed.page - 1))
    if listed.page < listed.pages:
        listed.next = urls.sae(sae_id, fmt="json", **listed.query(page=listed.page + 1))
    return listed


def latents_query(sae_id: str, sort: SortKey = "density", order: Order = "desc",
                  filters: LatentFilterOut = LatentFilterOut()) -> Select:
    """The SAE page's list as one statement: LatentOut's columns of the latents that pass
    `filters`, in its order, every page of it. The page reads one page (limit, offset); the CSV
    download and the notebook API (saescope.Database.latents, app.frames) read it whole."""
    column = getattr(Latent, sort)
    direction = desc if order == "desc" else asc
    # Index breaks ties, in the same direction: a stable page order that the latents indexes
    # (sae_id, column, index) give without sorting, scanned forwards or backwards.
    order_by = [direction(column)] + ([direction(Latent.index)] if sort != "index" else [])
    return select(*LatentOut.columns).where(*_conditions(sae_id, sort, filters)).order_by(*order_by)


def _conditions(sae_id: str, sort: SortKey, filters: LatentFilterOut) -> list:
    conditions = [Latent.sae_id == sae_id, *filters.conditions()]
    if sort == "explanation_f1":
        conditions.append(Latent.explanation_f1.is_not(None))  # NULLs sort differently per backend
    return conditions


def _count(session: Session, sae: SaeDetailOut, sort: SortKey, conditions: list, filters: LatentFilterOut) -> int:
    """The loader counted what an unfiltered list holds; a filter's count is one index range."""
    if not filters.active:
        return sae.n_explained if sort == "explanation_f1" else sae.n_latents
    return session.execute(select(func.count()).select_from(Latent).where(*conditions)).scalar_one()  # one index range
