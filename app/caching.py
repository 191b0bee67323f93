"""Caching and compression: what is loaded does not change until the next `saescope load`, so
every answer a GET gets can be named by what was loaded and asked for.

- `Caching`, a pure ASGI middleware: a GET's answer (a page, its JSON twin, an htmx part, a
  CSV) carries a strong ETag, a hash of the load stamp (each loaded SAE's and ladder's id,
  content hash and load time), the code (templates and static files), the settings and the
  request (path, query string, the htmx headers, the host); a request whose `If-None-Match`
  holds it gets a 304 without the page being read or rendered. `Cache-Control`: pages of one SAE,
  one latent, one ladder or one shared probe may be reused for `cache_max_age_s`; pages that list
  the SAEs (the index, the ladders, search, the probe's form) are revalidated every time.
- Compression: responses over 1 KB are gzipped (Starlette's GZipMiddleware, the next layer in);
  a gzipped answer's ETag ends in `-gz`, so that the two encodings never share a strong tag.
- Static files are linked under names that carry their content's hash (app.resources,
  URLs.static): `AssetFiles` serves them as immutable for a year; a plain or an outdated name is
  served too, revalidated every time.
"""

from __future__ import annotations

import hashlib
import time

import anyio
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.models import Ladder, Sae
from app.resources import STATIC_DIR, TEMPLATES_DIR, htmx_dir, unhashed_name
from app.settings import Settings

GZIP_MIN_BYTES = 1024
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
STAMP_TTL_S = 1.0  # a load shows within a second
# Pages of one thing of a load: reused for cache_max_age_s. Anything else is revalidated.
LONG_LIVED = ("/saes/", "/ladders/", "/p/")
NOT_CACHED = ("/static/", "/healthz", "/api/", "/docs", "/redoc")
VARY = b"HX-Request, HX-Target, Accept-Encoding"
GZ = "-gz"  # ends the ETag of a gzipped answer


class AssetFiles(StaticFiles):
    """Static files under their hashed names (immutable) or their plain ones (revalidated);
    `prefix` is the mount's path under /static (htmx has its own folder)."""

    def __init__(self, *, prefix: str = "", **options):
        super().__init__(**options)
        self.prefix = prefix

    async def get_response(self, path: str, scope: Scope):
        plain, current = unhashed_name(self.prefix + path)
        response = await super().get_response(plain[len(self.prefix):], scope)
        if response.status_code in (200, 304):
            response.headers["Cache-Control"] = IMMUTABLE if current else REVALIDATE
        return response


def code_stamp(settings: Settings) -> str:
    """What the answers depend on besides the load and the request: the templates, the static
    files (their hashed names appear in every page), htmx and the settings."""
    digest = hashlib.sha256(settings.model_dump_json(exclude={"admin_token"}).encode())
    for folder in (TEMPLATES_DIR, STATIC_DIR, htmx_dir()):
        for file in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if file.is_file():
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def load_stamp(engine) -> str:
    """Every loaded SAE and ladder: id, content hash, load time (a load or an unload changes it)."""
    digest = hashlib.sha256()
    with engine.connect() as connection:
        for table in (Sae, Ladder):
            for row in connection.execute(select(table.id, table.content_hash, table.created_at).order_by(table.id)):
                digest.update("\0".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()


def cache_control(path: str, max_age: int) -> str:
    if path.startswith(LONG_LIVED) and not path.endswith(("/random", "/random.json")):
        return f"public, max-age={max_age}"
    return REVALIDATE


def matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names the answer `tag` would be (weak comparison, as
    RFC 9110 has for it; either encoding's tag)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        candidate = candidate.removeprefix("W/").strip('"').removesuffix(GZ)
        if candidate == tag:
            return True
    return False


class Caching:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = GZipMiddleware(app, minimum_size=GZIP_MIN_BYTES)
        self.max_age = settings.cache_max_age_s
        self.code = code_stamp(settings)
        self.stamp: str | None = None
        self.stamped_at = -STAMP_TTL_S

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "GET" or path.startswith(NOT_CACHED) \
                or path.endswith(("/random", "/random.json")):
            if path.startswith("/static/"):
                scope, send = _gzip_tagged(scope, send)
            await self.app(scope, receive, send)
            return
        stamp = await self.load_stamp(scope)
        if stamp is None:  # no tables yet (an app before its migration): nothing to name
            await self.app(scope, receive, send)
            return
        tag = self.tag(scope, stamp)
        control = cache_control(path, self.max_age).encode()
        if matches(Headers(scope=scope).get("if-none-match"), tag):
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"etag", f'"{tag}"'.encode()), (b"cache-control", control), (b"vary", VARY)]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != b"vary"]
                names = {name.lower() for name, _ in headers}
                if not names & {b"cache-control", b"etag"}:  # an answer that says otherwise (no-store) keeps it
                    gzipped = (b"content-encoding", b"gzip") in headers
                    headers += [(b"etag", f'"{tag}{GZ if gzipped else ""}"'.encode()), (b"cache-control", control)]
                message = {**message, "headers": headers + [(b"vary", VARY)]}
            await send(message)

        await self.app(scope, receive, send_tagged)

    def tag(self, scope: Scope, stamp: str) -> str:
        headers = Headers(scope=scope)
        request = "\0".join([
            self.code, stamp, scope.get("root_path", ""), scope["path"], scope.get("query_string", b"").decode("latin-1"),
            headers.get("host", ""), headers.get("hx-request", ""), headers.get("hx-target", ""),
            headers.get("hx-history-restore-request", "")])
        return hashlib.sha256(request.encode()).hexdigest()[:32]

    async def load_stamp(self, scope: Scope) -> str | None:
        """The load stamp, read again at most once a second (in a thread: it is a query); None
        while the database cannot say (the request goes on uncached, and meets the error itself)."""
        now = time.monotonic()
        if now - self.stamped_at >= STAMP_TTL_S:
            try:
                self.stamp = await anyio.to_thread.run_sync(load_stamp, scope["app"].state.engine)
            except SQLAlchemyError:
                self.stamp = None
            self.stamped_at = now
        return self.stamp


def _gzip_tagged(scope: Scope, send: Send) -> tuple[Scope, Send]:
    """A static file's ETag (StaticFiles': one for both encodings) made the gzipped answer's own,
    and a request's If-None-Match read without the suffix, so StaticFiles still matches it."""
    scope = {**scope, "headers": [(name, value.replace(GZ.encode() + b'"', b'"') if name == b"if-none-match" else value)
                                  for name, value in scope.get("headers", [])]}

    async def send_static(message: Message) -> None:
        if message["type"] == "http.response.start" and (b"content-encoding", b"gzip") in message.get("headers", ()):
            message = {**message, "headers": [
                (name, value[:-1] + GZ.encode() + b'"' if name == b"etag" and value.endswith(b'"') else value)
                for name, value in message["headers"]]}
        await send(message)

    return scope, send_static
