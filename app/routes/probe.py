"""Probe typed text: the page (its state in the query string), its htmx fragments, share links
at /p/{id}, and the JSON API (POST /api/probe, POST /api/share, GET /p/{id}.json)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query, Request
from fastapi.routing import APIRoute
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from pydantic import AliasChoices, BaseModel, Field

from app.deps import ProbeDep, SessionDep, URLsDep
from app.probe_view import ProbeView, view_state, view_text
from app.render import is_htmx, json_response, render
from app.schemas import ErrorOut, InvalidRequestOut
from app.shares import Share, create_share, get_share
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
    """Rejects a query string or body that is not UTF-8 with a 400 that says so (Starlette would
    silently turn such bytes into U+FFFD, and FastAPI's JSON error does not name the cause)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            check_utf8(request.scope.get("query_string", b""), "the query parameter")
            content_type = request.headers.get("content-type", "")
            if request.method == "POST" and content_type.startswith("application/x-www-form-urlencoded"):
                check_utf8(await request.body(), "the form field")
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
SortKey = Literal["max", "sum"]
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                               "description": "seconds to wait before asking again: sent when the probe is busy"}}
ERRORS = {code: {"model": ErrorOut} for code in (400, 404, 413)} | {
    422: {"model": InvalidRequestOut, "description": "the text failed the probe's checks (detail a sentence) "
                                                     "or the request failed validation (detail a list)"}}
UNAVAILABLE = {503: {"model": ErrorOut, "headers": RETRY_AFTER,
                     "description": "the weights or the model are not on this server, or the probe is busy "
                                    "(then with Retry-After)"}}
BUSY = {503: {"model": ErrorOut, "headers": RETRY_AFTER, "description": "the probe is busy (with Retry-After)"}}


# ---------------------------------------------------------------- JSON shapes (OpenAPI)


class ProbeRequest(BaseModel):
    sae: str = Field(description="SAE id, as listed by /index.json")
    text: str = Field(description="text to encode: not empty, at most probe_max_chars characters and "
                                  "probe_max_tokens tokens, no control characters but tab and newlines")
    top_k: int = Field(5, ge=1, le=64, description="strongest latents reported per token")
    top_n: int = Field(20, ge=1, le=500, description="latents in the whole-text ranking")
    sort: SortKey = Field("max", description="rank the whole-text latents by their max or their sum over the tokens")
    hide_frequent_and_first: bool = Field(
        True, description=f"leave frequent latents (density > {FREQUENT_THRESHOLD:.0%}) and the first position (an "
                          "attention sink, left out by the harvest too) out of the whole-text ranking",
        # the key's name from before "dense" meant only evaluation's 10 %: older clients still get what they ask
        validation_alias=AliasChoices("hide_frequent_and_first", "hide_dense_and_first"))


class ProbeLatent(BaseModel):
    index: int
    activation: float


class ProbeTokenOut(BaseModel):
    position: int
    token: str = Field(description="the token's text, leading spaces and newlines kept")
    token_id: int
    top_latents: list[ProbeLatent] = Field(description="up to top_k latents firing on this token, strongest first")


class TextLatentOut(BaseModel):
    index: int
    max: float = Field(description="its largest activation over the counted tokens")
    sum: float = Field(description="its activations summed over the counted tokens")
    n_tokens: int = Field(description="counted tokens it fires on")
    density: float = Field(description="share of harvested tokens it fires on")
    max_activation: float = Field(description="its largest activation in the harvest")
    explanation: str | None = Field(description="its automatic explanation (a token pattern, ⟦ ⟧ marking the token "
                                                "it fires on), or null when the harvest found none")
    explanation_f1: float | None = Field(description="that explanation's F1 on held-out contexts (null: not scored)")
    url: str


class HighlightOut(BaseModel):
    index: int
    activations: list[float] = Field(description="its activation on every token of the text, 0 where it does not fire")
    max_activation: float = Field(description="its largest activation in the harvest")
    density: float
    url: str


