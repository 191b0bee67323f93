"""Steer generation with latents: the page (its state in the query string) and its twin, share
links at /s/{id}, and the JSON API (POST /api/steer, POST /api/steer/share)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse

from app import pages
from app.deps import ProbeDep, SessionDep, SteerDep, URLsDep
from app.render import is_htmx, json_response, render
from app.routes.probe import ERRORS, UNAVAILABLE, Utf8Route, absolute, first_sae, page_text, within_share_limits
from app.schemas import ErrorOut
from app.shares import SteerShareOut, create_steer_share, get_steer_share
from app.steering import (
    MAX_LATENTS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_TOKENS,
    MAX_STRENGTH,
    MAX_TEMPERATURE,
    Mode,
    SteerOut,
    SteerRequest,
    link_state,
    parse_latents_param,
)

router = APIRouter(tags=["steer"], route_class=Utf8Route)

STEER_ERRORS = ERRORS | UNAVAILABLE
DEFAULT_STRENGTH = 4.0  # what "Steer with this latent" starts from: clearly visible, rarely gibberish

Sae = Annotated[str | None, Query(description="SAE id, as /index.json lists them (the page picks one without it)")]
Prompt = Annotated[str, Query(description=f"the text to continue (at most {MAX_PROMPT_TOKENS} tokens)")]
Latents = Annotated[str, Query(description=f"1 to {MAX_LATENTS} latents as INDEX:STRENGTH, comma-separated (12:4,7:-2.5); "
                                           f"a strength is a multiple of the latent's max activation, |s| <= {MAX_STRENGTH:g}")]
Tokens = Annotated[int, Query(description=f"new tokens, 1 to {MAX_NEW_TOKENS}")]
Temperature = Annotated[float, Query(description=f"0: greedy; up to {MAX_TEMPERATURE:g}: sampled with the seed")]
TopP = Annotated[float, Query(description="nucleus sampling's probability mass, in (0, 1]")]
Seed = Annotated[int, Query(ge=0, le=2**63 - 1, description="the sampler's seed")]


def steer_request(sae: str | None, prompt: str, latents: str, mode: Mode, tokens: int, temperature: float, top_p: float,
                  seed: int) -> SteerRequest:
    if sae is None:
        raise HTTPException(422, "sae is required: an SAE id, as /index.json lists them")
    return SteerRequest(sae=sae, prompt=page_text(prompt), latents=parse_latents_param(latents), mode=mode, tokens=tokens,
                        temperature=temperature, top_p=top_p, seed=seed)


# ---------------------------------------------------------------- JSON API


@router.post("/api/steer", response_model=SteerOut, summary="Continue a prompt as the model does and with latents steered",
             responses=STEER_ERRORS)
async def create_steering(body: SteerRequest, steer: SteerDep, urls: URLsDep):
    """Both continuations (the same sampler), where they part, and the steered latents' activations
    on every token. Errors: 422 a bad prompt, latent list, strength, temperature or top_p; 413 a
    prompt over 512 tokens or more than 128 new tokens; 404 unknown SAE or latent; 503 weights or
    model not on this server, or steering busy (with Retry-After)."""
    return json_response(await steer.steer(body, urls))


@router.post("/api/steer/share", response_model=SteerShareOut, status_code=201, responses=STEER_ERRORS | {
             200: {"model": SteerShareOut, "description": "the link existed already"}},
             summary="Share a steering as a short permanent link")
async def create_steer_share_link(request: Request, body: SteerRequest, session: SessionDep, steer: SteerDep, urls: URLsDep):
    """Runs the steering (or takes it from the cache) and stores the request with its texts: 201
    when new, 200 with the same link when shared before. /s/{id} shows exactly those texts."""
    share, created = await _share(request, session, steer, body, urls)
    return json_response(share, status_code=201 if created else 200)


# ---------------------------------------------------------------- the page and its twin


async def steer_page(page: pages.PageCall):
    """The form, and the steering when the query string names one (an htmx request gets the
    result alone)."""
    p = page.params
    options = await run_in_threadpool(p["probe"].options)
    sae = p["sae"] or first_sae(options)
    asked = dict(sae=sae, prompt=page_text(p["prompt"]), latents=p["latents"], mode=p["mode"], tokens=p["tokens"],
                 temperature=p["temperature"], top_p=p["top_p"], seed=p["seed"])
    view, error, retry_after, status = None, None, None, 200
    if sae and p["prompt"].strip() and p["latents"].strip():
        try:
            view = await page.data(sae=sae)
        except HTTPException as e:
            error, retry_after, status = e.detail, (e.headers or {}).get("Retry-After"), e.status_code
    return _render(page.request, page, view, asked, options, error=error, retry_after=retry_after, status=status)


@pages.route(router, "/steer", template="steer.html", name="view", html=steer_page, responses=STEER_ERRORS,
             summary="The steering page's JSON twin")
async def read_steer(steer: SteerDep, probe: ProbeDep, urls: URLsDep, sae: Sae = None, prompt: Prompt = "",
                     latents: Latents = "", mode: Mode = "add", tokens: Tokens = 32, temperature: Temperature = 0.0,
                     top_p: TopP = 1.0, seed: Seed = 0) -> SteerOut:
    """The same query string as /steer gives the same steering, as POST /api/steer shapes it."""
    request = steer_request(sae, prompt, latents, mode, tokens, temperature, top_p, seed)
    return await steer.steer(request, urls)


async def steer_share_page(page: pages.PageCall):
    """A shared steering: the page with the stored texts, at its short link (no model needed)."""
    share: SteerShareOut = await run_in_threadpool(page.data)
    options = await run_in_threadpool(page.params["probe"].options)
    s = share.steering
    asked = dict(sae=s.sae, prompt=s.prompt, latents=",".join(f"{lat.index}:{lat.strength:g}" for lat in s.latents),
                 mode=s.mode, tokens=s.tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    return _render(page.request, page, s, asked, options, share=share)


@pages.route(router, "/s/{share_id}", template="steer.html", name="view", html=steer_share_page,
             summary="A shared steering", responses={404: {"model": ErrorOut}})
def read_steer_share(share_id: str, session: SessionDep, probe: ProbeDep, urls: URLsDep) -> SteerShareOut:
    """The steering as it was shared: its request and the texts it gave."""
    share = get_steer_share(session, share_id, urls)
    if share is None:
        raise HTTPException(404, f"no shared steering {share_id!r}")
    return share


@router.post("/steer/share", include_in_schema=False)
async def create_steer_share_from_page(request: Request, session: SessionDep, steer: SteerDep, urls: URLsDep,
                                       sae: Annotated[str, Form()], prompt: Annotated[str, Form()],
                                       latents: Annotated[str, Form()], mode: Annotated[Mode, Form()] = "add",
                                       tokens: Annotated[int, Form()] = 32, temperature: Annotated[float, Form()] = 0.0,
                                       top_p: Annotated[float, Form()] = 1.0, seed: Annotated[int, Form(ge=0)] = 0):
    """The Share button: the link as a fragment (htmx), or a redirect to it (no JavaScript)."""
    try:
        share, _ = await _share(request, session, steer, steer_request(sae, prompt, latents, mode, tokens, temperature, top_p, seed), urls)
    except HTTPException as e:
        if not is_htmx(request):
            raise
        return render(request, "_probe_error.html", status_code=e.status_code, error=e.detail)
    if not is_htmx(request):
        return RedirectResponse(share.url, status_code=303)
    return render(request, "_steer_share.html", share=share, link=absolute(request, share.url))


# ---------------------------------------------------------------- helpers


def _render(request: Request, page: pages.PageCall, view: SteerOut | None, asked: dict, options, share=None,
            error: str | None = None, retry_after: str | None = None, status: int = 200):
    urls = page.params["urls"]
    form_state = {k: v for k, v in asked.items() if k not in ("sae", "prompt", "latents")}
    page_url = urls.steer(asked["sae"], asked["prompt"] or None, asked["latents"] or None, **link_state(**form_state))
    address = share.url if share else page_url
    context = {
        "options": options, "asked": asked, "share": share, "error": error, "retry_after": retry_after,
        "page_url": page_url, "json_url": (share.json_url if share else view.json_url) if view else None,
        "og": open_graph(view, absolute(request, address)),
        "limits": {"prompt_tokens": MAX_PROMPT_TOKENS, "new_tokens": MAX_NEW_TOKENS, "latents": MAX_LATENTS,
                   "strength": MAX_STRENGTH, "temperature": MAX_TEMPERATURE},
    }
    template = "_steer_result.html" if is_htmx(request) else "steer.html"
    response = page.render(view, template=template, status_code=status, **context)
    if retry_after:
        response.headers["Retry-After"] = retry_after
    return response


def open_graph(view: SteerOut | None, url: str) -> dict:
    """Open Graph tags: a pasted link previews with the prompt, the latents and both texts."""
    if view is None:
        return {"title": "saescope steering", "url": url,
                "description": "Continue a prompt as the model does and with sparse-autoencoder latents turned up, "
                               "clamped or down, side by side; the view is a link to share."}

    def cut(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= n else text[: n - 1] + "…"

    steered = ", ".join(f"#{latent.index} ×{latent.strength:g}" for latent in view.latents)
    return {"title": f"“{cut(view.prompt, 50)}” steered with {steered} · saescope",
            "description": f"{view.mode} on {view.sae}. Default: “{cut(view.default.text, 80)}” "
                           f"Steered: “{cut(view.steered.text, 80)}”",
            "url": url}


async def _share(request: Request, session, steer, body: SteerRequest, urls) -> tuple[SteerShareOut, bool]:
    steering = await steer.steer(body, urls)
    made = await within_share_limits(request, create_steer_share, session, steering, urls)
    if made is None:
        raise HTTPException(404, f"no SAE {body.sae!r}")
    return made
