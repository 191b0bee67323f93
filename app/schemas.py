"""The JSON API's error shapes, for the OpenAPI schema (/openapi.json). What a page's twin answers
is its record, declared once beside its query (app/queries.py, app/features.py, ...)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorOut(BaseModel):
    detail: str


class FieldErrorOut(BaseModel):
    """One part of a request that FastAPI's validation rejected (its other keys, such as `input`
    and `ctx`, may follow)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description='where: "body", "query" or "path", then the field')
    msg: str
    type: str


class InvalidRequestOut(BaseModel):
    """A 422: either of the two shapes that share the status."""

    detail: str | list[FieldErrorOut] = Field(
        description="a sentence when the text fails the probe's own checks (empty, a control character, a lone "
                    "surrogate), or FastAPI's list of the fields that failed validation (a missing field, top_k=0)")
