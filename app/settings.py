"""One Settings object, read by the app, the server and `migrations/env.py`.

Every field comes from an environment variable: `DATABASE_URL` for the database (the name every
deployment tool expects), `SAESCOPE_<FIELD>` for the rest (e.g. `SAESCOPE_PORT=8080`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAESCOPE_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///saescope.db",
        validation_alias=AliasChoices("DATABASE_URL", "SAESCOPE_DATABASE_URL", "database_url"),
        description="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user@host/db.",
    )
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(8000, description="Port the server listens on.")
    debug: bool = Field(False, description="Show stack traces on errors (never in production).")

    probe_max_chars: int = Field(4000, description="Longest text the probe accepts (characters).")
    probe_max_tokens: int = Field(512, description="Tokens of a probed text that are shown.")
    probe_workers: int = Field(2, description="Threads that run probe inference at once.")
    probe_max_pending: int = Field(16, description="Probes queued or running before answering 503.")
    runs_root: Path | None = Field(
        None,
        description="Folder holding run folders on this server, used when the path recorded at "
        "load time does not exist here (e.g. inside a container).",
    )
