"""The same migrations, loader and pages on the real PostgreSQL, in a throwaway schema.

Skipped when no server answers at SAESCOPE_TEST_POSTGRES (default: the local test database).
"""

from __future__ import annotations

import os
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from webrun import N_LATENTS

from app.loader import load_run
from app.main import create_app
from app.settings import Settings

BASE_URL = os.environ.get("SAESCOPE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url():
    admin = create_engine(BASE_URL, connect_args={"connect_timeout": 3})
    schema = f"saescope_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as e:
        admin.dispose()
        pytest.fail(
            f"no PostgreSQL at {BASE_URL}: {e.orig}; start it with "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )
    try:
        # Every connection of the app and of Alembic lands in the throwaway schema; the '%' in
        # the URL also checks that the Alembic config escapes it.
        yield f"{BASE_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_load_and_read_on_postgres(postgres_url, run_dir, sae_id):
    assert load_run(run_dir, postgres_url) == sae_id
    assert load_run(run_dir, postgres_url) == sae_id  # idempotent here too
    with TestClient(create_app(Settings(database_url=postgres_url))) as client:
        assert [sae["id"] for sae in client.get("/index.json").json()["saes"]] == [sae_id]
        page = client.get(f"/saes/{sae_id}.json", params={"sort": "max_activation", "per_page": 500}).json()
        assert page["total"] == N_LATENTS
        maxes = [latent["max_activation"] for latent in page["latents"]]
        assert maxes == sorted(maxes, reverse=True)
        feature = client.get(f"/saes/{sae_id}/features/0.json").json()
        assert feature["top_examples"][0]["tokens"][2:5] == ["<script>", "alert(1)", "</script>"]
        html = client.get(f"/saes/{sae_id}/features/0").text
        assert "&lt;script&gt;" in html and "<script>alert" not in html
