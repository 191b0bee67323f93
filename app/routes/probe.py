"""Probe typed text: an HTML page (shareable GET link, htmx-enhanced) and a JSON API."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app import queries
from app.deps import ProbeDep, SessionDep
from app.render import is_htmx, json_response, render
from app.schemas import ErrorOut

router = APIRouter(tags=["probe"])


class ProbeRequest(BaseModel):
    sae: str = Field(description="SAE id, as listed by /index.json")
    text: str = Field(description="text to encode (not empty, at most probe_max_chars characters)")
    top_k: int = Field(5, ge=1, le=64, description="strongest latents reported per token")


class ProbeLatent(BaseModel):
    index: int
    activation: float


class ProbeTokenOut(BaseModel):
    token: str
    token_id: int
    top_latents: list[ProbeLatent]


class ProbeResponse(BaseModel):
    sae: str
    tokens: list[ProbeTokenOut]
    truncated: bool


@router.post(
    "/api/probe", response_model=ProbeResponse, summary="Latents of every token of a text",
    responses={code: {"model": ErrorOut} for code in (404, 413, 503)},
)
async def create_probe(body: ProbeRequest, probe: ProbeDep):
    """Empty or whitespace text: 422 {"detail": "text must not be empty"}; longer than the
    server's limit: 413; unknown SAE: 404; weights missing on this server or probe busy: 503."""
    result = await probe.probe(body.sae, body.text, body.top_k)
    return json_response(result.as_json())


@router.get("/probe", include_in_schema=False)
async def read_probe(request: Request, session: SessionDep, probe: ProbeDep, sae: str | None = None, text: str | None = None):
    saes = await run_in_threadpool(queries.list_saes, session)  # keep the event loop free
    context = {"saes": saes, "sae": sae or (saes[0].id if saes else None), "text": text or "",
               "result": None, "error": None, "maxes": {}}
    status = 200
    if sae is not None and text is not None:
        try:
            result = await probe.probe(sae, text)
            top = [token.top_latents[0].index for token in result.tokens if token.top_latents]
            maxes = await run_in_threadpool(queries.latent_max_activations, session, sae, top)
            context.update(result=result, maxes=maxes)
        except HTTPException as e:
            status, context["error"] = e.status_code, e.detail
    template = "_probe_result.html" if is_htmx(request) else "probe.html"
    return render(request, template, status_code=status, **context)
