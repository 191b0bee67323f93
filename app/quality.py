"""The paper's quality metrics of an SAE beyond reconstruction, as the SAE and ladder pages show them.

    quality = sae_quality(metrics, stored_explainability(sae.explainability), sae_id, urls, detection(sae.detection))

- **Probe loss** (Gao et al. 2024, 4.4) and the **progressive-code FVU** come from metrics.json
  (`saescope eval`, trainer/probing.py and trainer/evaluate.py); runs evaluated before them have
  neither, and the pages say "not measured".
- **Explainability** is computed here, in one place, from the explanations the database holds
  (the harvest scores each latent's n-gram explanation on held-out contexts): over the latents that
  fire on those contexts, the mean precision (of those whose explanation matches anything), the
  mean recall and F1 (0 for a latent without an explanation), and the share with F1 >= 0.5. One
  grouped query over the SAE's latents when it is loaded, kept in saes.explainability (the pages
  read that); an SAE loaded without a harvest has none (null).
- **Explanations from language models** (`saescope explain`) are scored otherwise, by detection
  (balanced accuracy on held-out contexts, 0.5 = chance): per model, the latents it explained,
  their mean score and the share scoring at least GOOD_DETECTION (detection_summary, summed once
  when they are loaded and kept in saes.detection).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, Float, case, cast, func, select
from sqlalchemy.orm import Session

from app.models import Latent, Sae
from app.urls import URLs

GOOD_F1 = 0.5  # an explanation this good or better counts in `share_good`
GOOD_DETECTION = 0.75  # a language model's explanation this good or better counts in `share_good`


class Record(BaseModel):
    """As app.queries.Record, which cannot be imported here: app.queries imports this module."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class ExplainabilityOut(Record):
    """The SAE-level explainability of its n-gram explanations, scored on held-out contexts."""

    latents: int = Field(description="latents that fire on the harvest's held-out contexts (the ones averaged over)")
    precision: float | None = Field(description="mean precision, over the latents whose explanation matches any held-out token")
    recall: float = Field(description="mean recall (0 for a latent without an explanation)")
    f1: float = Field(description="mean F1 (0 for a latent without an explanation)")
    share_good: float = Field(description=f"share of the latents with F1 >= {GOOD_F1}")


class DetectionOut(Record):
    """One language model's explanations of the SAE, scored by detection."""

    source: str = Field(description="the model that wrote them (--llm-model)")
    latents: int = Field(description="latents it explained and scored")
    score: float = Field(description="mean detection score (balanced accuracy on held-out contexts; 0.5 = chance)")
    share_good: float = Field(description=f"share of them scoring {GOOD_DETECTION} or more")


class ProbeTaskOut(Record):
    """One task of the probe loss, as metrics.json's probe_tasks holds it."""

    task: str
    description: str | None = None
    positives: float | None = Field(None, description="share of the task's positions that are positive")
    skipped: str | None = Field(None, description="why the task was not scored (then no losses)")
    best_latent: int | None = Field(None, description="the latent whose 1-D probe has the lowest train loss")
    latent_loss: float | None = Field(None, description="its test cross-entropy (nats)")
    best_dim: int | None = Field(None, description="the best residual-stream dimension, probed the same way")
    residual_loss: float | None = None
    dense_loss: float | None = Field(None, description="a logistic probe on the whole residual stream")
    base_entropy: float | None = Field(None, description="always predicting the train share of positives")
    latent_url: str | None = Field(None, description="the best latent's page")


class ProbeLossOut(Record):
    """Probe loss (Gao et al. 2024, 4.4): the mean over tasks of the best single latent's test
    cross-entropy, with the references on the same splits."""

    loss: float = Field(description="metrics.json probe_loss")
    residual_loss: float | None = Field(description="the same with the residual stream's best dimension")
    dense_loss: float | None = Field(description="a dense logistic probe on the whole residual stream")
    base_entropy: float | None = Field(description="the base rate's cross-entropy")
    source: str | None = Field(description="where the labels came from")
    tasks: list[ProbeTaskOut]


class ProgressivePointOut(Record):
    k: int
    fvu: float


class QualityOut(Record):
    """Probe loss, explainability and progressive codes; each null when not measured."""

    probe: ProbeLossOut | None = Field(description="null: not measured (eval before it, --no-probe-loss, or nothing to probe)")
    probe_note: str | None = Field(None, description="why the probe loss was not measured, when eval said")
    explainability: ExplainabilityOut | None = Field(description="null: no scored explanations in the database")
    detection: list[DetectionOut] = Field([], description="the language models' explanations, per model (empty: none)")
    progressive_fvu: list[ProgressivePointOut] = Field(description="FVU when encoding with k' latents instead of k, "
                                                                   "smallest k' first (empty: not measured)")


