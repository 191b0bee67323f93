"""FastAPI dependencies as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.probe_service import ProbeService
from app.settings import Settings
from app.steering import SteerService
from app.urls import URLs


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_urls(request: Request) -> URLs:
    return URLs(request.scope.get("root_path", ""))


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_probe(request: Request) -> ProbeService:
    return request.app.state.probe


def get_steer(request: Request) -> SteerService:
    return request.app.state.steer


SessionDep = Annotated[Session, Depends(get_session)]
URLsDep = Annotated[URLs, Depends(get_urls)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ProbeDep = Annotated[ProbeService, Depends(get_probe)]
SteerDep = Annotated[SteerService, Depends(get_steer)]
