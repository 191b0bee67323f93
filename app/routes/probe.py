"""Probe typed text: the page (its state in the query string), its htmx fragments, share links
at /p/{id}, and the JSON API (POST /api/probe, POST /api/share, GET /p/{id}.json)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from pydantic import AfterValidator, AliasChoices, BaseModel, BeforeValidator, Field

from app import pages, queries
from app.deps import ProbeDep, SessionDep, URLsDep
from app.params import check_utf8, form_index
from app.probe_availability import SaeOption
from app.probe_service import TooLong
from app.probe_view import ProbeResponse, SharedProbeOut, SortKey, UnknownLatent, view_state, view_text
from app.render import is_htmx, json_response, render
from app.schemas import ErrorOut, InvalidRequestOut
from app.shares import ShareLimitReached, ShareLimits, ShareOut, create_share, get_share
from app.urls import URLs
from trainer.thresholds import FREQUENT_THRESHOLD


@asynccontextmanager
async def preload_models(app: FastAPI):
    """`saescope serve --preload` (SAESCOPE_PROBE_PRELOAD=1): load every SAE's model before
    the server takes requests. FastAPI runs this inside the app's own lifespan."""
    if app.state.settings.probe_preload:
        await app.state.probe.preload()
    yield


class Utf8Route(APIRoute):
    """Rejects a body that is not UTF-8 with a 400 that says so (Starlette would silently turn
    such bytes into U+FFFD, and FastAPI's JSON error does not name the cause). Query strings are
    checked for every route by app.security."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            content_type = request.headers.get("content-type", "")
            if request.method == "POST" and content_type.startswith("application/x-www-form-urlencoded"):
                body = await request.body()
                check_utf8(body, "the form field")
                if b"%00" in body or b"\x00" in body:
                    raise HTTPException(400, "NUL bytes are not allowed in form fields")
            elif request.method == "POST":
                body = await request.body()  # cached: FastAPI parses the same bytes next
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise HTTPException(400, f"the request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
            return await handler(request)

        return checked


router = APIRouter(tags=["probe"], lifespan=preload_models, route_class=Utf8Route)

PAGE_TOP_N = 25  # latents in the page's whole-text ranking
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                               "description": "seconds to wait before asking again: sent when the probe is busy"}}
ERRORS = {code: {"model": ErrorOut} for code in (400, 404, 413)} | {
    422: {"model": InvalidRequestOut, "description": "the text failed the probe's checks (detail a sentence) "
                                                     "or the request failed validation (detail a list)"}}
UNAVAILABLE = {503: {"model": ErrorOut, "headers": RETRY_AFTER,
                     "description": "the weights or the model are not on this server, or the probe is busy "
                                    "(then with Retry-After)"}}
BUSY = {503: {"model": ErrorOut, "headers": RETRY_AFTER, "description": "the probe is busy (with Retry-After)"}}


# ---------------------------------------------------------------- the API's requests


def no_nul(value: str) -> str:
    """No id contains a NUL, and PostgreSQL cannot even compare one (the text's own check says more)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


SaeId = Annotated[str, AfterValidator(no_nul)]


class ProbeRequest(BaseModel):
    sae: SaeId = Field(description="SAE id, as listed by /index.json")
    text: str = Field(description="text to encode: not empty, at most probe_max_chars characters and "
                                  "probe_max_tokens tokens, no control characters but tab and newlines")
    top_k: int = Field(5, ge=1, le=64, description="strongest latents reported per token")
    top_n: int = Field(20, ge=1, le=500, description="latents in the whole-text ranking")
    sort: SortKey = Field("max", description="rank the whole-text latents by their max or their sum over the tokens")
    bos: bool = Field(False, description="put the model's beginning-of-text token before the text, so that the "
                                         "text's first token is not the (left out) first position")
    hide_frequent_and_first: bool = Field(
        True, description=f"leave frequent latents (density > {FREQUENT_THRESHOLD:.0%}) and the first position (an "
                          "attention sink, left out by the harvest too) out of the whole-text ranking",
        # the key's name from before "dense" meant only evaluation's 10 %: older clients still get what they ask
        validation_alias=AliasChoices("hide_frequent_and_first", "hide_dense_and_first"))


class ShareRequest(BaseModel):
    sae: SaeId = Field(description="SAE id")
    text: str = Field(description="the probed text (the same limits as POST /api/probe)")


# ---------------------------------------------------------------- the view's state in a query string


def blank_is_none(value):
    """A form's empty field (the page's "clear" button sends latent=) means none."""
    return None if isinstance(value, str) and not value.strip() else value


Position = Annotated[int, Field(ge=0)]  # a latent's index, or a token's
Latent = Annotated[Position | None, BeforeValidator(blank_is_none),
                   Query(description="the latent to highlight over every token (empty: none)")]
Token = Annotated[Position | None, BeforeValidator(blank_is_none),
                  Query(description="the token whose latents the page's panel lists (empty: none)")]


@dataclass
class ProbeState:
    """What a probe page shows of a text beyond the SAE: the highlighted latent, the order of the
    whole-text ranking, and whether frequent latents and the first position are left out."""

    latent: int | None
    sort: SortKey
    hide: bool
    bos: bool = False


async def probe_state(latent: Latent = None, sort: SortKey = "max",
                      include_all: Annotated[bool, Query(alias="all", description="count frequent latents and the "
                                                                                 "first position too")] = False,
                      bos: Annotated[bool, Query(description="put the model's beginning-of-text token before the "
                                                             "text (its first token is then counted)")] = False,
                      ) -> ProbeState:
    return ProbeState(latent, sort, not include_all, bos)


StateDep = Annotated[ProbeState, Depends(probe_state)]


# ---------------------------------------------------------------- JSON API


@router.post("/api/probe", response_model=ProbeResponse, summary="Latents of every token of a text",
             responses=ERRORS | UNAVAILABLE)
async def create_probe(body: ProbeRequest, probe: ProbeDep, urls: URLsDep):
    """Tokens (text and id), each token's strongest latents, and the latents most active over the
    whole text. Errors: 422 empty text, control characters or a lone surrogate; 413 over the
    character or token limit (the message gives it); 404 unknown SAE; 503 weights or model not on
    this server, or the probe busy (with Retry-After)."""
    began = time.perf_counter()
    view = await view_text(probe, body.sae, body.text, urls, top_k=body.top_k, top_n=body.top_n, sort=body.sort, bos=body.bos,
                           hide=body.hide_frequent_and_first)
    response = json_response(view)
    # the server's own time for this probe, queueing included (bench/probe_latency.py reads it)
    response.headers["Server-Timing"] = f"probe;dur={(time.perf_counter() - began) * 1000:.2f}"
    return response


@router.post("/api/share", response_model=ShareOut, status_code=201, summary="Share a probe as a short permanent link",
             responses=ERRORS | {200: {"model": ShareOut, "description": "the link existed already"},
                                 429: {"model": ErrorOut, "headers": RETRY_AFTER,
                                       "description": "too many new links from this address, or on this server"}})
async def create_share_link(request: Request, body: ShareRequest, session: SessionDep, probe: ProbeDep, urls: URLsDep):
    """Stores the SAE id and the text under an id derived from their hash: 201 when new, 200 with
    the same link when this probe was shared before. /p/{id} opens it, /p/{id}.json gives it (the
    id in any letter case). New links are limited per client address and in all: 429 beyond
    (with Retry-After when waiting helps)."""
    share, created = await _share(request, session, probe, body.sae, body.text, urls)
    return json_response(share, status_code=201 if created else 200)


# ---------------------------------------------------------------- pages and their twins


FREQUENT_PERCENT = f"{FREQUENT_THRESHOLD * 100:g} %"


async def probe_page(page: pages.PageCall, token: Token = None):
    """The page: the form, and the probe of its text when there is one (an htmx request gets the
    result alone). The page keeps a highlighted latent the SAE lacks (its user is switching
    SAEs) and lists more latents than the twin does by default."""
    p = page.params
    return await _probe_page(page, p["probe"], p["urls"], p["sae"], page_text(p["text"]), p["state"], token=token)


@pages.route(router, "/probe", template="probe.html", name="view", html=probe_page, responses=ERRORS | UNAVAILABLE,
             summary="The probe page's JSON twin")
async def read_probe(probe: ProbeDep, urls: URLsDep, state: StateDep,
                     sae: Annotated[str | None, Query(description="SAE id, as /index.json lists them (the page "
                                                                   "picks one without it; the twin needs it)")] = None,
                     text: Annotated[str, Query(description="the text to probe (the limits of POST /api/probe)")] = "",
                     top_k: Annotated[int, Query(ge=1, le=64, description="strongest latents listed per token")] = 5,
                     top_n: Annotated[int, Query(ge=1, le=500, description="latents in the whole-text ranking")] = 20,
                     ) -> ProbeResponse:
    """The same query string as /probe gives the same probe, as POST /api/probe shapes it."""
    if sae is None:
        raise HTTPException(422, "sae is required: an SAE id, as /index.json lists them")
    return await view_text(probe, sae, text, urls, latent=state.latent, top_k=top_k, top_n=top_n, sort=state.sort,
                           hide=state.hide, bos=state.bos)


async def share_page(page: pages.PageCall, token: Token = None):
    """A shared probe's page: the probe page on the stored text, at its short link."""
    p = page.params
    share = await _get_share(p["session"], p["share_id"], p["urls"])
    return await _probe_page(page, p["probe"], p["urls"], share.sae, page_text(share.text), p["state"], share=share,
                             token=token)


@pages.route(router, "/p/{share_id}", template="probe.html", name="view", html=share_page, summary="A shared probe",
             responses={code: {"model": ErrorOut} for code in (400, 404)} | BUSY)
async def read_share(share_id: str, session: SessionDep, probe: ProbeDep, urls: URLsDep, state: StateDep) -> SharedProbeOut:
    """The stored text and its probe now (null with `error` when the model is not on this server;
    503 with Retry-After when the probe is busy; 422 for a latent the SAE lacks, as /probe.json)."""
    share = await _get_share(session, share_id, urls)
    if state.latent is not None:  # checked whether or not the probe can run here
        summary = await run_in_threadpool(queries.get_sae_summary, session, share.sae)
        if summary is not None and state.latent >= summary.n_latents:
            raise UnknownLatent(share.sae, state.latent, summary.n_latents)
    view, error = None, None
    try:
        view = await view_text(probe, share.sae, share.text, urls, latent=state.latent, sort=state.sort, hide=state.hide,
                               bos=state.bos)
    except UnknownLatent:
        raise  # the request's mistake, not the share's: one rule with /probe.json
    except HTTPException as e:
        if e.status_code == 503 and e.headers and "Retry-After" in e.headers:
            raise  # busy: ask again later, the share itself is fine
        error = e.detail
    return SharedProbeOut(**dict(share), probe=view, error=error)


# ---------------------------------------------------------------- fragments and the page's forms


@dataclass
class ProbeForm:
    """The page's state form (#probe-state), as its tokens and its Share button send it."""

    sae: str
    text: str  # as the page carries it (page_text)
    latent: str  # '' for none
    sort: SortKey
    hide: bool
    bos: bool = False


async def probe_form(sae: Annotated[str, Form()], text: Annotated[str, Form()], latent: Annotated[str, Form()] = "",
                     sort: Annotated[SortKey, Form()] = "max",
                     include_all: Annotated[bool, Form(alias="all")] = False,
                     bos: Annotated[bool, Form()] = False) -> ProbeForm:
    return ProbeForm(sae, page_text(text), latent, sort, not include_all, bos)


FormDep = Annotated[ProbeForm, Depends(probe_form)]


@router.post("/probe/tokens/{position}", include_in_schema=False)
async def read_probe_token(request: Request, position: int, probe: ProbeDep, urls: URLsDep, form: FormDep,
                           share: Annotated[str, Form()] = ""):
    """The latents of one token (the fragment a focused token asks for). The address bar takes
    the token too (replaced, not pushed: moving along the tokens with Tab is not history), and
    so does the page's state form, so that highlighting or sorting keeps the panel open."""
    try:
        view = await view_text(probe, form.sae, form.text, urls, latent=form_index(form.latent, "latent"), strict=False,
                               hide=form.hide, bos=form.bos)
        if not 0 <= position < len(view.token_views):
            raise HTTPException(404, f"the text has no token {position}")
    except HTTPException as e:
        return render(request, "_probe_error.html", status_code=e.status_code, error=e.detail)
    response = render(request, "_probe_token.html", view=view, token=view.token_views[position], oob=True,
                      frequent_percent=FREQUENT_PERCENT)
    state = view_state(view.latent, form.sort, form.hide, position, form.bos)
    # on a shared probe's page the address stays its short link
    response.headers["HX-Replace-Url"] = urls.share(share, **state) if share else urls.probe(form.sae, form.text, **state)
    return response


@router.post("/probe/share", include_in_schema=False)
async def create_share_from_page(request: Request, session: SessionDep, probe: ProbeDep, urls: URLsDep, form: FormDep,
                                 token: Annotated[str, Form()] = ""):
    """The Share button: the link as a fragment (htmx), or a redirect to it (no JavaScript)."""
    try:
        share, _ = await _share(request, session, probe, form.sae, form.text, urls)
    except HTTPException as e:
        if not is_htmx(request):
            raise
        return render(request, "_probe_error.html", status_code=e.status_code, error=e.detail)
    link = urls.share(share.id, **view_state(form_index(form.latent, "latent"), form.sort, form.hide, form_index(token, "token"),
                                             form.bos))
    if not is_htmx(request):
        return RedirectResponse(link, status_code=303)
    return render(request, "_probe_share.html", share=share, path=link, link=absolute(request, link))


# ---------------------------------------------------------------- helpers


def first_sae(options: list[SaeOption]) -> str | None:
    """The SAE a probe without one uses: the first that can be probed here (else the first)."""
    return next((o.id for o in options if not o.unavailable), options[0].id if options else None)


async def _probe_page(page: pages.PageCall, probe, urls: URLs, sae: str | None, text: str, asked: ProbeState,
                      share: ShareOut | None = None, token: int | None = None):
    request = page.request
    options = await run_in_threadpool(probe.options)
    if sae is None:
        sae = first_sae(options)
    state = view_state(asked.latent, asked.sort, asked.hide, token, asked.bos)  # kept as asked while the probe cannot run (a retry reloads it)
    view: ProbeResponse | None = None
    focus = None  # the token whose panel is open
    error, retry_after, status = None, None, 200
    shorter = None  # a text over a limit: the link that probes the part of it that fits
    if sae is not None and text:
        try:
            view = await view_text(probe, sae, text, urls, latent=asked.latent, strict=False, sort=asked.sort, bos=asked.bos,
                                   hide=asked.hide, top_n=PAGE_TOP_N)
            # a position beyond this text (an edited link) just leaves the panel closed
            focus = view.token_views[token] if token is not None and token < len(view.token_views) else None
            state = view_state(view.latent, asked.sort, asked.hide, focus.position if focus else None, asked.bos)
        except HTTPException as e:
            error = e.detail
            retry_after = (e.headers or {}).get("Retry-After")
            if isinstance(e, TooLong) and e.prefix.strip():  # offer the part that fits
                shorter = {"url": urls.probe(sae, e.prefix, **state), "limit": e.limit, "unit": e.unit}
            # a share link exists whether or not its probe can run here (the model missing, say):
            # a 200 that says why, so a link preview shows it (crawlers skip a 503), as its JSON
            # twin does; a busy probe stays a 503, to be asked again
            if share is None or retry_after:
                status = e.status_code
    page_url = urls.probe(sae, text, **state)  # an empty text drops out of the query
    address = urls.share(share.id, **state) if share else page_url  # what the address bar holds
    context = {
        "options": options, "sae": sae, "text": text, "state": state, "focus": focus, "error": error,
        "retry_after": retry_after, "shorter": shorter, "share": share, "max_chars": probe.settings.probe_max_chars,
        "max_tokens": probe.settings.probe_max_tokens,
        "frequent_percent": FREQUENT_PERCENT,
        "page_url": page_url,
        "json_url": urls.probe(sae, text, fmt="json", **state | {"token": None}) if view else None,
        "og": open_graph(view, sae, text, absolute(request, address)),
    }
    template = "_probe_result.html" if is_htmx(request) else "probe.html"
    response = page.render(view, template=template, status_code=status, **context)
    if retry_after:
        response.headers["Retry-After"] = retry_after
    if error:  # why the probe could not run is this server's moment, not the load's: not kept (app.caching)
        response.headers["Cache-Control"] = "no-store"
    return response


def open_graph(view: ProbeResponse | None, sae: str | None, text: str, url: str) -> dict:
    """Open Graph tags, so a pasted link previews with a title and a description; `url` is the
    page's whole shareable address, its view state included."""
    if not text:
        which = f"the sparse autoencoder {sae}" if sae else "a sparse autoencoder"
        return {"title": "saescope probe", "url": url,
                "description": f"Type or paste text and see which latents of {which} fire on every token, "
                               "each linked to its page; the view is a link to share."}
    excerpt = " ".join(text.split())
    excerpt = excerpt if len(excerpt) <= 60 else excerpt[:59] + "…"
    description = f"Which latents of the sparse autoencoder {sae} fire on this text"
    if view is not None:
        top = ", ".join(f"#{t.index} (max {t.max:.2f})" for t in view.top_latents[:3])
        description += f": {len(view.token_views)} tokens" + (f"; strongest latents {top}" if top else "")
    return {"title": f"“{excerpt}” · saescope probe", "description": description + ".", "url": url}


def absolute(request: Request, path: str) -> str:
    """`path` as a whole URL: at the configured public origin, else at the request's own (its
    host one that app.security allowed)."""
    origin = request.app.state.settings.public_origin or f"{request.url.scheme}://{request.url.netloc}"
    return origin + path


def page_text(text: str) -> str:
    """Text as a page carries it: a form sends newlines as CRLF, HTML reads any CR as a newline."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


async def within_share_limits(request: Request, make, session, *args):
    """`make(session, *args, before_insert)` in the thread pool, a new link counted against the
    share limits (ShareLimits, one budget for every kind of link): 429 beyond them."""
    limits: ShareLimits = request.app.state.share_limits
    client = request.client.host if request.client else "unknown"
    try:
        return await run_in_threadpool(make, session, *args, lambda: limits.take(session, client))
    except ShareLimitReached as e:
        headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
        raise HTTPException(429, str(e), headers=headers) from None


async def _share(request: Request, session, probe, sae: str, text: str, urls: URLs) -> tuple[ShareOut, bool]:
    probe.check_text(text)
    made = await within_share_limits(request, create_share, session, sae, text, urls)
    if made is None:
        raise HTTPException(404, f"no SAE {sae!r}")
    return made


async def _get_share(session, share_id: str, urls: URLs) -> ShareOut:
    share = await run_in_threadpool(get_share, session, share_id, urls)
    if share is None:
        raise HTTPException(404, f"no shared probe {share_id!r}")
    return share
