"""A latent's page: statistics, histograms, examples, logit effects, neighbours, explanation, and
a box to try the latent on your own text; a random latent."""

from __future__ import annotations

import random
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from app import features, queries
from app.deps import ProbeDep, SessionDep, URLsDep
from app.probe_view import try_latent
from app.render import hx_target, json_response, render
from app.schemas import ErrorOut, FeatureOut

router = APIRouter(prefix="/saes/{sae_id}", tags=["features"])

# The latents table stores the index as a 32-bit integer: anything outside is a 422, not a 500.
LatentIndex = Annotated[int, Path(ge=0, le=2**31 - 1, description="the latent's index in the SAE")]
Window = Annotated[features.Window, Query(alias="context", description="snippet: tokens around each firing; full: whole contexts")]
TryText = Annotated[str, Query(max_length=100_000, description="text to run the latent over (the probe's limits apply)")]
# The parts of the page that htmx swaps alone (by the id of the element they replace).
PARTS = {"examples": "_feature_examples.html", "try-result": "_feature_try.html"}


def _feature(session, sae_id: str, index: int) -> features.Feature:
    feature = features.get_feature(session, sae_id, index)
    if feature is None:
        if (sae := queries.get_sae(session, sae_id)) is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        raise HTTPException(404, f"SAE {sae_id!r} has no latent {index} (its latents are 0 to {sae.n_latents - 1})")
    return feature


@router.get("/features/{index}.json", response_model=FeatureOut, responses={404: {"model": ErrorOut}},
            summary="One latent: statistics, histograms, examples, logit effects, neighbours, explanation")
def read_feature_json(sae_id: str, index: LatentIndex, session: SessionDep, urls: URLsDep):
    return json_response(_feature(session, sae_id, index).as_json(urls))


@router.get("/features/{index}", include_in_schema=False)
async def read_feature(request: Request, sae_id: str, index: LatentIndex, probe: ProbeDep,
                       context: Window = "snippet", text: TryText = ""):
    part = hx_target(request, PARTS)  # None: the whole page
    trial = await try_latent(probe, sae_id, index, text) if text.strip() and part != "examples" else None
    return await run_in_threadpool(_feature_response, request, probe, sae_id, index, part, context, text, trial)


def _feature_response(request: Request, probe, sae_id: str, index: int, part: str | None, window: str, text: str,
                      trial) -> HTMLResponse:
    """The page, or the part htmx asks for: read and rendered in one trip to the thread pool (a
    SessionDep would add two: its enter and exit run there too in an async route), so the event
    loop never waits for the template; the probe's check may import the model code."""
    feature, unavailable = None, None
    if part != "try-result":
        with request.app.state.sessions() as session:
            feature = _feature(session, sae_id, index)
        unavailable = probe.unavailable_for(feature.source) if part is None else None
    return render(request, PARTS.get(part, "feature.html"), feature=feature, trial=trial, text=text, window=window,
                  sae_id=sae_id, index=index, unavailable=unavailable, oob=part is not None)


@router.get("/random.json", status_code=303, response_class=RedirectResponse, responses={404: {"model": ErrorOut}},
            summary="A redirect to a random latent's JSON (one that fired in the harvest)")
def read_random_feature_json(sae_id: str, session: SessionDep, urls: URLsDep):
    return _random(session, sae_id, lambda index: urls.feature(sae_id, index, fmt="json"))


@router.get("/random", include_in_schema=False)
def read_random_feature(sae_id: str, session: SessionDep, urls: URLsDep):
    """A redirect to a random latent that fired in the harvest (a new one each time)."""
    return _random(session, sae_id, lambda index: urls.feature(sae_id, index))


def _random(session, sae_id: str, url_of) -> RedirectResponse:
    index = features.random_index(session, sae_id, random.Random())
    if index is None:
        raise HTTPException(404, f"no SAE {sae_id!r}")
    return RedirectResponse(url_of(index), status_code=303, headers={"Cache-Control": "no-store"})
