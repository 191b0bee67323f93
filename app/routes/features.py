"""A latent's page: statistics and its top activating contexts, token by token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request

from app import queries
from app.schemas import ErrorOut, FeatureOut
from app.deps import SessionDep, URLsDep
from app.render import json_response, render

router = APIRouter(prefix="/saes/{sae_id}/features", tags=["features"])

# The latents table stores the index as a 32-bit integer: anything outside is a 422, not a 500.
LatentIndex = Annotated[int, Path(ge=0, le=2**31 - 1, description="the latent's index in the SAE")]


def _feature(session, sae_id: str, index: int) -> queries.Feature:
    feature = queries.get_feature(session, sae_id, index)
    if feature is None:
        if queries.get_sae(session, sae_id) is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        raise HTTPException(404, f"SAE {sae_id!r} has no latent {index}")
    return feature


@router.get("/{index}.json", response_model=FeatureOut, responses={404: {"model": ErrorOut}},
            summary="One latent: statistics and top examples")
def read_feature_json(sae_id: str, index: LatentIndex, session: SessionDep, urls: URLsDep):
    return json_response(_feature(session, sae_id, index).as_json(urls))


@router.get("/{index}", include_in_schema=False)
def read_feature(request: Request, sae_id: str, index: LatentIndex, session: SessionDep):
    return render(request, "feature.html", feature=_feature(session, sae_id, index))
