"""The FastAPI application: `create_app(settings)`; run with
`uvicorn app.main:create_app --factory` or `app.server.serve(...)`."""

from __future__ import annotations

import logging
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import ROOT, make_engine, session_factory
from app.probe import ProbeService
from app.render import make_templates, render
from app.routes import features, probe, saes
from app.settings import Settings

log = logging.getLogger("saescope.app")

# Corpus text is untrusted: even if escaping ever failed, no inline script would run.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)

DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.database_url)
    sessions = session_factory(engine)
    probe_service = ProbeService(settings, sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        probe_service.close()
        engine.dispose()

    app = FastAPI(
        title="saescope",
        summary="Browse and probe the latents of sparse autoencoders. Every page has a JSON twin at its path + .json.",
        version="1",
        debug=settings.debug,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.probe = probe_service
    app.state.templates = make_templates()

    for router in (saes.router, features.router, probe.router):
        app.include_router(router)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return PlainTextResponse("ok")

    # Third-party JS comes from npm (package.json); the vendor mount goes before /static.
    app.mount("/static/vendor/htmx.org",
              StaticFiles(directory=ROOT / "node_modules" / "htmx.org" / "dist", check_dir=False), name="htmx")
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")

    _install_error_handlers(app, settings)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path not in DOCS_PATHS:  # FastAPI's Swagger/ReDoc pages load their JS from a CDN
            response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    return app


def wants_json(request: Request) -> bool:
    path = request.url.path
    return path.endswith(".json") or path.startswith("/api/")


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return render(request, "error.html", status_code=exc.status_code, status=exc.status_code, message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if wants_json(request):
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        return render(request, "error.html", status_code=422, status=422, message=f"Bad request: {problems}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        # Only reached when debug is off (Starlette shows its traceback page when it is on).
        log.error("unhandled error on %s\n%s", request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        detail = "internal server error"
        if wants_json(request):
            return JSONResponse({"detail": detail}, status_code=500)
        return render(request, "error.html", status_code=500, status=500, message=detail)
