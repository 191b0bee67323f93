"""Run the web app: upgrade the database, then serve with uvicorn (one process or several).

    python -m app.server          # everything from the environment (what docker-compose runs)
"""

from __future__ import annotations

import os

import uvicorn

from app.db import upgrade
from app.main import create_app
from app.settings import Settings


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
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": 10,
        # h11 enforces a limit on the request line + headers (httptools, uvicorn's default when
        # installed, buffers any size); per request it measured no slower here.
        "http": "h11",
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
