"""Search an SAE's latents by explanation text and by token (app/search.py says how)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse

from app import queries, search
from app.deps import SessionDep, URLsDep
from app.render import hx_target, json_response, render
from app.schemas import ErrorOut, SearchOut

router = APIRouter(tags=["search"])

Q = Annotated[str, Query(max_length=200, description="words of an explanation, a token (leading spaces count), or a latent number")]
Sae = Annotated[str | None, Query(description="SAE id (default: the first SAE)")]
Limit = Annotated[int, Query(ge=1, le=100, description="results per kind")]


def _search(session, sae_id: str | None, q: str, limit: int) -> search.SearchResult:
    sae = queries.get_sae_summary(session, sae_id)  # the first SAE without one
    if sae_id and sae is None:
        raise HTTPException(404, f"no SAE {sae_id!r}")
    return search.search(session, sae, q, limit)


@router.get("/search.json", response_model=SearchOut, responses={404: {"model": ErrorOut}},
            summary="Latents by explanation text and by token")
def read_search_json(session: SessionDep, urls: URLsDep, q: Q = "", sae: Sae = None, limit: Limit = 20):
    """`q` is looked up as a token (as typed, stripped, and with one leading space) and as the
    words of explanations; a number also names a latent."""
    return json_response(_search(session, sae, q, limit).as_json(urls))


@router.get("/search", include_in_schema=False)
def read_search(request: Request, session: SessionDep, urls: URLsDep, q: Q = "", sae: Sae = None, limit: Limit = 20,
                go: Annotated[bool, Query(include_in_schema=False)] = False):
    result = _search(session, sae, q, limit)
    live = hx_target(request, {"search-results"})
    # "#123" typed in the header's box (go=1) opens the latent; the search page's own address
    # (pushed as one types there) stays a list of results, also when reloaded
    if go and not live and result.latent and q.strip().startswith("#"):
        return RedirectResponse(urls.feature(result.sae.id, result.latent.index), status_code=303)
    return render(request, "_search_results.html" if live else "search.html", result=result)
