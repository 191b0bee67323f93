"""Which SAEs the probe's selector marks unavailable, checked without loading any model."""

from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants

from app import probe_availability
from app.probe_availability import model_problem


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The hub offline, with an empty local cache at tmp_path."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def cache_model(cache, repo_id: str) -> None:
    """A model's config in the hub cache's own layout: refs/main names a snapshot."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def test_a_missing_model_folder_is_unavailable(tmp_path):
    assert "not found on this server" in model_problem(str(tmp_path / "nowhere"))
    assert model_problem(str(tmp_path)) is None


def test_an_uncached_hub_model_is_unavailable_offline(offline_hub):
    reason = model_problem("some-lab/never-downloaded")
    assert "not in this server's Hugging Face cache" in reason and "HF_HUB_OFFLINE" in reason


def test_an_uncached_hub_model_is_unavailable_where_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # never resolves
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert model_problem("some-lab/never-downloaded").endswith("and hub.invalid cannot be reached from this machine")


def test_a_cached_hub_model_may_load_offline(offline_hub):
    cache_model(offline_hub, "some-lab/downloaded")
    assert model_problem("some-lab/downloaded") is None


def test_online_a_hub_model_is_not_ruled_out(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.create_server(("127.0.0.1", 0)) as hub:  # a hub this machine can reach
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        assert model_problem("some-lab/never-downloaded") is None
        assert probe_availability.hub_unreachable() is None


def test_a_hub_whose_name_resolves_but_that_does_not_answer_is_unreachable(monkeypatch):
    """A firewall: the name is known, the connection refused (or dropped, up to a short timeout)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"https://localhost:{port}")  # nothing listens there now
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert model_problem("some-lab/never-downloaded").endswith("and localhost cannot be reached from this machine")


def test_an_sae_of_a_local_model_stays_available_offline(offline_hub, tiny_db, tiny_sae_id):
    """The database keeps the model's short name ("tiny-model0"); the probe checks what the run's
    cfg.json names, the folder it loads, which no hub setting rules out."""
    from app.main import create_app
    from app.settings import Settings

    service = create_app(Settings(database_url=tiny_db)).state.probe
    [option] = service.options()
    assert option.id == tiny_sae_id and not option.model.startswith("/") and option.unavailable is None
