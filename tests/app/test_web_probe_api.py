"""The probe's input checks, which answer before any model is loaded (real model tests live
with the trainer's tiny model)."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from app.loader import load_run
from app.main import create_app
from app.settings import Settings


def test_empty_text_is_422(client, sae_id):
    for text in ("", "  \n\t "):
        response = client.post("/api/probe", json={"sae": sae_id, "text": text})
        assert response.status_code == 422 and response.json() == {"detail": "text must not be empty"}


def test_too_long_text_is_413_naming_the_limit(client, sae_id):
    response = client.post("/api/probe", json={"sae": sae_id, "text": "x" * 4001})
    assert response.status_code == 413 and "4000" in response.json()["detail"]


def test_unknown_sae_is_404(client):
    response = client.post("/api/probe", json={"sae": "no-such-sae", "text": "hello"})
    assert response.status_code == 404 and "no-such-sae" in response.json()["detail"]


@pytest.mark.parametrize("body", [{"text": "hi"}, {"sae": "x", "text": "hi", "top_k": 0}, {"sae": "x", "text": "hi", "top_k": 65}])
def test_malformed_request_is_422(client, body):
    assert client.post("/api/probe", json=body).status_code == 422


def test_missing_weights_is_503(tmp_path, run_dir, sae_id):
    moved = tmp_path / "moved-run"
    shutil.copytree(run_dir, moved)
    url = f"sqlite:///{tmp_path / 'probe.db'}"
    load_run(moved, url)
    (moved / "sae.safetensors").unlink()  # the database outlived the run folder
    with TestClient(create_app(Settings(database_url=url))) as client:
        response = client.post("/api/probe", json={"sae": sae_id, "text": "hello"})
        assert response.status_code == 503 and "not available on this server" in response.json()["detail"]
        page = client.get("/probe", params={"sae": sae_id, "text": "hello"})
        assert page.status_code == 503 and "not available on this server" in page.text
