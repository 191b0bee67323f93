"""docker-compose.yml: the deployment shape the design asks for (no Docker needed to check)."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_shape():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "app"}
    postgres = services["postgres"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]  # a named volume, not a host folder
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    migrate, app = services["migrate"], services["app"]
    assert migrate["command"] == ["alembic", "upgrade", "head"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "--workers" in app["command"] and "app.main:create_app" in app["command"]
    assert app["ports"]

    # configured only by variables that Settings reads
    for service in (migrate, app):
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
        for name in env:
            assert name == "DATABASE_URL" or name.removeprefix("SAESCOPE_").lower() in Settings.model_fields


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("SAESCOPE_PORT", "9001")
    monkeypatch.setenv("SAESCOPE_PROBE_MAX_CHARS", "100")
    settings = Settings()
    assert (settings.database_url, settings.port, settings.probe_max_chars) == ("sqlite:///elsewhere.db", 9001, 100)
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"
