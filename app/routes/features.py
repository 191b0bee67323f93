"""A latent's page: statistics, histograms, examples, logit effects, neighbours, explanation, and
a box to try the latent on your own text; a random latent."""

from __future__ import annotations

import random
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import ablation, features, frames, pages, queries
from app.ablation import AblationOut
from app.deps import ProbeDep, SessionDep, SteerDep, URLsDep
from app.render import render
from app.probe_view import LatentTrial, try_latent
from app.schemas import ErrorOut

router = APIRouter(prefix="/saes/{sae_id}", tags=["features"])

# The latents table stores the index as a 32-bit integer: anything outside is a 422, not a 500.
LatentIndex = Annotated[int, Path(ge=0, le=2**31 - 1, description="the latent's index in the SAE")]
Window = Annotated[features.Window, Query(alias="context", description="snippet: tokens around each firing; full: whole contexts")]
TryText = Annotated[str, Query(max_length=100_000, description="text to run the latent over (the probe's limits apply)")]
# The parts of the page that htmx swaps alone (by the id of the element they replace).
PARTS = {"examples": "_feature_examples.html", "try-result": "_feature_try.html"}


async def feature_page(page: pages.PageCall, probe: ProbeDep, context: Window = "snippet", text: TryText = ""):
    """The page, or the part htmx asks for; the page's own state: the examples' window and the
    text typed in the "try your own text" box."""
    sae_id, index = page.params["sae_id"], page.params["index"]
    trial = await try_latent(probe, sae_id, index, text) if text.strip() and page.part != "examples" else None
    return await run_in_threadpool(_feature_response, page, probe, context, text, trial)


def _feature_response(page: pages.PageCall, probe, window: str, text: str, trial: LatentTrial | None) -> HTMLResponse:
    """Read and rendered in one trip to the thread pool, so the event loop never waits for the
    template; the probe's check may import the model code. The typed text's part needs no read."""
    feature, unavailable = None, None
    if page.part != "try-result":
        feature = page.data()
        unavailable = probe.unavailable_for(feature.source) if page.part is None else None
    response = page.render(feature, trial=trial, text=text, window=window, sae_id=page.params["sae_id"],
                           index=page.params["index"], unavailable=unavailable, oob=page.part is not None)
    if trial is not None and trial.error:  # a busy or missing probe is a moment, not the load: not kept (app.caching)
        response.headers["Cache-Control"] = "no-store"
    return response


@pages.route(router, "/features/{index}", template="feature.html", name="feature", parts=PARTS, html=feature_page,
             responses={404: {"model": ErrorOut}},
             summary="One latent: statistics, histograms, examples, logit effects, neighbours, explanation")
def read_feature(sae_id: str, index: LatentIndex, session: SessionDep, urls: URLsDep) -> features.FeatureOut:
    feature = features.get_feature(session, sae_id, index, urls)
    if feature is None:
        if (sae := queries.get_sae_summary(session, sae_id)) is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        raise HTTPException(404, f"SAE {sae_id!r} has no latent {index} (its latents are 0 to {sae.n_latents - 1})")
    return feature


async def ablation_part(page: pages.PageCall):
    """The section as the feature page loads it (htmx): the effects, or why they cannot be computed here."""
    try:
        return page.render(await page.data())
    except HTTPException as e:
        response = render(page.request, "_feature_ablation.html", status_code=e.status_code, ablation=None, error=e.detail,
                          retry_after=(e.headers or {}).get("Retry-After"), url=page.request.url.path)
        response.headers.update({k: v for k, v in (e.headers or {}).items() if k == "Retry-After"})
        return response


@pages.route(router, "/features/{index}/ablation", template="_feature_ablation.html", name="ablation", html=ablation_part,
             responses={code: {"model": ErrorOut} for code in (404, 409, 503)},
             summary="What removing a latent changes over its first top examples (computed on first view, then kept)")
async def read_feature_ablation(sae_id: str, index: LatentIndex, session: SessionDep, steer: SteerDep) -> AblationOut:
    """For each of its first five top contexts, the change in the log-probability of every actual
    next token when the latent's activation is set to 0 where it fires (the SAE's error term kept),
    and the next tokens raised and lowered most. 404 unknown SAE or latent; 409 the SAE's weights or
    model not on this server (the kept section, if any, is still given); 503 busy (with Retry-After)."""
    if (kept := await run_in_threadpool(ablation.stored_ablation, session, sae_id, index)) is not None:
        return kept
    contexts = await run_in_threadpool(ablation.top_contexts, session, sae_id, index)
    if not contexts:
        if await run_in_threadpool(queries.get_sae_summary, session, sae_id) is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        raise HTTPException(404, f"latent {index} of SAE {sae_id!r} has no top examples to ablate over")
    try:
        sae = await run_in_threadpool(steer.probe.locate, sae_id)
        if reason := await run_in_threadpool(steer.probe.unavailable, sae_id):
            raise HTTPException(409, f"this SAE cannot run on this server: {reason}")
        loaded = await run_in_threadpool(steer.probe.load, sae)
        effects = await steer.submit(("ablation", sae.key, index), steer.ablate, sae, index,
                                     [ids for _, ids, _ in contexts], loaded.excluded_positions)
    except HTTPException as e:  # the model not here is the SAE's state, not the server failing: 409; busy stays 503
        if e.status_code == 503 and "Retry-After" not in (e.headers or {}):
            raise HTTPException(409, e.detail) from None
        raise
    strings = await run_in_threadpool(features.token_strings, session, sae_id, [i for i, _ in effects.raised + effects.lowered])
    record = ablation.ablation_record(sae_id, index, contexts, effects, strings)
    await run_in_threadpool(ablation.keep_ablation, session, record, sae.content_hash)
    return record


@router.get("/features/{index}/examples.csv", include_in_schema=False, name="read_feature_examples_csv")
def read_feature_examples_csv(sae_id: str, index: LatentIndex, session: SessionDep, urls: URLsDep,
                              context: Window = "snippet") -> Response:
    """The latent's examples as its page shows them, a row per token (the snippets, or with
    context=full whole contexts): the page's record (read_feature), written with pandas."""
    feature = read_feature(sae_id=sae_id, index=index, session=session, urls=urls)
    return frames.csv_response(frames.examples_frame(feature, context), f"{sae_id}-latent-{index}-examples.csv", index=False)


def _random_route(fmt: str | None):
    def read_random_feature(sae_id: str, session: SessionDep, urls: URLsDep) -> RedirectResponse:
        index = features.random_index(session, sae_id, random.Random())
        if index is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        return RedirectResponse(urls.feature(sae_id, index, fmt=fmt), status_code=303, headers={"Cache-Control": "no-store"})

    return read_random_feature


# A redirect to a random latent that fired in the harvest (a new one each time): its page, or its JSON.
router.add_api_route("/random", _random_route(None), methods=["GET"], name="read_random_feature", include_in_schema=False)
router.add_api_route("/random.json", _random_route("json"), methods=["GET"], name="read_random_feature_json",
                     status_code=303, response_class=RedirectResponse, responses={404: {"model": ErrorOut}},
                     summary="A redirect to a random latent's JSON (one that fired in the harvest)")
