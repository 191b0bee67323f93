"""Fixtures for the web app: the synthetic run folder of webrun.py, loaded by the real loader into
each backend the app supports, and an in-process client over it (`synthetic_sae_id`,
`database_url`, `synthetic_client`; tests/conftest.py's `tiny_*` fixtures are the tiny real model's
run instead).

Every test that takes `database_url` or `synthetic_client` (or `empty_url`) runs twice: on a real
SQLite file and on the real PostgreSQL (SAESCOPE_TEST_POSTGRES, by default the local server's `test`
database), each in a schema of its own that is dropped afterwards (databases.py); the PostgreSQL
case is marked `postgresql` (tests/tiers.py). No PostgreSQL is a failure, not a skip: `.ci/run`
starts it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.databases import BACKENDS, empty_database, postgres_schema
from tests.app.servers import chromium
from tests.app.webrun import make_cfg, make_run


@pytest.fixture
def postgres_url():
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def empty_url(request, tmp_path):
    """An empty database (no tables yet) of each backend."""
    with empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def empty_url_module(request, tmp_path_factory):
    """An empty database of each backend, for one test module."""
    with empty_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """The synthetic run folder (webrun.make_run)."""
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def synthetic_sae_id() -> str:
    """The synthetic run's SAE id in the database."""
    return make_cfg().slug


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request, tmp_path_factory, run_dir) -> str:
    """A real database of each backend, migrated and loaded once for the read-only tests."""
    from app.loader import load_run

    with empty_database(request.param, tmp_path_factory.mktemp("db")) as url:
        load_run(run_dir, url)
        yield url


@pytest.fixture(scope="session")
def synthetic_client(database_url):
    """The app in-process over the synthetic run, on each backend."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(database_url=database_url))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def browser():
    """Chromium for one test module (servers.chromium)."""
    with chromium() as browser:
        yield browser
