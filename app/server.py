"""Run the web app: upgrade the database, then serve with uvicorn (one process or several).

    python -m app.server          # everything from the environment (what docker-compose runs)
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import cache

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.db import upgrade
from app.main import create_app
from app.security import headers_for
from app.settings import Settings

log = logging.getLogger("saescope.app")


@cache
def header_timeout_s() -> float:
    """Read once per process from the environment: uvicorn imports the protocol class by name in
    each worker process, where the app too builds its Settings from the environment."""
    return Settings().header_timeout_s


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request head (slowloris).

    uvicorn bounds a connection's idle time only after a response (timeout_keep_alive), and a
    single byte cancels even that: a client that opens connections and trickles its headers
    would hold each one, and with them the limit_concurrency slots, forever. Here, whenever the
    connection waits for a request line and headers (from connection_made, and again after each
    response on a keep-alive connection), a timer runs that closes it unless the whole head has
    arrived within `header_timeout_s`. More bytes do not restart it; a parsed head stops it, so
    a slow body or a slow handler is left to the request timeout (app.security).
    """

    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own 503 past limit_concurrency bypasses the app, so it would go out without
        # the security headers every response carries: the same check runs in front of the app.
        self._limit, self.limit_concurrency = self.limit_concurrency, None
        self._app, self.app = self.app, self._app_within_limit

    async def _app_within_limit(self, scope, receive, send) -> None:
        # uvicorn counted tasks before adding this request's; here it is among them.
        if self._limit is not None and (len(self.connections) >= self._limit or len(self.tasks) > self._limit):
            log.warning("over the concurrency limit (%d): 503", self._limit)
            await over_limit(scope, send)
        else:
            await self._app(scope, receive, send)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_for_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_for_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next cycle and parse a pipelined head
        self._watch_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _watch_for_head(self) -> None:
        # h11 leaves the client's state IDLE until a complete request head has been parsed.
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._stop_header_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(header_timeout_s(), self._head_too_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_too_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        log.debug("closing a connection from %s: no complete request head within %g s", self.client, header_timeout_s())
        self.conn.send(h11.ConnectionClosed())  # as uvicorn's keep-alive timeout closes one
        self.transport.close()


async def over_limit(scope, send) -> None:
    """503 with the security headers, a Retry-After, and the connection closed (as uvicorn's)."""
    headers = [*headers_for(scope["path"], False)]  # what the app adds to every response
    body = b"Service Unavailable: too many connections, try again shortly"
    headers += [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(database_url: str | None = None, host: str | None = None, port: int | None = None,
          *, debug: bool | None = None, workers: int | None = None) -> None:
    """Migrate the database at `database_url` to the latest schema and serve the app (blocks).

    Arguments left as None come from Settings (env DATABASE_URL, SAESCOPE_HOST, SAESCOPE_PORT,
    SAESCOPE_DEBUG, SAESCOPE_WORKERS, ...). With several workers each process builds its own app
    from the environment, so the arguments given here are passed on through it.
    """
    overrides = {"database_url": database_url, "host": host, "port": port, "debug": debug, "workers": workers}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**overrides)
    upgrade(settings.database_url)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.public_origin is None:
        log.warning("listening on %s, but only requests naming one of the hosts %s are answered (400 otherwise): "
                    "set SAESCOPE_PUBLIC_ORIGIN (and SAESCOPE_ALLOWED_HOSTS) to the address people use",
                    settings.host, ", ".join(settings.allowed_hosts))
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        # Over the limit uvicorn answers 503; the header timeout keeps slow clients from filling it.
        "limit_concurrency": settings.limit_concurrency,
        "timeout_graceful_shutdown": 10,
        # h11 enforces a limit on the request line + headers (httptools, uvicorn's default when
        # installed, buffers any size); per request it measured no slower here. Named by import
        # path, not passed as a class: worker processes import it, and so does `python -m`.
        "http": "app.server:HeaderTimeoutProtocol",
        "h11_max_incomplete_event_size": settings.max_url_bytes + 16_384,
        "server_header": False,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    for name, value in overrides.items():
        os.environ["DATABASE_URL" if name == "database_url" else f"SAESCOPE_{name.upper()}"] = str(value)
    uvicorn.run("app.main:create_app", factory=True, workers=settings.workers, **options)


if __name__ == "__main__":
    serve()
