"""The two backends the tests run on: a SQLite file, or a throwaway schema of the real PostgreSQL
(SAESCOPE_TEST_POSTGRES, by default the local server's `test` database)."""

from __future__ import annotations

import functools
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tiers import cleaning_up

POSTGRES = os.environ.get("SAESCOPE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SCHEMA_PREFIX = "saescope_test_"
# Parametrize with these (a fixture's params, or @pytest.mark.parametrize): the PostgreSQL case carries
# the `postgresql` marker, so that `make test-fast` leaves it out (tests/tiers.py).
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


def _admin_engine():
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(POSTGRES, connect_args={"connect_timeout": 3}, poolclass=NullPool)


@contextmanager
def postgres_schema():
    """A URL whose every connection (the app's, the loader's, Alembic's) lands in a new, empty
    schema; the schema is dropped on exit. The '%' in the URL also checks that the Alembic
    config escapes it."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    _drop_abandoned_schemas_once()
    admin = _admin_engine()
    schema = f"{SCHEMA_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as e:
        admin.dispose()
        pytest.fail(
            f"no PostgreSQL at {POSTGRES}: {e.orig}; start it with "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with cleaning_up(), admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@functools.cache
def _drop_abandoned_schemas_once() -> None:
    """Before a test session's first schema (not at its start: a session may not use PostgreSQL)."""
    drop_abandoned_schemas()


def drop_abandoned_schemas() -> None:
    """Schemas left by a test process that was killed (its pid is gone); others' stay."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    admin = _admin_engine()
    try:
        with admin.begin() as conn:
            names = conn.execute(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :p"),
                                 {"p": SCHEMA_PREFIX + "%"}).scalars().all()
            for name in names:
                pid = name.removeprefix(SCHEMA_PREFIX).split("_")[0]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    except OperationalError:
        pass  # reported by the first test that needs the server
    finally:
        admin.dispose()


@contextmanager
def empty_database(backend: str, folder: Path):
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'saescope.db'}"
    else:
        with postgres_schema() as url:
            yield url
