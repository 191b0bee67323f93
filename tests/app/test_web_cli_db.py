"""`saescope load` and `saescope serve` default to the database the server's Settings would use:
the same variables, the same precedence, the same default."""

from __future__ import annotations

import os

import pytest

from app.settings import Settings
from saescope.cli import default_db


@pytest.fixture
def env(monkeypatch):
    """An environment with no database variable in it."""
    for name in list(os.environ):
        if name.upper().endswith("DATABASE_URL"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("variables, expected", [
    ({}, Settings.model_fields["database_url"].default),
    ({"DATABASE_URL": "sqlite:///main.db"}, "sqlite:///main.db"),
    ({"SAESCOPE_DATABASE_URL": "sqlite:///alias.db"}, "sqlite:///alias.db"),
    ({"DATABASE_URL": "sqlite:///main.db", "SAESCOPE_DATABASE_URL": "sqlite:///alias.db"}, "sqlite:///main.db"),
    ({"OTHER_DATABASE_URL": "sqlite:///other.db"}, Settings.model_fields["database_url"].default),
])
def test_default_db_reads_what_settings_read(env, variables, expected):
    for name, value in variables.items():
        env.setenv(name, value)
    assert default_db() == expected == Settings().database_url


def test_default_db_ignores_other_settings(env):
    env.setenv("SAESCOPE_DATABASE_URL", "sqlite:///alias.db")
    env.setenv("SAESCOPE_ADMIN_TOKEN", "short")  # Settings() refuses it; `saescope train` must not care
    assert default_db() == "sqlite:///alias.db"
