"""The schema comes only from Alembic migrations, and matches the models, on SQLite and on
PostgreSQL (`empty_url` runs each test on both)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db import downgrade, make_engine, upgrade
from app.models import SEARCH_TABLE, Base, compared_in_schema
from trainer.runfolder import load_harvest

TABLES = {"saes", "latents", "latent_details", "contexts", "examples", "vocab", "token_latents", "explanation_terms",
          "share_links", "ladders", "ladder_rungs", "latent_families", "latent_explanations", SEARCH_TABLE}


def test_upgrade_matches_models_and_downgrade_removes_everything(empty_url):
    url = empty_url
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
            compared = MigrationContext.configure(conn, opts={"include_name": compared_in_schema})
            assert compare_metadata(compared, Base.metadata) == []
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("latents")}
            assert {"ix_latents_sae_id_density_index", "ix_latents_sae_id_max_activation_index",
                    "ix_latents_sae_id_explanation_f1_index"} <= indexes
            assert {ix["name"] for ix in inspect(conn).get_indexes("vocab")} == {"ix_vocab_sae_id_token"}
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


def load_before_0004(url: str) -> None:
    """What a loader before 0004 wrote: an SAE, two latents, a context and top examples."""
    from sqlalchemy import text

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO saes (id, model, layer, d_in, n_latents, k, context_length, cfg, metrics, run_dir, "
                              "content_hash, created_at) VALUES ('old', 'm', 1, 8, 2, 1, 2, '{}', '{}', '/nowhere', 'h', "
                              "CURRENT_TIMESTAMP)"))
            conn.execute(text('INSERT INTO latents (sae_id, "index", density, max_activation, mean_activation) '
                              "VALUES ('old', 0, 0.5, 2.0, 1.0), ('old', 1, 0.0, 0.0, 0.0)"))
            conn.execute(text("INSERT INTO contexts (sae_id, context_id, token_ids, tokens) VALUES ('old', 0, :ids, '[\"a\", \"b\"]')"),
                         {"ids": bytes(8)})
            conn.execute(text('INSERT INTO examples (sae_id, latent_index, "rank", context_id, max_activation, activations) '
                              "VALUES ('old', 0, 0, 0, 2.0, :a), ('old', 0, 1, 0, 1.0, :a)"), {"a": bytes(4)})
    finally:
        engine.dispose()


def test_upgrades_and_downgrades_keep_loaded_rows(empty_url, run_dir):
    """0004 rebuilds the examples table on SQLite (batch mode): a database loaded before keeps its
    rows, its pages still open, and a downgrade keeps the top examples."""
    from fastapi.testclient import TestClient
    from tests.app.webrun import table_counts

    from app.loader import load_run
    from app.main import create_app
    from app.settings import Settings

    upgrade(empty_url, "0003")
    load_before_0004(empty_url)
    upgrade(empty_url)
    loaded = table_counts(empty_url)
    assert (loaded["saes"], loaded["latents"], loaded["examples"], loaded["latent_details"]) == (1, 2, 2, 0)
    with TestClient(create_app(Settings(database_url=empty_url))) as client:
        feature = client.get("/saes/old/features/0.json").json()
        assert [e["max_activation"] for e in feature["top_examples"]] == [2.0, 1.0]
        assert feature["explanation"] is None and feature["quantiles"] == [] and feature["neighbours"] == []
        assert client.get("/saes/old/features/0").status_code == 200
        assert client.get("/saes/old").status_code == 200
    sae_id = load_run(run_dir, empty_url)  # a new run beside it, quantile examples and all
    downgrade(empty_url, "0003")
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            kept = conn.exec_driver_sql("SELECT sae_id, count(*) FROM examples GROUP BY sae_id ORDER BY sae_id").all()
            latents = conn.exec_driver_sql("SELECT sae_id, count(*) FROM latents GROUP BY sae_id ORDER BY sae_id").all()
    finally:
        engine.dispose()
    harvest = load_harvest(run_dir)
    assert kept == [("old", 2), (sae_id, int((harvest.top_context >= 0).sum()))]  # only the top examples fit the old key
    # SQLite's batch mode copies `saes` to drop a column: its latents (ON DELETE CASCADE) stay
    assert latents == [("old", 2), (sae_id, harvest.n_latents)]
