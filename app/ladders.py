"""The scaling pages' query objects: the ladders in the database, and one ladder's fits and rungs.

    ladders = list_ladders(session)
    page = get_ladder(session, ladder_id)   # None when there is no such ladder
    page.as_json(urls)                      # the .json twin

A ladder is a sweep loaded by app.sweep_loader: its scaling.json (trainer/scaling.py documents
every key) and its rungs, each a loaded SAE. Both pages read by primary key or by the rungs'
key prefix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Ladder, LadderRung, Sae
from app.urls import URLs

FIT_NAMES = {"fvu_n": "FVU vs n", "delta_ce_n": "ΔCE vs n", "fvu_joint": "FVU vs (n, k)",
             "delta_ce_joint": "ΔCE vs (n, k)"}


@dataclass
class LadderSummary:
    id: str
    model: str
    layer: int
    k: int  # of the n series
    n_rungs: int
    n_min: int  # the n series' smallest and largest SAE
    n_max: int
    fvu_alpha: float | None  # the fitted exponent of FVU vs n, when the fit ran

    def as_json(self, urls: URLs) -> dict:
        return asdict(self) | {"url": urls.ladder(self.id), "json_url": urls.ladder(self.id, fmt="json")}


@dataclass
class Rung:
    """One SAE of the sweep, as scaling.json describes it; sae_id None when it is not loaded."""

    run: str
    sae_id: str | None
    n_latents: int
    k: int
    fvu: float | None
    delta_ce: float | None
    dead_fraction: float | None
    l0: float | None

    def as_json(self, urls: URLs) -> dict:
        return asdict(self) | {"url": urls.sae(self.sae_id) if self.sae_id else None}


@dataclass
class LadderPage:
    summary: LadderSummary
    sweep: dict  # sweep.json: {"sweep": options, "train": the shared training options, "rungs"}
    scaling: dict  # scaling.json
    rungs: list[Rung]  # smallest n first, then k
    curves: dict[str, dict] = field(default_factory=dict)  # sae_id -> its metrics.json train_curve, if any

    @property
    def id(self) -> str:
        return self.summary.id

    @property
    def fits(self) -> dict[str, dict]:
        """scaling.json's fits in the order the page shows them (a fit or {"skipped": why})."""
        found = self.scaling.get("fits", {})
        return {name: found[name] for name in FIT_NAMES if name in found}

    @property
    def titled_fits(self) -> list[tuple[str, str, dict]]:
        """(name, title, fit) for the page."""
        return [(name, FIT_NAMES[name], fit) for name, fit in self.fits.items()]

    @property
    def n_series(self) -> list[Rung]:
        return [rung for rung in self.rungs if rung.k == self.summary.k]

    @property
    def k_series(self) -> dict[int, list[Rung]]:
        """The rungs at each n trained at two or more k, by n (the k series)."""
        by_n: dict[int, list[Rung]] = {}
        for rung in self.rungs:
            by_n.setdefault(rung.n_latents, []).append(rung)
        return {n: sorted(rungs, key=lambda r: r.k) for n, rungs in by_n.items() if len(rungs) > 1}

    def as_json(self, urls: URLs) -> dict:
        return {
            "ladder": self.summary.as_json(urls),
            "rungs": [rung.as_json(urls) for rung in self.rungs],
            "fits": self.fits,
            "interval": self.scaling.get("interval"),
            "paper": self.scaling.get("paper"),
            "sweep": self.sweep.get("sweep", {}),
            "train": self.sweep.get("train", {}),
            "url": urls.ladder(self.id),
        }


# ---------------------------------------------------------------- queries


def list_ladders(session: Session) -> list[LadderSummary]:
    rows = session.execute(select(Ladder.id, Ladder.model, Ladder.layer, Ladder.k, Ladder.scaling).order_by(Ladder.id))
    return [_summary(*row[:4], json.loads(row[4])) for row in rows]


def get_ladder(session: Session, ladder_id: str) -> LadderPage | None:
    ladder = session.get(Ladder, ladder_id)
    if ladder is None:
        return None
    scaling = json.loads(ladder.scaling)
    loaded = dict(session.execute(select(LadderRung.run, LadderRung.sae_id).where(LadderRung.ladder_id == ladder_id)).all())
    rungs = [Rung(row["run"], loaded.get(row["run"]), row["n_latents"], row["k"],
                  *(row.get(key) for key in ("fvu", "delta_ce", "dead_fraction", "l0")))
             for row in scaling.get("rungs", [])]
    return LadderPage(summary=_summary(ladder.id, ladder.model, ladder.layer, ladder.k, scaling),
                      sweep=json.loads(ladder.sweep), scaling=scaling, rungs=rungs,
                      curves=_training_curves(session, [rung.sae_id for rung in rungs if rung.sae_id]))


def _training_curves(session: Session, sae_ids: list[str]) -> dict[str, dict]:
    """Each loaded rung's training curve, from its metrics.json (one query by primary key)."""
    rows = session.execute(select(Sae.id, Sae.metrics).where(Sae.id.in_(sae_ids))) if sae_ids else []
    curves = {sae_id: json.loads(metrics).get("train_curve") for sae_id, metrics in rows}
    return {sae_id: curve for sae_id, curve in curves.items() if curve and curve.get("tokens")}


def _summary(ladder_id: str, model: str, layer: int, k: int, scaling: dict) -> LadderSummary:
    rungs = scaling.get("rungs", [])
    sizes = [rung["n_latents"] for rung in rungs if rung["k"] == k] or [0]
    fit = scaling.get("fits", {}).get("fvu_n", {})
    alpha = fit["params"]["alpha"]["value"] if "params" in fit else None
    return LadderSummary(ladder_id, model, layer, k, len(rungs), min(sizes), max(sizes), alpha)
