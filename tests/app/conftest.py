"""Fixtures for the web app: the synthetic run folder of webrun.py, loaded into a real SQLite
file by the real loader, and an in-process client over it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for folder in (ROOT, HERE):  # `app` and `trainer` are top-level packages; webrun.py sits here
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from webrun import make_cfg, make_run  # noqa: E402

from trainer.runfolder import sae_slug  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def sae_id() -> str:
    return sae_slug(make_cfg())


@pytest.fixture(scope="session")
def database_url(tmp_path_factory, run_dir) -> str:
    """A real SQLite file, migrated and loaded once for the read-only tests."""
    from app.loader import load_run

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'saescope.db'}"
    load_run(run_dir, url)
    return url


@pytest.fixture(scope="session")
def client(database_url):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(database_url=database_url))) as test_client:
        yield test_client
