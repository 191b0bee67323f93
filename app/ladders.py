"""The scaling pages' query objects: the ladders in the database, and one ladder's fits and rungs.

    ladders = list_ladders(session, urls)   # a LadderIndexOut
    page = get_ladder(session, ladder_id, urls)   # a LadderPageOut, None when there is no such ladder

A ladder is a sweep loaded by app.sweep_loader: its scaling.json (trainer/scaling.py documents
every key) and its rungs, each a loaded SAE. Both pages read by primary key or by the rungs'
key prefix.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import ConfigDict, Field, with_config
from sqlalchemy import select
from sqlalchemy.orm import Session
from typing_extensions import TypedDict

from app.models import Ladder, LadderRung, Sae
from app.quality import ExplainabilityOut, kept_explainability
from app.queries import Record
from app.urls import URLs

FIT_NAMES = {"fvu_n": "FVU vs n", "delta_ce_n": "ΔCE vs n", "fvu_joint": "FVU vs (n, k)",
             "delta_ce_joint": "ΔCE vs (n, k)"}


class LadderOut(Record):
    """A ladder as the lists of ladders show it."""

    id: str
    model: str
    layer: int
    k: int = Field(description="k of the n series")
    n_rungs: int = Field(description="SAEs in scaling.json (the n series and the k series)")
    n_min: int = Field(description="the n series' smallest number of latents")
    n_max: int
    fvu_alpha: float | None = Field(description="the fitted exponent alpha of FVU(n) = c + a n^-alpha, or null")
    url: str
    json_url: str


class LadderIndexOut(Record):
    """The scaling ladders (sweeps) in the database."""

    ladders: list[LadderOut]


class RungOut(Record):
    """One SAE of the sweep, as scaling.json describes it."""

    run: str = Field(description="the rung's run folder, relative to the sweep folder")
    sae_id: str | None = Field(description="the loaded SAE, or null when this rung is not in the database")
    n_latents: int
    k: int
    fvu: float | None
    delta_ce: float | None
    dead_fraction: float | None
    l0: float | None
    ablation_sparsity: float | None = Field(None, description="sparsity of ablation effects (Gao et al. 2024, 4.5): "
                                                              "lower is sparser; null when not measured")
    ablation_sparsity_random: float | None = Field(None, description="the same for random directions of equal norm")
    probe_loss: float | None = Field(None, description="probe loss (Gao et al. 2024, 4.4): the best single latent's test "
                                                       "cross-entropy, averaged over the tasks; null when not measured")
    probe_residual_loss: float | None = Field(None, description="the same with the residual stream's best dimension")
    probe_dense_loss: float | None = Field(None, description="a dense logistic probe on the whole residual stream")
    probe_base_entropy: float | None = Field(None, description="the base rate's cross-entropy")
    explainability_precision: float | None = Field(None, description="mean held-out precision of the latents' explanations "
                                                                     "(app.quality); null when the rung is not loaded with a harvest")
    explainability_recall: float | None = None
    explainability_f1: float | None = Field(None, description="mean held-out F1 of the explanations")
    explainability_share: float | None = Field(None, description="share of latents with explanation F1 >= 0.5")
    url: str | None = Field(description="the SAE's page")


# A fit is scaling.json's own (trainer/scaling.py), read and shown as it is: typed dicts, so that
# the schema documents its keys and the page and charts read it like the file.
@with_config(ConfigDict(extra="allow"))
class FitParamOut(TypedDict):
    value: float | None
    low: Annotated[float | None, Field(description="the interval's ends (null: no interval, or open on that side)")]
    high: float | None
    low_open: bool
    high_open: bool
    fixed: Annotated[bool, Field(description="held at its value: the grid cannot identify it")]


@with_config(ConfigDict(extra="allow"))
class FitPointOut(TypedDict):
    n: int
    k: int
    observed: float
    fitted: float


@with_config(ConfigDict(extra="allow"))
class FitCurveOut(TypedDict):
    n: float
    k: int
    value: float


@with_config(ConfigDict(extra="allow"))
class FitOut(TypedDict, total=False):
    """A fit of scaling.json (trainer/scaling.py), or {"skipped": why}."""

    skipped: Annotated[str, Field(description="why the fit did not run (then no other key)")]
    metric: str
    form: str
    variables: list[str]
    k: Annotated[int, Field(description="n fits: the k of their rungs")]
    params: dict[str, FitParamOut]
    n_exponent: Annotated[dict[str, float | None], Field(description="joint fits: the exponent of n at each k")]
    r2: float | None
    r2_log: float | None
    rmse_log: float | None
    n_points: int
    dof: int
    points: list[FitPointOut]
    curve: Annotated[list[FitCurveOut], Field(description="the fitted law on 41 log-spaced n, for every k")]


class LadderPageOut(Record):
    """One ladder: its scaling fits, its rungs, and the sweep's options."""

    # a fit has the keys scaling.json gives it, not all of FitOut's: documented as optional
    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    ladder: LadderOut
    rungs: list[RungOut] = Field(description="every SAE of the sweep, smallest n first, then k")
    fits: dict[str, FitOut] = Field(description="fvu_n, delta_ce_n, fvu_joint, delta_ce_joint")
    interval: dict | None = Field(description='{"method": "profile", "level": 0.95}')
    paper: dict | None = Field(description="the paper's reference values, for comparison")
    sweep: dict = Field(description="the sweep's options (sweep.json)")
    train: dict = Field(description="the training options every rung shares")
    url: str
    # each loaded rung's metrics.json train_curve, by SAE id: the page's training chart
    curves: dict[str, dict] = Field(default_factory=dict, exclude=True)

    @property
    def titled_fits(self) -> list[tuple[str, str, FitOut]]:
        """(name, title, fit) for the page."""
        return [(name, FIT_NAMES[name], fit) for name, fit in self.fits.items()]

    @property
    def n_series(self) -> list[RungOut]:
        return [rung for rung in self.rungs if rung.k == self.ladder.k]

    @property
    def k_series(self) -> dict[int, list[RungOut]]:
        """The rungs at each n trained at two or more k, by n (the k series)."""
        by_n: dict[int, list[RungOut]] = {}
        for rung in self.rungs:
            by_n.setdefault(rung.n_latents, []).append(rung)
        return {n: sorted(rungs, key=lambda r: r.k) for n, rungs in by_n.items() if len(rungs) > 1}


