"""docker-compose.yml and the Dockerfile: the deployment shape docs/deployment.md describes, checked by
parsing the files (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def with_defaults(value: str) -> str:
    """What compose makes of `${VAR:-default}` when VAR is not set."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def setting_name(variable: str) -> str:
    return "database_url" if variable == "DATABASE_URL" else variable.removeprefix("SAESCOPE_").lower()


def test_services_images_ports_and_health():
    file = compose()
    services = file["services"]
    assert set(services) == {"postgres", "migrate", "app"}

    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?(-\w+)?", postgres["image"])  # a pinned major version
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in file["volumes"]  # a named volume, not a host folder
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "ports" not in postgres  # the database is reachable only by the other services

    migrate, app = services["migrate"], services["app"]
    assert migrate["build"] == "." and migrate["image"] == app["image"]  # one image, built once
    assert migrate["command"] == ["alembic", "upgrade", "head"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["command"] == ["python", "-m", "app.server"]  # uvicorn, configured by Settings
    (port,) = app["ports"]
    assert with_defaults(port).split(":")[-1] == "8000" == app["environment"]["SAESCOPE_PORT"]
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    for service in (migrate, app):
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]


def test_configured_only_by_real_settings():
    services = compose()["services"]
    for name in ("migrate", "app"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
        unknown = [variable for variable in env if setting_name(variable) not in Settings.model_fields]
        assert not unknown, f"{name} sets variables that no setting reads: {unknown}"
        settings = Settings(**{setting_name(k): with_defaults(v) for k, v in env.items()})  # valid values
        assert settings.workers >= 2  # several workers
        assert settings.admin_token is None  # no default token: writes stay off until one is set
        assert settings.host == "0.0.0.0" and settings.port == 8000


def test_dockerfile_runs_the_server_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "app.server"]' in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    # The image installs the wheel (templates, static files, migrations and htmx inside the app
    # package: tests/test_install.py), built from these; alembic.ini serves the migrate service.
    for copied in ("app", "trainer", "saescope", "setup.py", "node_modules", "alembic.ini"):
        assert re.search(rf"^COPY .*\b{copied}\b", dockerfile, re.M), copied
    assert re.search(r"^RUN pip wheel .* \.$", dockerfile, re.M) and re.search(r"^RUN pip install /wheels/", dockerfile, re.M)
    assert "pip install -e" not in dockerfile


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("SAESCOPE_PORT", "9001")
    monkeypatch.setenv("SAESCOPE_PROBE_MAX_CHARS", "100")
    monkeypatch.setenv("SAESCOPE_WORKERS", "3")
    monkeypatch.setenv("SAESCOPE_MAX_BODY_BYTES", "4096")
    settings = Settings()
    assert (settings.database_url, settings.port, settings.probe_max_chars) == ("sqlite:///elsewhere.db", 9001, 100)
    assert (settings.workers, settings.max_body_bytes) == (3, 4096)
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"
    monkeypatch.setenv("SAESCOPE_WORKERS", "0")
    with pytest.raises(ValueError):
        Settings()
