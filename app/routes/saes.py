"""The index of loaded SAEs and each SAE's page (config, metrics, density histogram, latents)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response
from pydantic import BeforeValidator, Field

from app import frames, ladders, pages, queries
from app.deps import SessionDep, URLsDep
from app.schemas import ErrorOut

router = APIRouter(tags=["saes"])

# Bounded so the OFFSET always fits the database's integers (a bigger page is a 422, not a 500).
Page = Annotated[int, Query(ge=1, le=2**31 - 1, description="1-based page number")]
PerPage = Annotated[int, Query(ge=1, le=500, description="latents per page")]
# The page's filter form sends an empty field as "": that means no bound, not a bad number.
ShareOut = Annotated[float, Field(ge=0, le=1)]
Density = Annotated[ShareOut | None, BeforeValidator(lambda value: None if value == "" else value),
                    Query(description="a share of tokens, 0..1 (empty: no bound)")]


Percent = Annotated[Annotated[float, Field(ge=0, le=100)] | None, BeforeValidator(lambda value: None if value == "" else value),
                    Query(description="the same bound as a percentage of tokens, as the pages show densities "
                                      "(the SAE page's form sends it; min_density/max_density win when both are given)")]


def latent_filter(min_density: Density = None, max_density: Density = None,
                  min_density_pct: Percent = None, max_density_pct: Percent = None,
                  hide_dead: Annotated[bool, Query(description="leave out latents that never fired")] = False,
                  hide_dense: Annotated[bool, Query(description="leave out latents firing on more than 10 % of tokens")] = False,
                  ) -> queries.LatentFilterOut:
    def share(value: float | None, percent: float | None) -> float | None:
        return value if value is not None or percent is None else percent / 100

    return queries.LatentFilterOut(min_density=share(min_density, min_density_pct),
                                   max_density=share(max_density, max_density_pct), hide_dead=hide_dead,
                                   hide_dense=hide_dense)


FilterDep = Annotated[queries.LatentFilterOut, Depends(latent_filter)]


def index_page(page: pages.PageCall):
    """The index lists the scaling ladders too (their own twin is /ladders.json)."""
    return page.render(page.data(), ladders=ladders.list_ladders(page.params["session"], page.params["urls"]).ladders)


@pages.route(router, "/", json_path="/index.json", template="index.html", name="index", html=index_page,
             summary="SAEs in the database")
def read_index(session: SessionDep, urls: URLsDep) -> queries.IndexOut:
    return queries.list_saes(session, urls)


@pages.route(router, "/saes/{sae_id}", template="sae.html", name="latent_page", responses={404: {"model": ErrorOut}},
             summary="One SAE: config, metrics, density histogram and a page of its latents")
def read_sae(
    sae_id: str, session: SessionDep, urls: URLsDep, filters: FilterDep,
    sort: queries.SortKey = "density", order: queries.Order = "desc", page: Page = 1, per_page: PerPage = 50,
) -> queries.SaePageOut:
    latent_page = queries.list_latents(session, sae_id, sort=sort, order=order, page=page, per_page=per_page,
                                       filters=filters, urls=urls)
    if latent_page is None:
        raise HTTPException(404, f"no SAE {sae_id!r}")
    return latent_page


@router.get("/saes/{sae_id}/latents.csv", include_in_schema=False, name="read_sae_latents_csv")
def read_sae_latents_csv(sae_id: str, session: SessionDep, filters: FilterDep,
                         sort: queries.SortKey = "density", order: queries.Order = "desc") -> Response:
    """Every latent the SAE page lists with these filters, in its order (all pages at once): its
    columns, written with pandas (app.frames)."""
    if queries.get_sae_summary(session, sae_id) is None:
        raise HTTPException(404, f"no SAE {sae_id!r}")
    frame = frames.latents_frame(session, sae_id, sort, order, filters)
    return frames.csv_response(frame, f"{sae_id}-latents.csv")