# ---------------------------------------------------------------- queries


def list_ladders(session: Session, urls: URLs = URLs()) -> LadderIndexOut:
    rows = session.execute(select(Ladder.id, Ladder.model, Ladder.layer, Ladder.k, Ladder.scaling).order_by(Ladder.id))
    return LadderIndexOut(ladders=[_summary(*row[:4], json.loads(row[4]), urls) for row in rows])


def get_ladder(session: Session, ladder_id: str, urls: URLs = URLs()) -> LadderPageOut | None:
    ladder = session.get(Ladder, ladder_id)
    if ladder is None:
        return None
    scaling = json.loads(ladder.scaling)
    sweep = json.loads(ladder.sweep)  # {"sweep": options, "train": the shared training options, "rungs"}
    loaded = dict(session.execute(select(LadderRung.run, LadderRung.sae_id).where(LadderRung.ladder_id == ladder_id)).all())
    sae_ids = [sae_id for sae_id in loaded.values() if sae_id]
    metrics = _rung_metrics(session, sae_ids)
    explained = kept_explainability(session, sae_ids)
    rungs = [RungOut(run=row["run"], sae_id=loaded.get(row["run"]), n_latents=row["n_latents"], k=row["k"],
                  **{key: row.get(key) for key in ("fvu", "delta_ce", "dead_fraction", "l0", "ablation_sparsity",
                                                   "ablation_sparsity_random")},
                  **_quality(row, metrics.get(loaded.get(row["run"])), explained.get(loaded.get(row["run"]))),
                  url=urls.sae(loaded[row["run"]]) if loaded.get(row["run"]) else None)
             for row in scaling.get("rungs", [])]
    found = scaling.get("fits", {})
    return LadderPageOut(ladder=_summary(ladder.id, ladder.model, ladder.layer, ladder.k, scaling, urls), rungs=rungs,
                      fits={name: found[name] for name in FIT_NAMES if name in found},  # in the page's order
                      interval=scaling.get("interval"), paper=scaling.get("paper"), sweep=sweep.get("sweep", {}),
                      train=sweep.get("train", {}), url=urls.ladder(ladder.id),
                      curves=_training_curves(metrics))


PROBE_KEYS = ("probe_loss", "probe_residual_loss", "probe_dense_loss", "probe_base_entropy")


def _quality(row: dict, metrics: dict | None, explained: ExplainabilityOut | None) -> dict:
    """A rung's probe loss (scaling.json's, else the loaded SAE's metrics.json, for sweeps made
    before scaling.json had it) and its explainability (app.quality, from the database)."""
    found = {key: row.get(key) if row.get(key) is not None else (metrics or {}).get(key) for key in PROBE_KEYS}
    found = {key: value if isinstance(value, (int, float)) else None for key, value in found.items()}
    if explained is not None:
        found |= {"explainability_precision": explained.precision, "explainability_recall": explained.recall,
                  "explainability_f1": explained.f1, "explainability_share": explained.share_good}
    return found


def _rung_metrics(session: Session, sae_ids: list[str]) -> dict[str, dict]:
    """Each loaded rung's metrics.json (one query by primary key)."""
    rows = session.execute(select(Sae.id, Sae.metrics).where(Sae.id.in_(sae_ids))) if sae_ids else []
    return {sae_id: json.loads(metrics) for sae_id, metrics in rows}


def _training_curves(metrics: dict[str, dict]) -> dict[str, dict]:
    """Each loaded rung's training curve, from its metrics.json."""
    curves = {sae_id: found.get("train_curve") for sae_id, found in metrics.items()}
    return {sae_id: curve for sae_id, curve in curves.items() if curve and curve.get("tokens")}


def _summary(ladder_id: str, model: str, layer: int, k: int, scaling: dict, urls: URLs) -> LadderOut:
    rungs = scaling.get("rungs", [])
    sizes = [rung["n_latents"] for rung in rungs if rung["k"] == k] or [0]
    fit = scaling.get("fits", {}).get("fvu_n", {})
    alpha = fit["params"]["alpha"]["value"] if "params" in fit else None
    return LadderOut(id=ladder_id, model=model, layer=layer, k=k, n_rungs=len(rungs), n_min=min(sizes),
                         n_max=max(sizes), fvu_alpha=alpha, url=urls.ladder(ladder_id),
                         json_url=urls.ladder(ladder_id, fmt="json"))
