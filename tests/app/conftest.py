"""Fixtures for the web app: the synthetic run folder of webrun.py, loaded by the real loader into
each backend the app supports, and an in-process client over it.

Every test that takes `database_url` or `client` (or `empty_url`) runs twice: on a real SQLite
file and on the real PostgreSQL (SAESCOPE_TEST_POSTGRES, by default the local server's `test`
database), each in a schema of its own that is dropped afterwards. No PostgreSQL is a failure,
not a skip: `.ci/run` starts it.
"""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for folder in (ROOT, HERE):  # `app` and `trainer` are top-level packages; webrun.py sits here
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from webrun import make_cfg, make_run  # noqa: E402

from trainer.runfolder import sae_slug  # noqa: E402

POSTGRES = os.environ.get("SAESCOPE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SCHEMA_PREFIX = "saescope_test_"
BACKENDS = ["sqlite", "postgresql"]


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
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def _drop_abandoned_schemas() -> None:
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


def pytest_sessionstart(session):
    _drop_abandoned_schemas()


@contextmanager
def empty_database(backend: str, folder: Path):
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'saescope.db'}"
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
def postgres_url():
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def empty_url(request, tmp_path):
    """An empty database (no tables yet) of each backend."""
    with empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def sae_id() -> str:
    return sae_slug(make_cfg())


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request, tmp_path_factory, run_dir) -> str:
    """A real database of each backend, migrated and loaded once for the read-only tests."""
    from app.loader import load_run

    with empty_database(request.param, tmp_path_factory.mktemp("db")) as url:
        load_run(run_dir, url)
        yield url


@pytest.fixture(scope="session")
def client(database_url):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(database_url=database_url))) as test_client:
        yield test_client
