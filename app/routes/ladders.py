"""Scaling ladders: the sweeps in the database, and one sweep's fits, charts and rungs."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from app import ladders
from app.deps import SessionDep, URLsDep
from app.render import json_response, render
from app.schemas import ErrorOut, LadderIndexOut, LadderPageOut

router = APIRouter(tags=["ladders"])


@router.get("/ladders.json", response_model=LadderIndexOut, summary="Scaling ladders (sweeps) in the database")
def read_ladders_json(session: SessionDep, urls: URLsDep):
    return {"ladders": [ladder.as_json(urls) for ladder in ladders.list_ladders(session)]}


@router.get("/ladders", include_in_schema=False)
def read_ladders(request: Request, session: SessionDep):
    return render(request, "ladders.html", ladders=ladders.list_ladders(session))


def _ladder(session, ladder_id: str) -> ladders.LadderPage:
    page = ladders.get_ladder(session, ladder_id)
    if page is None:
        raise HTTPException(404, f"no ladder {ladder_id!r}")
    return page


@router.get("/ladders/{ladder_id}.json", response_model=LadderPageOut, responses={404: {"model": ErrorOut}},
            summary="One ladder: its scaling fits with intervals and R², and its rungs")
def read_ladder_json(ladder_id: str, session: SessionDep, urls: URLsDep):
    return json_response(_ladder(session, ladder_id).as_json(urls))


@router.get("/ladders/{ladder_id}", include_in_schema=False)
def read_ladder(request: Request, ladder_id: str, session: SessionDep):
    return render(request, "ladder.html", ladder=_ladder(session, ladder_id))
