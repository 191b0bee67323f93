"""Search an SAE's latents by meaning, by explanation text and by token (app/search.py says how),
and by example: the latents most specific to a pasted snippet (app/example_search.py), as a page,
its JSON twin and POST /api/search/example."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from app import frames, pages, queries, search
from app.deps import ProbeDep, SessionDep, URLsDep
from app.example_search import ExampleSearchOut, find_by_example
from app.explanations import attach_explanations
from app.probe_service import TooLong
from app.render import json_response
from app.routes.probe import ERRORS, UNAVAILABLE, SaeId, Utf8Route, first_sae, page_text
from app.schemas import ErrorOut

router = APIRouter(tags=["search"], route_class=Utf8Route)

Q = Annotated[str, Query(max_length=200, description="words of an explanation, a token (leading spaces count), or a latent number")]
Sae = Annotated[str | None, Query(description="SAE id (default: the first SAE)")]
Limit = Annotated[int, Query(ge=1, le=100, description="results per kind")]


def search_page(page: pages.PageCall, go: Annotated[bool, Query(include_in_schema=False)] = False):
    """The page, or its results alone as one types (htmx). "#123" typed in the header's box (go=1)
    opens the latent; the search page's own address (pushed as one types there) stays a list of
    results, also when reloaded."""
    result = page.data()
    q = page.params["q"]
    if go and not page.part and result.latent and q.strip().startswith("#"):
        return RedirectResponse(page.params["urls"].feature(result.sae, result.latent.index), status_code=303)
    return page.render(result, max_chars=page.request.app.state.settings.probe_max_chars)


@pages.route(router, "/search", template="search.html", name="result", parts={"search-results": "_search_results.html"},
             html=search_page, responses={404: {"model": ErrorOut}}, summary="Latents by explanation text and by token")
def read_search(session: SessionDep, urls: URLsDep, q: Q = "", sae: Sae = None, limit: Limit = 20) -> search.SearchOut:
    """`q` is looked up as a token (as typed, stripped, and with one leading space) and as the
    words of explanations; a number also names a latent."""
    summary = queries.get_sae_summary(session, sae)  # the first SAE without one
    if sae and summary is None:
        raise HTTPException(404, f"no SAE {sae!r}")
    result = search.search(session, summary, q, limit, urls)
    hits = [result.latent, *result.ranked, *result.explanations, *(hit for token in result.tokens for hit in token.latents)]
    attach_explanations(session, result.sae, hits)  # and the LLM explanations of every latent found
    return result


@router.get("/search.csv", include_in_schema=False, name="read_search_csv")
def read_search_csv(session: SessionDep, urls: URLsDep, q: Q = "", sae: Sae = None, limit: Limit = 20) -> Response:
    """The search page's results, a row per latent in its order: the page's record (read_search),
    written with pandas."""
    result = read_search(session=session, urls=urls, q=q, sae=sae, limit=limit)
    return frames.csv_response(frames.search_frame(result), f"{result.sae or 'saescope'}-search.csv", index=False)


# ---------------------------------------------------------------- find by example

ExampleLimit = Annotated[int, Query(ge=1, le=100, description="latents listed")]


class ExampleSearchRequest(BaseModel):
    sae: SaeId = Field(description="SAE id, as listed by /index.json")
    text: str = Field(description="the snippet: the limits of POST /api/probe")
    limit: int = Field(20, ge=1, le=100, description="latents listed")


async def example_page(page: pages.PageCall):
    """The form and, for a snippet, its latents; why the probe cannot run (the model not on this
    server, a snippet too long) is said on the page, with the probe's status."""
    p = page.params
    options = await run_in_threadpool(p["probe"].options)
    sae = p["sae"] or first_sae(options)
    text = page_text(p["text"])
    found, error, status, headers = None, None, 200, {}
    if sae is not None and text.strip():
        try:
            found = await page.data(sae=sae, text=text)
        except HTTPException as e:
            error, status, headers = e.detail, e.status_code, e.headers or {}
            if isinstance(e, TooLong):
                error += " (shorten the snippet)"
    response = page.render(found, status_code=status, sae=sae, text=text, error=error, options=options,
                           max_chars=p["probe"].settings.probe_max_chars)
    if "Retry-After" in headers:
        response.headers["Retry-After"] = headers["Retry-After"]
    if error:  # this server's moment (no model, busy), not the load's: not kept (app.caching)
        response.headers["Cache-Control"] = "no-store"
    return response


@pages.route(router, "/search/example", template="search_example.html", name="found", html=example_page,
             parts={"example-results": "_example_results.html"}, responses=ERRORS | UNAVAILABLE,
             summary="Latents most specific to a snippet (find by example)")
async def read_search_example(probe: ProbeDep, urls: URLsDep,
                              sae: Annotated[str | None, Query(description="SAE id (the page picks one without it; "
                                                                            "the twin needs it)")] = None,
                              text: Annotated[str, Query(description="the snippet (the probe's limits)")] = "",
                              limit: ExampleLimit = 20) -> ExampleSearchOut:
    """The snippet is probed as /probe.json probes text (the same 422, 413, 404 and 503); each
    latent firing on it is scored by its summed activation times log(1 / density), most
    specific first."""
    if sae is None:
        raise HTTPException(422, "sae is required: an SAE id, as /index.json lists them")
    return await find_by_example(probe, sae, text, urls, limit)


@router.post("/api/search/example", response_model=ExampleSearchOut, responses=ERRORS | UNAVAILABLE,
             summary="Latents most specific to a snippet (find by example)")
async def create_search_example(body: ExampleSearchRequest, probe: ProbeDep, urls: URLsDep):
    """GET /search/example.json with the snippet in the body: the same answer and errors."""
    return json_response(await find_by_example(probe, body.sae, body.text, urls, body.limit))
