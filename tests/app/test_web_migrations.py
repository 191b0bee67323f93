"""The schema comes only from Alembic migrations, and matches the models, on SQLite and on
PostgreSQL (`empty_url` runs each test on both)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db import downgrade, make_engine, upgrade
from app.models import Base

TABLES = {"saes", "latents", "contexts", "examples"}


def test_upgrade_matches_models_and_downgrade_removes_everything(empty_url):
    url = empty_url
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("latents")}
            assert {"ix_latents_sae_id_density", "ix_latents_sae_id_max_activation"} <= indexes
        downgrade(url, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}  # nothing of ours is left
        upgrade(url)  # and back up again: the migration is repeatable
        upgrade(url)  # a second upgrade at head is a no-op
        with engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_sqlite_enforces_foreign_keys(tmp_path):
    url = f"sqlite:///{tmp_path / 'fk.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
