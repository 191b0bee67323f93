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
            assert {"ix_latents_sae_id_density_index", "ix_latents_sae_id_max_activation_index"} <= indexes
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


def test_upgrades_and_downgrades_keep_loaded_rows(empty_url, run_dir):
    """0003 rebuilds the examples table on SQLite (batch mode): a loaded database keeps its rows."""
    from webrun import table_counts

    from app.loader import read_run, write_in_one_transaction

    upgrade(empty_url, "0002")
    engine = make_engine(empty_url)
    try:
        write_in_one_transaction(engine, read_run(run_dir))
    finally:
        engine.dispose()
    loaded = table_counts(empty_url)
    assert loaded["examples"] > 0
    upgrade(empty_url)
    assert table_counts(empty_url) == loaded
    downgrade(empty_url, "0002")
    assert table_counts(empty_url) == loaded