class ProbeResponse(BaseModel):
    sae: str
    text: str
    n_tokens: int
    tokens: list[ProbeTokenOut]
    top_latents: list[TextLatentOut] = Field(description="latents most active over the whole text")
    sort: SortKey
    hide_frequent_and_first: bool
    excluded_positions: list[int] = Field(description="positions left out of top_latents")
    frequent_density: float = Field(description="density above which a latent counts as frequent (left out by "
                                                "hide_frequent_and_first)")
    highlighted: HighlightOut | None = Field(None, description="the latent the query string's latent= names, over the text")
    url: str = Field(description="the probe page showing this result")


class ShareRequest(BaseModel):
    sae: str = Field(description="SAE id")
    text: str = Field(description="the probed text (the same limits as POST /api/probe)")


class ShareOut(BaseModel):
    id: str = Field(description="derived from a hash of the SAE id and the text: sharing twice gives the same id")
    sae: str
    text: str
    created_at: str
    sae_changed: bool = Field(description="the SAE was reloaded with other weights since the link was made")
    url: str = Field(description="the short link: /p/{id}")
    json_url: str


class SharedProbeOut(ShareOut):
    probe: ProbeResponse | None = Field(description="the probe of the shared text (null when it cannot run here)")
    error: str | None = Field(description="why the probe cannot run here, if it cannot")


# ---------------------------------------------------------------- JSON API


@router.post("/api/probe", response_model=ProbeResponse, summary="Latents of every token of a text",
             responses=ERRORS | UNAVAILABLE)
async def create_probe(body: ProbeRequest, probe: ProbeDep, urls: URLsDep):
    """Tokens (text and id), each token's strongest latents, and the latents most active over the
    whole text. Errors: 422 empty text, control characters or a lone surrogate; 413 over the
    character or token limit (the message gives it); 404 unknown SAE; 503 weights or model not on
    this server, or the probe busy (with Retry-After)."""
    began = time.perf_counter()
    view = await view_text(probe, body.sae, body.text, top_k=body.top_k, top_n=body.top_n, sort=body.sort,
                            hide=body.hide_frequent_and_first)
    response = json_response(view.as_json(urls))
    # the server's own time for this probe, queueing included (bench/probe_latency.py reads it)
    response.headers["Server-Timing"] = f"probe;dur={(time.perf_counter() - began) * 1000:.2f}"
    return response


@router.get("/probe.json", response_model=ProbeResponse, summary="The probe page's JSON twin",
            responses=ERRORS | UNAVAILABLE)
async def read_probe_json(probe: ProbeDep, urls: URLsDep, sae: str, text: str,
                          sort: SortKey = "max", include_all: Annotated[bool, Query(alias="all")] = False,
                          latent: Annotated[int | None, Query(ge=0)] = None,
                          top_k: Annotated[int, Query(ge=1, le=64)] = 5, top_n: Annotated[int, Query(ge=1, le=500)] = 20):
    """The same query string as /probe gives the same probe, as POST /api/probe shapes it."""
    view = await view_text(probe, sae, text, latent=latent, top_k=top_k, top_n=top_n, sort=sort, hide=not include_all)
    return json_response(view.as_json(urls))


@router.post("/api/share", response_model=ShareOut, status_code=201, summary="Share a probe as a short permanent link",
             responses=ERRORS | {200: {"model": ShareOut, "description": "the link existed already"}})
async def create_share_link(body: ShareRequest, session: SessionDep, probe: ProbeDep, urls: URLsDep):
    """Stores the SAE id and the text under an id derived from their hash: 201 when new, 200 with
    the same link when this probe was shared before. /p/{id} opens it, /p/{id}.json gives it."""
    share, created = await _share(session, probe, body.sae, body.text)
    return json_response(share.as_json(urls), status_code=201 if created else 200)


@router.get("/p/{share_id}.json", response_model=SharedProbeOut, summary="A shared probe",
            responses={code: {"model": ErrorOut} for code in (400, 404)} | BUSY)
