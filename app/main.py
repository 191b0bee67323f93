"""The FastAPI application: `create_app(settings)`; run with
`uvicorn app.main:create_app --factory` or `app.server.serve(...)`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.caching import AssetFiles, Caching
from app.db import make_engine, session_factory
from app.params import finite
from app.probe_service import ProbeService
from app.render import make_templates, render, wants_json
from app.resources import HTMX_PREFIX, STATIC_DIR, htmx_dir
from app.routes import admin, api_docs, features, ladders, probe, saes, search, steer
from app.security import RequestGuard
from app.settings import Settings
from app.shares import ShareLimits
from app.steering import SteerService

log = logging.getLogger("saescope.app")
ROUTERS = (saes.router, features.router, ladders.router, search.router, probe.router, steer.router, admin.router, api_docs.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.database_url, statement_timeout_s=settings.request_timeout_s,
                         pool_size=settings.db_pool_size)
    sessions = session_factory(engine)
    probe_service = ProbeService(settings, sessions)
    steer_service = SteerService(probe_service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        steer_service.close()
        probe_service.close()
        engine.dispose()

    app = FastAPI(
        title="saescope",
        summary="Browse and probe the latents of sparse autoencoders. Every page has a JSON twin at its path + .json.",
        version="1",
        debug=settings.debug,
        lifespan=lifespan,
        # Swagger UI and ReDoc need a CDN and inline script: only in debug mode (app.security).
        docs_url="/docs" if settings.debug else None,
        redoc_url="/redoc" if settings.debug else None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.probe = probe_service
    app.state.share_limits = ShareLimits(settings.share_limit_per_client, settings.share_limit_total)
    app.state.steer = steer_service
    app.state.templates = make_templates(reload=settings.debug)

    for router in ROUTERS:
        app.include_router(router)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return PlainTextResponse("ok")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # what a browser asks for by itself, on a JSON page say
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    # Third-party JS comes from npm (package.json): copied into a built package, or else read from
    # the checkout's node_modules (app.resources); the vendor mount goes before /static.
    # Both under names with their content's hash too, immutable (app.caching).
    app.mount(f"/static/{HTMX_PREFIX.rstrip('/')}", AssetFiles(directory=htmx_dir(), check_dir=False, prefix=HTMX_PREFIX),
              name="htmx")
    app.mount("/static", AssetFiles(directory=STATIC_DIR), name="static")

    _install_error_handlers(app, settings)
    # ETags, 304s, Cache-Control and gzip (app/caching.py), inside the guard.
    app.add_middleware(Caching, settings=settings)
    # Security headers, hosts, size limits, HEAD, the request timeout and the 500 page (app/security.py).
    app.add_middleware(RequestGuard, settings=settings)
    return app


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return render(request, "error.html", status_code=exc.status_code, status=exc.status_code, message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if wants_json(request):
            # finite(): a NaN or 1e309 in a JSON body is echoed back as the string JSON spells it
            return JSONResponse({"detail": finite(jsonable_encoder(exc.errors()))}, status_code=422)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        return render(request, "error.html", status_code=422, status=422, message=f"Bad request: {problems}")
    # Unhandled exceptions: RequestGuard logs them and answers a 500 without a traceback.
