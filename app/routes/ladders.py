"""Scaling ladders: the sweeps in the database, and one sweep's fits, charts and rungs."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from app import ladders, pages
from app.deps import SessionDep, URLsDep
from app.schemas import ErrorOut

router = APIRouter(tags=["ladders"])


@pages.route(router, "/ladders", template="ladders.html", name="index",
             summary="Scaling ladders (sweeps) in the database")
def read_ladders(session: SessionDep, urls: URLsDep) -> ladders.LadderIndexOut:
    return ladders.list_ladders(session, urls)


@pages.route(router, "/ladders/{ladder_id}", template="ladder.html", name="page", responses={404: {"model": ErrorOut}},
             summary="One ladder: its scaling fits with intervals and R², and its rungs")
def read_ladder(ladder_id: str, session: SessionDep, urls: URLsDep) -> ladders.LadderPageOut:
    page = ladders.get_ladder(session, ladder_id, urls)
    if page is None:
        raise HTTPException(404, f"no ladder {ladder_id!r}")
    return page