async def read_share_json(share_id: str, session: SessionDep, probe: ProbeDep, urls: URLsDep,
                          sort: SortKey = "max", include_all: Annotated[bool, Query(alias="all")] = False,
                          latent: Annotated[int | None, Query(ge=0)] = None):
    """The stored text and its probe now (null with `error` when the model is not on this server;
    503 with Retry-After when the probe is busy)."""
    share = await _get_share(session, share_id)
    data, error = None, None
    try:
        view = await view_text(probe, share.sae, share.text, latent=latent, sort=sort, hide=not include_all)
        data = view.as_json(urls)
    except HTTPException as e:
        if e.status_code == 503 and e.headers and "Retry-After" in e.headers:
            raise  # busy: ask again later, the share itself is fine
        error = e.detail
    return json_response(share.as_json(urls) | {"probe": data, "error": error})


# ---------------------------------------------------------------- pages and fragments


FREQUENT_PERCENT = f"{FREQUENT_THRESHOLD * 100:g} %"


@router.get("/probe", include_in_schema=False)
async def read_probe(request: Request, probe: ProbeDep, sae: str | None = None, text: str | None = None,
                     latent: str = "", sort: SortKey = "max", include_all: Annotated[bool, Query(alias="all")] = False,
                     token: str = ""):
    return await _probe_page(request, probe, sae, page_text(text or ""), _index(latent, "latent"), sort,
                             not include_all, token=_index(token, "token"))


@router.get("/p/{share_id}", include_in_schema=False)
async def read_share(request: Request, share_id: str, session: SessionDep, probe: ProbeDep,
                     latent: str = "", sort: SortKey = "max", include_all: Annotated[bool, Query(alias="all")] = False,
                     token: str = ""):
    share = await _get_share(session, share_id)
    return await _probe_page(request, probe, share.sae, page_text(share.text), _index(latent, "latent"), sort,
                             not include_all, share=share, token=_index(token, "token"))


@router.post("/probe/tokens/{position}", include_in_schema=False)
async def read_probe_token(request: Request, position: int, probe: ProbeDep, sae: Annotated[str, Form()],
                           text: Annotated[str, Form()], latent: Annotated[str, Form()] = "",
                           sort: Annotated[SortKey, Form()] = "max",
                           include_all: Annotated[bool, Form(alias="all")] = False,
                           share: Annotated[str, Form()] = ""):
    """The latents of one token (the fragment a focused token asks for). The address bar takes
    the token too (replaced, not pushed: moving along the tokens with Tab is not history), and
    so does the page's state form, so that highlighting or sorting keeps the panel open."""
    text, hide = page_text(text), not include_all
    try:
        view = await view_text(probe, sae, text, latent=_index(latent, "latent"), strict=False, hide=hide)
        if not 0 <= position < len(view.tokens):
            raise HTTPException(404, f"the text has no token {position}")
    except HTTPException as e:
        return render(request, "_probe_error.html", status_code=e.status_code, error=e.detail)
    response = render(request, "_probe_token.html", view=view, token=view.tokens[position], oob=True,
                      frequent_percent=FREQUENT_PERCENT)
    urls = URLs(request.scope.get("root_path", ""))
    state = view_state(view.latent, sort, hide, position)
    # on a shared probe's page the address stays its short link
    response.headers["HX-Replace-Url"] = urls.share(share, **state) if share else urls.probe(sae, text, **state)
    return response


@router.post("/probe/share", include_in_schema=False)
async def create_share_from_page(request: Request, session: SessionDep, probe: ProbeDep, sae: Annotated[str, Form()],
                                 text: Annotated[str, Form()], latent: Annotated[str, Form()] = "",
                                 sort: Annotated[SortKey, Form()] = "max",
                                 include_all: Annotated[bool, Form(alias="all")] = False,
                                 token: Annotated[str, Form()] = ""):
    """The Share button: the link as a fragment (htmx), or a redirect to it (no JavaScript)."""
    urls = URLs(request.scope.get("root_path", ""))
    try:
        share, _ = await _share(session, probe, sae, page_text(text))
    except HTTPException as e:
        if not is_htmx(request):
            raise
        return render(request, "_probe_error.html", status_code=e.status_code, error=e.detail)
    link = urls.share(share.id, **view_state(_index(latent, "latent"), sort, not include_all, _index(token, "token")))
    if not is_htmx(request):
        return RedirectResponse(link, status_code=303)
    return render(request, "_probe_share.html", share=share, link=absolute(request, link))


# ---------------------------------------------------------------- helpers


