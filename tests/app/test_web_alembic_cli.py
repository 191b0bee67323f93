"""docker-compose's `migrate` service: `alembic upgrade head` from the repository root, through
alembic.ini, the URL coming only from the environment (app/migrations/env.py falls back to Settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from app.db import make_engine
from app.models import Base

pytestmark = pytest.mark.multiprocess  # the alembic command in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def test_alembic_command_line_migrates_the_database_of_the_environment(empty_url):
    env = {name: value for name, value in os.environ.items() if not name.upper().endswith("DATABASE_URL")}
    env["DATABASE_URL"] = empty_url
    # What docker-compose runs (its `alembic upgrade head` reads ./alembic.ini), by this interpreter.
    done = subprocess.run([sys.executable, "-m", "alembic", "-c", "alembic.ini", "upgrade", "head"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    head = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            assert set(Base.metadata.tables) <= set(inspect(conn).get_table_names())
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
    finally:
        engine.dispose()
