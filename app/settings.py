"""One Settings object, read by the app, the server and `migrations/env.py`.

Every field comes from an environment variable: `DATABASE_URL` for the database (the name every
deployment tool expects), `SAESCOPE_<FIELD>` for the rest (e.g. `SAESCOPE_PORT=8080`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAESCOPE_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///saescope.db",
        validation_alias=AliasChoices("DATABASE_URL", "SAESCOPE_DATABASE_URL", "database_url"),
        description="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user@host/db.",
    )
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the server listens on (0: any free port).")
    debug: bool = Field(False, description="Show stack traces on errors (never in production).")

    probe_max_chars: int = Field(4000, description="Longest text the probe accepts (characters).")
    probe_max_tokens: int = Field(512, description="Longest text the probe accepts (tokens).")
    probe_workers: int = Field(1, ge=1, description="Threads that run probe inference at once (more: several SAEs' probes at once).")
    probe_max_pending: int = Field(16, description="Probes queued or running before answering 503.")
    probe_batch: int = Field(8, ge=1, description="Queued probes of one SAE that a worker runs as one forward pass.")
    probe_threads: int | None = Field(
        None, description="torch threads per probe worker (default: CPU cores / probe_workers).")
    probe_cache_size: int = Field(256, description="Probe results kept in memory, by SAE and text.")
    probe_preload: bool = Field(
        False, description="Load every SAE's model at start-up instead of on its first probe.")
    steer_max_pending: int = Field(
        4, ge=1, description="Steerings (two generations each) running or waiting before answering 503; they "
        "run one at a time.")
    runs_root: Path | None = Field(
        None,
        description="Folder holding run folders on this server, used when the path recorded at "
        "load time does not exist here (e.g. inside a container).",
    )

    # ---- shared deployment: writes, limits, timeouts, workers
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token that every write route (e.g. DELETE /api/saes/{id}) requires; at least "
        "16 characters. No default: without one the write routes are off (403).",
    )
    workers: int = Field(1, ge=1, le=64, description="Server processes (uvicorn workers) for `saescope serve`.")
    max_body_bytes: int = Field(65_536, ge=1024, description="Largest request body accepted (413 above).")
    max_url_bytes: int = Field(
        65_536, ge=1024, description="Longest request path + query string accepted (414 above); room for "
        "a probe link of probe_max_chars characters.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request not answered by then gets a 504; on PostgreSQL each SQL statement "
        "of the web app is also cancelled after this long.")
    keep_alive_timeout_s: int = Field(5, ge=1, description="Idle keep-alive connections are closed after this.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request line and headers have not all arrived this long after "
        "it opened (or after its previous response) is closed: a slow client cannot hold it open.")
    # At least 2: uvicorn counts the asking connection itself, so a limit of 1 would refuse everything.
    limit_concurrency: int = Field(
        200, ge=2, description="Open connections (or running requests) per server process above which a new "
        "request gets a 503. Each process counts its own: with several workers the limit is per worker.")
    db_pool_size: int = Field(8, ge=1, description="Database connections kept per server process, and as many more at once.")

    # ---- origins, caching, share links
    public_origin: str | None = Field(
        None, description="The origin people reach the server at (https://saescope.example.org): absolute URLs (a "
        "share link, og:url) are built from it, and its host is allowed. Without one they use the request's "
        "own host, which must then be one of allowed_hosts.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        ["localhost", "127.0.0.1", "::1", "testserver"],
        description="Host names a request may name in its Host header (400 otherwise), besides public_origin's; "
        "'*.example.org' allows its subdomains, '*' any host. The default allows only this machine (and the name "
        "Starlette's in-process test client sends). Comma-separated in the environment.")
    cache_max_age_s: int = Field(
        3600, ge=0, description="How long a browser or proxy may reuse a page of loaded data (a latent's page, a "
        "probe) without asking again; pages that list SAEs are always revalidated. Every page carries an ETag "
        "of the load, so asking again costs a 304.")
    share_limit_per_client: int = Field(
        60, ge=0, description="New share links one client address may create per hour, per server process (429 "
        "above).")
    share_limit_total: int = Field(
        100_000, ge=0, description="Share links stored in all; beyond it no new link is made (429).")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):  # SAESCOPE_ALLOWED_HOSTS=a.org,b.org (or a JSON list)
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @field_validator("public_origin", mode="before")
    @classmethod
    def _origin(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(str(value).strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
            raise ValueError("public_origin is a scheme and a host, e.g. https://saescope.example.org")
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("admin_token", mode="before")
    @classmethod
    def _no_blank_or_short_token(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # SAESCOPE_ADMIN_TOKEN= (empty, as docker-compose passes an unset one): writes off
        secret = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if len(secret) < 16:
            raise ValueError("admin_token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value
