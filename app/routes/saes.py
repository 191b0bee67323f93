"""The index of loaded SAEs and each SAE's page (config, metrics, density histogram, latents)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BeforeValidator, Field

from app import ladders, queries
from app.schemas import ErrorOut, IndexOut, SaePageOut
from app.deps import SessionDep, URLsDep
from app.render import json_response, render

router = APIRouter(tags=["saes"])

# Bounded so the OFFSET always fits the database's integers (a bigger page is a 422, not a 500).
Page = Annotated[int, Query(ge=1, le=2**31 - 1, description="1-based page number")]
PerPage = Annotated[int, Query(ge=1, le=500, description="latents per page")]
# The page's filter form sends an empty field as "": that means no bound, not a bad number.
Share = Annotated[float, Field(ge=0, le=1)]
Density = Annotated[Share | None, BeforeValidator(lambda value: None if value == "" else value),
                    Query(description="a share of tokens, 0..1 (empty: no bound)")]


def latent_filter(min_density: Density = None, max_density: Density = None,
                  hide_dead: Annotated[bool, Query(description="leave out latents that never fired")] = False,
                  hide_dense: Annotated[bool, Query(description="leave out latents firing on more than 10 % of tokens")] = False,
                  ) -> queries.LatentFilter:
    return queries.LatentFilter(min_density, max_density, hide_dead, hide_dense)


FilterDep = Annotated[queries.LatentFilter, Depends(latent_filter)]


@router.get("/index.json", response_model=IndexOut, summary="SAEs in the database")
def read_index_json(session: SessionDep, urls: URLsDep):
    return {"saes": [sae.as_json(urls) for sae in queries.list_saes(session)]}


@router.get("/", include_in_schema=False)
def read_index(request: Request, session: SessionDep):
    return render(request, "index.html", saes=queries.list_saes(session), ladders=ladders.list_ladders(session))


def _latent_page(session, sae_id, sort, order, page, per_page, filters) -> queries.LatentPage:
    latent_page = queries.list_latents(session, sae_id, sort=sort, order=order, page=page, per_page=per_page,
                                       filters=filters)
    if latent_page is None:
        raise HTTPException(404, f"no SAE {sae_id!r}")
    return latent_page


@router.get("/saes/{sae_id}.json", response_model=SaePageOut, responses={404: {"model": ErrorOut}},
            summary="One SAE: config, metrics, density histogram and a page of its latents")
def read_sae_json(
    sae_id: str, session: SessionDep, urls: URLsDep, filters: FilterDep,
    sort: queries.SortKey = "density", order: queries.Order = "desc", page: Page = 1, per_page: PerPage = 50,
):
    return json_response(_latent_page(session, sae_id, sort, order, page, per_page, filters).as_json(urls))


@router.get("/saes/{sae_id}", include_in_schema=False)
def read_sae(
    request: Request, sae_id: str, session: SessionDep, filters: FilterDep,
    sort: queries.SortKey = "density", order: queries.Order = "desc", page: Page = 1, per_page: PerPage = 50,
):
    return render(request, "sae.html", latent_page=_latent_page(session, sae_id, sort, order, page, per_page, filters))