async def _probe_page(request: Request, probe, sae: str | None, text: str, latent: int | None, sort: SortKey,
                      hide: bool, share: Share | None = None, token: int | None = None):
    options = await run_in_threadpool(probe.options)
    if sae is None:
        sae = next((o.id for o in options if not o.unavailable), options[0].id if options else None)
    urls = URLs(request.scope.get("root_path", ""))
    state = view_state(latent, sort, hide, token)  # kept as asked while the probe cannot run (a retry reloads it)
    view: ProbeView | None = None
    focus = None  # the token whose panel is open
    error, retry_after, status = None, None, 200
    if sae is not None and text:
        try:
            view = await view_text(probe, sae, text, latent=latent, strict=False, sort=sort, hide=hide, top_n=PAGE_TOP_N)
            # a position beyond this text (an edited link) just leaves the panel closed
            focus = view.tokens[token] if token is not None and token < len(view.tokens) else None
            state = view_state(view.latent, sort, hide, focus.position if focus else None)
        except HTTPException as e:
            error = e.detail
            retry_after = (e.headers or {}).get("Retry-After")
            # a share link exists whether or not its probe can run here (the model missing, say):
            # a 200 that says why, so a link preview shows it (crawlers skip a 503), as its JSON
            # twin does; a busy probe stays a 503, to be asked again
            if share is None or retry_after:
                status = e.status_code
    page_url = urls.probe(sae, text, **state)  # an empty text drops out of the query
    address = urls.share(share.id, **state) if share else page_url  # what the address bar holds
    context = {
        "options": options, "sae": sae, "text": text, "state": state, "view": view, "focus": focus, "error": error,
        "retry_after": retry_after, "share": share, "max_chars": probe.settings.probe_max_chars,
        "max_tokens": probe.settings.probe_max_tokens,
        "frequent_percent": FREQUENT_PERCENT,
        "page_url": page_url,
        "json_url": urls.probe(sae, text, fmt="json", **state | {"token": None}) if view else None,
        "og": open_graph(view, sae, text, absolute(request, address)),
    }
    template = "_probe_result.html" if is_htmx(request) else "probe.html"
    headers = {"Retry-After": retry_after} if retry_after else None
    response = render(request, template, status_code=status, **context)
    if headers:
        response.headers.update(headers)
    return response


def open_graph(view: ProbeView | None, sae: str | None, text: str, url: str) -> dict:
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
        top = ", ".join(f"#{t.latent.index} (max {t.max:.2f})" for t in view.text_latents[:3])
        description += f": {len(view.tokens)} tokens" + (f"; strongest latents {top}" if top else "")
    return {"title": f"“{excerpt}” · saescope probe", "description": description + ".", "url": url}


def absolute(request: Request, path: str) -> str:
    return f"{request.url.scheme}://{request.url.netloc}{path}"


def page_text(text: str) -> str:
    """Text as a page carries it: a form sends newlines as CRLF, HTML reads any CR as a newline."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_utf8(encoded: bytes, what: str) -> None:
    """Each value of a query string or form body decodes as UTF-8, or a 400 names it."""
    for pair in encoded.split(b"&"):
        try:
            unquote_to_bytes(pair.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            name = unquote_to_bytes(pair.split(b"=", 1)[0]).decode("utf-8", "replace")
            raise HTTPException(400, f"{what} {name!r} is not valid UTF-8") from None


def _index(value: str, what: str) -> int | None:
    """The highlighted latent or the open token from the query string or a form ('' clears it)."""
    if value.strip() == "":
        return None
    if not value.strip().isdigit():
        raise HTTPException(422, f"{what} must be a {what} index, got {value!r}")
    return int(value)


async def _share(session, probe, sae: str, text: str) -> tuple[Share, bool]:
    probe.check_text(text)
    made = await run_in_threadpool(create_share, session, sae, text)
    if made is None:
        raise HTTPException(404, f"no SAE {sae!r}")
    return made


async def _get_share(session, share_id: str) -> Share:
    share = await run_in_threadpool(get_share, session, share_id)
    if share is None:
        raise HTTPException(404, f"no shared probe {share_id!r}")
    return share
