"""A latent's family across the sizes of its ladder, for the feature page: in each smaller SAE the
latent nearest to it by decoder cosine (what it was before it split), in each larger one its
nearest few (what it splits into). From families.safetensors (trainer/families.py) as loaded by
app.sweep_loader: one latent_families row per latent, read by primary key together with its
ladder's list of sizes in one query.

    family = across_sizes(session, sae_id, index)   # None: the SAE is not in a ladder's n series
    family.describe(summaries)                      # explanations and densities, read by the caller
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Ladder, LadderRung, LatentFamily
from app.urls import URLs

SPLITS_SHOWN = 5  # nearest latents listed per larger SAE


@dataclass
class Relative:
    """A latent of another size of the ladder."""

    index: int
    cosine: float  # between its decoder direction and this latent's
    explanation: str | None = None
    density: float | None = None
    explanation_f1: float | None = None


@dataclass
class Size:
    """One other SAE of the ladder and the latents of it nearest to this one, most similar first."""

    sae_id: str
    n_latents: int
    latents: list[Relative]

    def as_json(self, urls: URLs) -> dict:
        return {"sae_id": self.sae_id, "n_latents": self.n_latents, "sae_url": urls.sae(self.sae_id, fmt="json"),
                "latents": [{"index": r.index, "cosine": r.cosine, "explanation": r.explanation, "density": r.density,
                             "url": urls.feature(self.sae_id, r.index, fmt="json")} for r in self.latents]}


@dataclass
class AcrossSizes:
    ladder_id: str
    smaller: list[Size]  # smallest first; each with its one nearest latent
    larger: list[Size]  # smallest first; each with up to SPLITS_SHOWN nearest latents

    def wanted(self) -> dict[str, list[int]]:
        """The latents whose explanation and density the page shows, by SAE."""
        return {size.sae_id: [r.index for r in size.latents] for size in self.smaller + self.larger}

    def describe(self, summaries: dict[tuple[str, int], tuple[str | None, float, float | None]]) -> None:
        """Fill in explanations and densities: summaries[(sae_id, index)] = (explanation, density, F1)."""
        for size in self.smaller + self.larger:
            for relative in size.latents:
                relative.explanation, relative.density, relative.explanation_f1 = summaries.get(
                    (size.sae_id, relative.index), (None, None, None))

    def as_json(self, urls: URLs) -> dict:
        return {"ladder": self.ladder_id, "ladder_url": urls.ladder(self.ladder_id, fmt="json"),
                "smaller": [size.as_json(urls) for size in self.smaller],
                "larger": [size.as_json(urls) for size in self.larger]}


def across_sizes(session: Session, sae_id: str, index: int) -> AcrossSizes | None:
    # The ladder's sizes by primary key through a subquery: a join let PostgreSQL walk the whole
    # (small) ladders table instead (tests/app/test_web_explain.py).
    sizes = select(Ladder.families).where(Ladder.id == LadderRung.ladder_id).scalar_subquery()
    row = session.execute(
        select(LatentFamily.nearest_index, LatentFamily.nearest_cosine, LadderRung.ladder_id, sizes.label("families"))
        .join(LadderRung, LadderRung.sae_id == LatentFamily.sae_id)
        .where(LatentFamily.sae_id == sae_id, LatentFamily.latent == index)
    ).first()
    if row is None or not row.families:
        return None
    record = json.loads(row.families)
    own_n = next(rung["n_latents"] for rung in record["rungs"] if rung["sae_id"] == sae_id)
    others = [rung for rung in record["rungs"] if rung["sae_id"] != sae_id]  # the rows' order
    nearest = np.frombuffer(row.nearest_index, dtype="<i4").reshape(len(others), -1)
    cosines = np.frombuffer(row.nearest_cosine, dtype="<f4").reshape(len(others), -1)
    family = AcrossSizes(row.ladder_id, [], [])
    for rung, indices, values in zip(others, nearest.tolist(), cosines.tolist()):
        smaller = rung["n_latents"] < own_n
        found = [Relative(i, round(c, 6)) for i, c in zip(indices, values) if i >= 0]  # -1: padding
        size = Size(rung["sae_id"], rung["n_latents"], found[:1] if smaller else found[:SPLITS_SHOWN])
        (family.smaller if smaller else family.larger).append(size)
    return family
