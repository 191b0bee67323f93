"""What every response carries and what no request may exceed.

`RequestGuard` is one pure ASGI middleware around the whole app:

- security headers on every response, error pages included: a Content-Security-Policy with no
  inline script, `X-Content-Type-Options: nosniff`, `Referrer-Policy`, and `frame-ancestors
  'none'` (the app has no embed route; one would be listed in EMBED_PATHS);
- limits: a path + query string longer than `max_url_bytes` is a 414, a body longer than
  `max_body_bytes` a 413 (by Content-Length before reading, or while streaming), a NUL byte in
  the path or query a 400 (no database stores it, and no id contains it);
- hosts: a request whose Host header names a host that `allowed_hosts` (and `public_origin`)
  do not list is a 400, so that no absolute URL is ever built from a name an attacker chose;
  `/healthz` answers any host (a load balancer's check may name the address);
- one rule for text: a query string that is not UTF-8 is a 400 that names the parameter, on every
  route (app.params; the probe's form bodies get the same rule from its routes);
- HEAD: every GET route answers it, as the GET without its body;
- a timeout: a request not answered within `request_timeout_s` is a 504 (a sync handler finishes
  in its thread, but the client gets its answer; on PostgreSQL the statement is cancelled too);
- errors never show a stack trace outside debug mode: an unhandled exception is logged and
  answered with a plain 500 page or `{"detail": "internal server error"}`.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from functools import lru_cache

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.params import ascii_int, utf8_problem
from app.render import render, wants_json
from app.settings import Settings

log = logging.getLogger("saescope.app")

# Corpus text is untrusted: even if escaping ever failed, no inline script would run. Inline
# style *attributes* stay allowed: token shading is a number in `style="--a: 0.5"`.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; connect-src 'self'; "
    "frame-ancestors {ancestors}"
)
EMBED_PATHS: tuple[str, ...] = ()  # path prefixes that other sites may frame; none today
# Swagger UI and ReDoc load their JS from a CDN and start it with an inline script: the docs
# pages exist only in debug mode, with a policy that says so. Outside debug mode those paths are
# 404s like any other, and get the strict policy too.
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "img-src 'self' data: https://fastapi.tiangolo.com; font-src https://fonts.gstatic.com; "
            "frame-ancestors 'none'")


def security_headers(path: str, debug: bool = False) -> dict[str, str]:
    embeddable = any(path.startswith(prefix) for prefix in EMBED_PATHS)
    docs = debug and path in DOCS_PATHS
    csp = DOCS_CSP if docs else CSP.format(ancestors="*" if embeddable else "'none'")
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }
    if not embeddable:
        headers["X-Frame-Options"] = "DENY"  # for browsers that predate frame-ancestors
    return headers


@lru_cache(maxsize=64)
def _raw_headers(path_kind: str, debug: bool) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.lower().encode(), value.encode())
                 for name, value in security_headers(path_kind, debug).items())


def headers_for(path: str, debug: bool) -> tuple[tuple[bytes, bytes], ...]:
    """The raw headers for a path; computed once per kind of path (docs, embeddable, other)."""
    if debug and path in DOCS_PATHS:
        return _raw_headers(path, True)
    embed = next((prefix for prefix in EMBED_PATHS if path.startswith(prefix)), None)
    return _raw_headers(embed if embed is not None else "/", False)


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """The host names requests may name: the setting's, and public_origin's."""
    hosts = [host.strip().lower().rstrip(".") for host in settings.allowed_hosts]
    if settings.public_origin:
        hosts.append(host_name(settings.public_origin.split("://", 1)[1]))
    return tuple(hosts)


def host_name(host: str) -> str:
    """The name in a Host header, without its port: 'Example.org:8000' -> 'example.org',
    '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    name = host_name(host)
    return any(pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
               for pattern in allowed)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit:,} bytes")


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.debug = settings.debug
        self.max_body = settings.max_body_bytes
        self.max_url = settings.max_url_bytes
        self.timeout = settings.request_timeout_s
        self.hosts = allowed_hosts(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        answered = False  # a 504 went out: whatever the app sends later is dropped
        head = scope["method"] == "HEAD"
        if head:  # the GET, without its body (Content-Length stays the GET's)
            scope = {**scope, "method": "GET"}

        async def send_secured(message: Message, force: bool = False) -> None:
            nonlocal started
            if answered and not force:
                return
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                secured = headers_for(scope["path"], self.debug)
                headers += [(name, value) for name, value in secured if name not in present]
                message = {**message, "headers": headers}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        rejection = self._check_request(scope)
        if rejection is not None:
            await self._error(scope, send_secured, *rejection)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # FastAPI re-raises an HTTPException met while reading the body, so the
                    # app's own handler answers it (JSON or HTML, like every other error).
                    raise BodyTooLarge(self.max_body)
            return message

        # The timeout is a timer, not a task per request (that cost more than a static file):
        # when it fires, a task answers 504 and cancels the request. A sync handler still busy
        # in its thread finishes there, unseen; the client has its answer.
        request_task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        finished = False

        async def answer_504() -> None:
            nonlocal answered
            if finished:
                return
            if not started:
                answered = True  # from here on, what the app sends is dropped

                async def send_504(message: Message) -> None:
                    await send_secured(message, force=True)

                await self._error(scope, send_504, 504, f"the server did not answer within {self.timeout:g} s")
            request_task.cancel()

        timer = loop.call_later(self.timeout, lambda: loop.create_task(answer_504()))
        try:
            await self.app(scope, limited_receive, send_secured)
        except asyncio.CancelledError:
            if not answered:
                raise  # not our timeout: the server is cancelling
        except Exception as error:
            if self.debug:
                raise
            log.error("unhandled error on %s %s\n%s", scope.get("method"), scope["path"],
                      "".join(traceback.format_exception(type(error), error, error.__traceback__)))
            if started:
                raise  # the response is half sent: let the server drop the connection
            await self._error(scope, send_secured, 500, "internal server error")
        finally:
            finished = True
            timer.cancel()

    def _check_request(self, scope: Scope) -> tuple[int, str] | None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        if len(raw_path) + len(query) > self.max_url:
            return 414, f"URL longer than {self.max_url:,} bytes"
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            return 400, "NUL bytes are not allowed in URLs"
        if (problem := utf8_problem(query, "the query parameter")) is not None:
            return 400, problem
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and scope["path"] != "/healthz" and not host_allowed(host, self.hosts):
            return 400, f"this server does not answer for the host {host[:100]!r} (see SAESCOPE_ALLOWED_HOSTS)"
        length = headers.get("content-length")
        if length is not None and ((size := ascii_int(length)) is None or size > self.max_body):
            return 413, f"request body larger than {self.max_body:,} bytes"
        return None

    async def _error(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        """The same error shapes as the app's handlers: JSON on API paths, else an HTML page."""
        request = Request(scope)
        if wants_json(request):
            response = JSONResponse({"detail": detail}, status_code=status)
        else:
            try:
                response = render(request, "error.html", status_code=status, status=status, message=detail)
            except Exception:  # even the error page failed: still no traceback
                response = PlainTextResponse(f"{status} {detail}", status_code=status)
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