def explainability(session: Session | Connection, sae_ids: list[str]) -> dict[str, ExplainabilityOut]:
    """Each SAE's ExplainabilityOut (see the module docstring), by id, from its latents; absent
    where none of them fires on held-out contexts (or it has no harvest). The loader keeps it
    (saes.explainability): 77 ms at 65,536 latents on SQLite, too much for every page view."""
    if not sae_ids:
        return {}
    good = func.sum(case((Latent.explanation_f1 >= GOOD_F1, 1), else_=0))
    rows = session.execute(
        select(Latent.sae_id, func.count(), func.avg(Latent.explanation_precision),
               func.avg(func.coalesce(Latent.explanation_recall, 0.0)), func.avg(func.coalesce(Latent.explanation_f1, 0.0)),
               cast(good, Float))
        .where(Latent.sae_id.in_(sae_ids), Latent.explanation_firings > 0)
        .group_by(Latent.sae_id))
    return {sae_id: ExplainabilityOut(latents=n, precision=_float(precision), recall=float(recall), f1=float(f1),
                                      share_good=float(n_good) / n)
            for sae_id, n, precision, recall, f1, n_good in rows if n}


def kept_explainability(session: Session, sae_ids: list[str]) -> dict[str, ExplainabilityOut]:
    """Each SAE's explainability as the loader kept it (saes.explainability), by id."""
    rows = session.execute(select(Sae.id, Sae.explainability).where(Sae.id.in_(sae_ids), Sae.explainability.is_not(None)))
    return {sae_id: stored_explainability(kept) for sae_id, kept in rows}


def stored_explainability(kept: str | None) -> ExplainabilityOut | None:
    """One SAE's saes.explainability read back (None: none)."""
    return None if kept is None else ExplainabilityOut.model_validate_json(kept)


def detection_summary(scores: Iterable[tuple[str, float]]) -> list[dict]:
    """(source, detection score) of each explanation -> per language model, its latents, their
    mean score and the share scoring GOOD_DETECTION or more, the best-scoring model first (as
    DetectionOut's fields). The loader writes it with the explanations (saes.detection)."""
    by_source: dict[str, list[float]] = {}
    for source, score in scores:
        by_source.setdefault(source, []).append(float(score))
    found = [{"source": source, "latents": len(found), "score": sum(found) / len(found),
              "share_good": sum(s >= GOOD_DETECTION for s in found) / len(found)}
             for source, found in by_source.items()]
    return sorted(found, key=lambda d: (-d["score"], d["source"]))


def detection(summary: str | None) -> list[DetectionOut]:
    """The SAE's language-model explanations per model, from saes.detection (detection_summary)."""
    return [DetectionOut(**row) for row in json.loads(summary or "[]")]


def sae_quality(metrics: dict, found: ExplainabilityOut | None, sae_id: str, urls: URLs = URLs(),
                detected: list[DetectionOut] = ()) -> QualityOut:
    probe = None
    if isinstance(metrics.get("probe_loss"), (int, float)):
        tasks = [ProbeTaskOut(**{key: row.get(key) for key in ProbeTaskOut.model_fields if key in row},
                              latent_url=urls.feature(sae_id, row["best_latent"]) if row.get("best_latent") is not None else None)
                 for row in metrics.get("probe_tasks") or [] if isinstance(row, dict) and "task" in row]
        probe = ProbeLossOut(loss=metrics["probe_loss"], residual_loss=metrics.get("probe_residual_loss"),
                             dense_loss=metrics.get("probe_dense_loss"), base_entropy=metrics.get("probe_base_entropy"),
                             source=metrics.get("probe_source"), tasks=tasks)
    progressive = metrics.get("progressive_fvu") if isinstance(metrics.get("progressive_fvu"), dict) else {}
    points = sorted((int(k), fvu) for k, fvu in progressive.items() if str(k).isdigit() and isinstance(fvu, (int, float)))
    return QualityOut(probe=probe, probe_note=metrics.get("probe_note"), explainability=found, detection=list(detected),
                      progressive_fvu=[ProgressivePointOut(k=k, fvu=fvu) for k, fvu in points])


def _float(value) -> float | None:
    return None if value is None else float(value)
