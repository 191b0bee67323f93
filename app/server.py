"""Run the web app: upgrade the database, then serve with uvicorn."""

from __future__ import annotations

import uvicorn

from app.db import upgrade
from app.main import create_app
from app.settings import Settings


def serve(database_url: str | None = None, host: str | None = None, port: int | None = None,
          *, debug: bool | None = None) -> None:
    """Migrate the database at `database_url` to the latest schema and serve the app (blocks).

    Arguments left as None come from Settings (env DATABASE_URL, SAESCOPE_HOST, SAESCOPE_PORT,
    SAESCOPE_DEBUG). One process; for several workers run
    `uvicorn app.main:create_app --factory --workers N` with the same environment.
    """
    overrides = {"database_url": database_url, "host": host, "port": port, "debug": debug}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    upgrade(settings.database_url)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
