"""Search an SAE's latents by explanation text and by token (app/search.py says how)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import RedirectResponse, Response

from app import frames, pages, queries, search
from app.explanations import attach_explanations
from app.deps import SessionDep, URLsDep
from app.schemas import ErrorOut

router = APIRouter(tags=["search"])

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
    return page.render(result)


@pages.route(router, "/search", template="search.html", name="result", parts={"search-results": "_search_results.html"},
             html=search_page, responses={404: {"model": ErrorOut}}, summary="Latents by explanation text and by token")
def read_search(session: SessionDep, urls: URLsDep, q: Q = "", sae: Sae = None, limit: Limit = 20) -> search.SearchOut:
    """`q` is looked up as a token (as typed, stripped, and with one leading space) and as the
    words of explanations; a number also names a latent."""
    summary = queries.get_sae_summary(session, sae)  # the first SAE without one
    if sae and summary is None:
        raise HTTPException(404, f"no SAE {sae!r}")
    result = search.search(session, summary, q, limit, urls)
    hits = [result.latent, *result.explanations, *(hit for token in result.tokens for hit in token.latents)]
    attach_explanations(session, result.sae, hits)  # and the LLM explanations of every latent found
    return result


@router.get("/search.csv", include_in_schema=False, name="read_search_csv")
def read_search_csv(session: SessionDep, urls: URLsDep, q: Q = "", sae: Sae = None, limit: Limit = 20) -> Response:
    """The search page's results, a row per latent in its order: the page's record (read_search),
    written with pandas."""
    result = read_search(session=session, urls=urls, q=q, sae=sae, limit=limit)
    return frames.csv_response(frames.search_frame(result), f"{result.sae or 'saescope'}-search.csv", index=False)
