"""The loader: run folder into SQL, checked first, one transaction, idempotent; on SQLite and on
PostgreSQL (each test that takes `database_url` or `empty_url` runs on both)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from webrun import DEAD, N_LATENTS, SCRIPT_CONTEXT, TOP_K, VOCAB, make_run, table_counts
from sqlalchemy import func, select

from app.db import make_engine, upgrade
from app.loader import LoadError, load_run, read_run, write_in_one_transaction
from app.models import Context, Example, Latent, Sae
from trainer.runfolder import RunFolderError, load_harvest, save_harvest


counts = table_counts


def test_load_writes_every_table(database_url, run_dir, sae_id):
    harvest = load_harvest(run_dir)
    top_context = harvest.top_context
    assert counts(database_url) == {
        "saes": 1,
        "latents": N_LATENTS,
        "contexts": len(torch.unique(top_context[top_context >= 0])),  # only contexts some example shows
        "examples": int((top_context >= 0).sum()),
    }
    engine = make_engine(database_url)
    with engine.connect() as conn:
        sae = conn.execute(select(Sae)).one()
        assert (sae.id, sae.n_latents, sae.k, sae.layer, sae.d_in) == (sae_id, N_LATENTS, TOP_K, 3, 8)
        assert sae.fvu == pytest.approx(0.2345) and sae.dead_fraction == pytest.approx(len(DEAD) / N_LATENTS)
        assert json.loads(sae.metrics)["delta_ce"] is None  # NaN stored as valid JSON
        context = conn.execute(select(Context).where(Context.context_id == SCRIPT_CONTEXT)).one()
        ids = np.frombuffer(context.token_ids, dtype="<i4").tolist()
        assert json.loads(context.tokens) == [VOCAB[i] for i in ids]
        assert ids == harvest.token_ids[SCRIPT_CONTEXT].tolist()
        example = conn.execute(select(Example).where(Example.latent_index == 0, Example.rank == 0)).one()
        activations = np.frombuffer(example.activations, dtype="<f2")
        assert len(activations) == len(ids) and activations.max() == pytest.approx(5.0)
        dead = conn.execute(select(func.count()).select_from(Example).where(Example.latent_index.in_(DEAD))).scalar_one()
        assert dead == 0
        ranks = conn.execute(select(Example.rank).where(Example.latent_index == 1).order_by(Example.rank)).scalars().all()
        assert ranks == [0, 1, 2]  # latent 1 fired in three contexts only
    engine.dispose()


def test_loading_twice_is_a_no_op(empty_url, run_dir, sae_id):
    url = empty_url
    assert load_run(run_dir, url) == sae_id
    first = counts(url)
    assert load_run(run_dir, url) == sae_id
    assert counts(url) == first


def test_same_id_different_files_needs_replace(tmp_path, empty_url, run_dir, sae_id):
    url = empty_url
    load_run(run_dir, url)
    before = counts(url)
    other = make_run(tmp_path / "other", seed=1)  # same cfg (same id), different weights and harvest
    with pytest.raises(LoadError, match="--replace"):
        load_run(other, url)
    assert counts(url) == before
    assert load_run(other, url, replace=True) == sae_id
    after = counts(url)
    assert after["saes"] == 1 and after["latents"] == N_LATENTS
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(Sae.run_dir)).scalar_one() == str(other.resolve())
    engine.dispose()


@pytest.mark.parametrize("breakage", ["missing_vocab", "missing_weights", "shape_mismatch"])
def test_bad_folder_raises_naming_the_file_and_writes_nothing(tmp_path, empty_url, run_dir, breakage):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    if breakage == "missing_vocab":
        (bad / "harvest" / "vocab.json").unlink()
        culprit = "vocab.json"
    elif breakage == "missing_weights":
        (bad / "sae.safetensors").unlink()
        culprit = "sae.safetensors"
    else:
        harvest = load_harvest(bad)
        harvest.density = harvest.density[:-1]  # one latent short of cfg.json's n_latents
        save_harvest(bad, harvest)
        culprit = "latents.safetensors"
    upgrade(empty_url)
    with pytest.raises(RunFolderError, match=culprit):
        load_run(bad, empty_url)
    assert counts(empty_url) == {"saes": 0, "latents": 0, "contexts": 0, "examples": 0}


def test_a_failing_write_rolls_back_everything(empty_url, run_dir):
    upgrade(empty_url)
    rows = read_run(run_dir)
    rows.examples.rank[-1] = rows.examples.rank[-2]  # the last table written breaks its primary key
    engine = make_engine(empty_url)
    with pytest.raises(Exception, match="(?i)unique|duplicate"):  # the driver's own IntegrityError
        write_in_one_transaction(engine, rows)
    engine.dispose()
    assert counts(empty_url) == {"saes": 0, "latents": 0, "contexts": 0, "examples": 0}


def test_every_value_round_trips(database_url, run_dir, sae_id):
    """Both bulk paths (COPY's binary rows, SQLite's executemany) store exactly what was read."""
    rows = read_run(run_dir)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            latents = conn.execute(select(Latent.index, Latent.density, Latent.max_activation, Latent.mean_activation)
                                   .where(Latent.sae_id == sae_id).order_by(Latent.index)).all()
            contexts = conn.execute(select(Context.context_id, Context.token_ids, Context.tokens)
                                    .where(Context.sae_id == sae_id).order_by(Context.context_id)).all()
            examples = conn.execute(select(Example.latent_index, Example.rank, Example.context_id,
                                           Example.max_activation, Example.activations)
                                    .where(Example.sae_id == sae_id).order_by(Example.latent_index, Example.rank)).all()
    finally:
        engine.dispose()
    want = rows.latents
    assert latents == list(zip(want.index.tolist(), want.density.tolist(), want.max_activation.tolist(),
                               want.mean_activation.tolist()))
    want = rows.contexts
    assert contexts == list(zip(want.context_id.tolist(), [r.tobytes() for r in want.token_ids], want.tokens))
    assert all(json.loads(tokens) for _, _, tokens in contexts)
    want = rows.examples
    assert [tuple(e[:4]) for e in examples] == list(zip(want.latent_index.tolist(), want.rank.tolist(),
                                                        want.context_id.tolist(), want.max_activation.tolist()))
    assert [bytes(e.activations) for e in examples] == [r.tobytes() for r in want.activations]
