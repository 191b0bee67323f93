"""A latent's family across the sizes of its ladder, for the feature page: in each smaller SAE the
latent nearest to it by decoder cosine (what it was before it split), in each larger one its
nearest few (what it splits into). From families.safetensors (trainer/families.py) as loaded by
app.sweep_loader: one latent_families row per latent, read by primary key together with its
ladder's list of sizes in one query.

    family = across_sizes(session, sae_id, index, urls)   # None: the SAE is not in a ladder's n series
    family.describe(summaries)                            # explanations and densities, read by the caller
"""

from __future__ import annotations

import json
import numpy as np
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Ladder, LadderRung, LatentFamily
from app.queries import NeighbourOut, Record
from app.urls import URLs

SPLITS_SHOWN = 5  # nearest latents listed per larger SAE


class SizeOut(Record):
    """One other SAE of the ladder and the latents of it nearest to this one, most similar first."""

    sae_id: str
    n_latents: int
    sae_url: str
    latents: list[NeighbourOut] = Field(description="most similar first")


class AcrossSizesOut(Record):
    """A latent's nearest latents in the other sizes of its ladder."""

    ladder: str
    ladder_url: str
    smaller: list[SizeOut] = Field(
        description="each smaller SAE of the ladder with its one nearest latent (what this one was), smallest first")
    larger: list[SizeOut] = Field(
        description="each larger SAE with its nearest latents, up to 5 (what this one splits into), smallest first")

    def wanted(self) -> dict[str, list[int]]:
        """The latents whose explanation and density the page shows, by SAE."""
        return {size.sae_id: [r.index for r in size.latents] for size in self.smaller + self.larger}

    def describe(self, summaries: dict[tuple[str, int], dict]) -> None:
        """Fill in explanations and densities: summaries[(sae_id, index)] = {"explanation", "density",
        "explanation_f1"} (app.features.latent_summaries)."""
        for size in self.smaller + self.larger:
            for relative in size.latents:
                for key, value in summaries.get((size.sae_id, relative.index), {}).items():
                    setattr(relative, key, value)


def across_sizes(session: Session, sae_id: str, index: int, urls: URLs = URLs()) -> AcrossSizesOut | None:
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
    family = AcrossSizesOut(ladder=row.ladder_id, ladder_url=urls.ladder(row.ladder_id, fmt="json"), smaller=[],
                            larger=[])
    for rung, indices, values in zip(others, nearest.tolist(), cosines.tolist()):
        smaller = rung["n_latents"] < own_n
        found = [NeighbourOut(index=i, cosine=round(c, 6), url=urls.feature(rung["sae_id"], i, fmt="json"))
                 for i, c in zip(indices, values) if i >= 0]  # -1: padding
        size = SizeOut(sae_id=rung["sae_id"], n_latents=rung["n_latents"], sae_url=urls.sae(rung["sae_id"], fmt="json"),
                       latents=found[:1] if smaller else found[:SPLITS_SHOWN])
        (family.smaller if smaller else family.larger).append(size)
    return family
