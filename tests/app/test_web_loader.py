"""The loader: run folder into SQL, checked first, one transaction, idempotent; on SQLite and on
PostgreSQL (each test that takes `database_url` or `empty_url` runs on both)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, text

from app.db import make_engine, upgrade
from app.loader import LoadError, load_run, read_run, write_in_one_transaction
from app.models import Context, Example, ExplanationTerm, Latent, LatentDetail, Sae, TokenLatent, Vocab
from app.search import terms
from tests.app.webrun import (
    CAT,
    DEAD,
    DEF_LATENT,
    DEF_TOKEN,
    FEW,
    HOSTILE_EXPLANATION,
    N_LATENTS,
    QUANTILE_BINS,
    SCRIPT_CONTEXT,
    TOP_K,
    VOCAB,
    make_run,
    table_counts,
)
from trainer.runfolder import RunFolderError, load_harvest, save_harvest


counts = table_counts


def test_load_writes_every_table(database_url, run_dir, synthetic_sae_id):
    harvest = load_harvest(run_dir)
    top, quantile = harvest.top_context, harvest.quantile_context
    shown = torch.cat([top[top >= 0], quantile[quantile >= 0]])
    assert counts(database_url) == {
        "saes": 1,
        "latents": N_LATENTS,
        "latent_details": N_LATENTS,
        "contexts": len(torch.unique(shown)),  # only contexts some example shows
        "examples": int((top >= 0).sum() + (quantile >= 0).sum()),
        "vocab": len(VOCAB),
        "token_latents": len(harvest.token_id),
        "explanation_terms": sum(len(terms(e["text"])) for e in harvest.explanations),
    }
    engine = make_engine(database_url)
    with engine.connect() as conn:
        sae = conn.execute(select(Sae)).one()
        assert (sae.id, sae.n_latents, sae.k, sae.layer, sae.d_in) == (synthetic_sae_id, N_LATENTS, TOP_K, 3, 8)
        assert sae.fvu == pytest.approx(0.2345) and sae.dead_fraction == pytest.approx(len(DEAD) / N_LATENTS)
        assert json.loads(sae.metrics)["delta_ce"] is None  # NaN stored as valid JSON
        assert json.loads(sae.harvest)["excluded_token_ids"] == [0]
        histogram = json.loads(sae.density_histogram)
        assert histogram["dead"] == len(DEAD) and sum(histogram["counts"]) == N_LATENTS - len(DEAD)
        assert sae.n_explained == N_LATENTS - len(DEAD)
        context = conn.execute(select(Context).where(Context.context_id == SCRIPT_CONTEXT)).one()
        ids = np.frombuffer(context.token_ids, dtype="<i4").tolist()
        assert json.loads(context.tokens) == [VOCAB[i] for i in ids]
        assert ids == harvest.token_ids[SCRIPT_CONTEXT].tolist()
        example = conn.execute(select(Example).where(Example.latent_index == 0, Example.bin == 0, Example.rank == 0)).one()
        activations = np.frombuffer(example.activations, dtype="<f2")
        assert len(activations) == len(ids) and activations.max() == pytest.approx(5.0)
        assert example.position == 3  # the peak: "alert(1)"
        dead = conn.execute(select(func.count()).select_from(Example).where(Example.latent_index.in_(DEAD))).scalar_one()
        assert dead == 0
        ranks = conn.execute(select(Example.bin, Example.rank).where(Example.latent_index == FEW)
                             .order_by(Example.bin, Example.rank)).all()
        assert [rank for b, rank in ranks if b == 0] == [0, 1, 2]  # fired in three contexts only
        assert [rank for b, rank in ranks if b == 1] == [0]  # its lowest bin has one sample
        assert {b for b, _ in ranks} == set(range(QUANTILE_BINS + 1))
        latent = conn.execute(select(Latent).where(Latent.index == 0)).one()
        detail = conn.execute(select(LatentDetail).where(LatentDetail.index == 0)).one()
        assert latent.explanation == HOSTILE_EXPLANATION and json.loads(detail.explanation_patterns) == [[5, 6]]
        assert np.frombuffer(detail.neighbour_index, dtype="<i4").tolist() == harvest.neighbour_index[0].tolist()
        assert detail.logit_min == -1.0 and detail.logit_max == 1.0
        unscored = conn.execute(select(Latent).where(Latent.index == DEAD[0])).one()
        assert (unscored.explanation, unscored.explanation_precision, unscored.explanation_f1) == (None, None, None)
        assert conn.execute(select(Vocab.token_id).where(Vocab.token == " def")).scalar_one() == DEF_TOKEN
        best = conn.execute(select(TokenLatent.latent).where(TokenLatent.token_id == DEF_TOKEN)
                            .order_by(TokenLatent.mean_activation.desc())).scalars().first()
        assert best == DEF_LATENT
        assert conn.execute(select(ExplanationTerm.latent).where(ExplanationTerm.term == "cat")
                            .order_by(ExplanationTerm.score.desc())).scalars().first() == CAT
    engine.dispose()


def test_loading_twice_is_a_no_op(empty_url, run_dir, synthetic_sae_id):
    url = empty_url
    assert load_run(run_dir, url) == synthetic_sae_id
    first = counts(url)
    assert load_run(run_dir, url) == synthetic_sae_id
    assert counts(url) == first


def test_same_id_different_files_needs_replace(tmp_path, empty_url, run_dir, synthetic_sae_id):
    url = empty_url
    load_run(run_dir, url)
    before = counts(url)
    other = make_run(tmp_path / "other", seed=1)  # same cfg (same id), different weights and harvest
    with pytest.raises(LoadError, match="--replace"):
        load_run(other, url)
    assert counts(url) == before
    assert load_run(other, url, replace=True) == synthetic_sae_id
    after = counts(url)
    assert after["saes"] == 1 and after["latents"] == N_LATENTS
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(Sae.run_dir)).scalar_one() == str(other.resolve())
    engine.dispose()


EMPTY = {table: 0 for table in ("saes", "latents", "latent_details", "contexts", "examples", "vocab", "token_latents",
                                 "explanation_terms")}


@pytest.mark.parametrize("breakage", ["missing_vocab", "missing_weights", "shape_mismatch", "old_harvest", "repeated_token_row"])
def test_bad_folder_raises_naming_the_file_and_writes_nothing(tmp_path, empty_url, run_dir, breakage):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    if breakage == "missing_vocab":
        (bad / "harvest" / "vocab.json").unlink()
        culprit = "vocab.json"
    elif breakage == "missing_weights":
        (bad / "sae.safetensors").unlink()
        culprit = "sae.safetensors"
    elif breakage == "old_harvest":
        info = json.loads((bad / "harvest" / "harvest.json").read_text())
        (bad / "harvest" / "harvest.json").write_text(json.dumps({**info, "version": 1}))
        culprit = "harvest.json: made by an older saescope"
    else:
        harvest = load_harvest(bad)
        if breakage == "shape_mismatch":
            harvest.tensors["density"] = harvest.density[:-1]  # one latent short of cfg.json's n_latents
            culprit = "latents.safetensors"
        else:
            harvest.tensors["token_id"][1] = harvest.token_id[0]  # latent 0 listed twice for one token
            culprit = "tokens.safetensors: a .token_id, token_latent. pair repeats"
        save_harvest(bad, harvest)
    upgrade(empty_url)
    with pytest.raises(RunFolderError, match=culprit):
        load_run(bad, empty_url)
    assert counts(empty_url) == EMPTY


def test_a_failing_write_rolls_back_everything(empty_url, run_dir):
    upgrade(empty_url)
    rows = read_run(run_dir)
    rows.tables["explanation_terms"]["latent"][-1] = rows.tables["explanation_terms"]["latent"][-2]
    rows.tables["explanation_terms"]["term"][-1] = rows.tables["explanation_terms"]["term"][-2]  # the last table breaks its key
    engine = make_engine(empty_url)
    with pytest.raises(Exception, match="(?i)unique|duplicate"):  # the driver's own IntegrityError
        write_in_one_transaction(engine, rows)
    engine.dispose()
    assert counts(empty_url) == EMPTY


def test_every_value_round_trips(database_url, run_dir, synthetic_sae_id):
    """Both bulk paths (COPY's binary rows, SQLite's executemany) store exactly what was read:
    every table, every column, NULLs included."""
    rows = read_run(run_dir)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            for name, table_rows in rows.tables.items():
                table = table_rows.table
                if isinstance(table, str):  # the search documents: a table outside the models (app.models.SEARCH_TABLE)
                    stored = conn.execute(text(f"SELECT {', '.join(table_rows.columns)} FROM {table} WHERE sae_id = :s "
                                               "ORDER BY latent"), {"s": synthetic_sae_id}).all()
                    assert [tuple(row) for row in stored] == list(zip(*[_python(v) for v in table_rows.columns.values()]))
                    continue
                key = [column for column in table.__table__.primary_key.columns if column.name != "sae_id"]
                columns = [table.__table__.c[column] for column in table_rows.columns]
                stored = conn.execute(select(*columns).where(table.sae_id == synthetic_sae_id).order_by(*key)).all()
                want = list(zip(*[_python(values) for values in table_rows.columns.values()]))
                if name == "explanation_terms":  # the loader sorts terms by code point, the database by its collation
                    stored, want = sorted(stored), sorted(want)
                assert [tuple(row) for row in stored] == want, name
    finally:
        engine.dispose()


def _python(values):
    if isinstance(values, list):
        return values
    if values.ndim == 2:
        return [row.tobytes() for row in values]
    return values.tolist()


def test_text_that_postgresql_cannot_store_is_cleaned():
    from app.loader import clean_text

    assert clean_text("a\x00b") == "a\u2400b"  # NUL: shown as the symbol for it
    assert clean_text("x\ud800y") == "x?y"  # a lone surrogate
    assert clean_text(" def") == " def"


def test_a_harvest_swapped_in_while_a_run_is_read_is_loaded_again_next_time(tmp_path, monkeypatch):
    """The hash is taken before the files are read: rows read after a new harvest came in stand
    under the older hash, so the next load sees the run as changed (the other order would keep
    the old rows under the new files' hash, skipped as "already loaded")."""
    from app import loader

    run = make_run(tmp_path / "run")
    read = loader.load_harvest

    def read_then_reharvest(run_dir, cfg):
        harvest = read(run_dir, cfg)
        newer = load_harvest(run_dir)
        newer.explanations[0] = {**newer.explanations[0], "text": "newer"}
        save_harvest(run_dir, newer)  # as `saescope harvest` would, from another process
        return harvest

    monkeypatch.setattr(loader, "load_harvest", read_then_reharvest)
    rows = read_run(run)
    assert rows.sae["content_hash"] != loader.content_hash(run)
