"""The loader: run folder into SQL, checked first, one transaction, idempotent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from webrun import DEAD, N_LATENTS, SCRIPT_CONTEXT, TOP_K, VOCAB, make_run
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.db import make_engine, upgrade
from app.loader import LoadError, load_run, read_run, write_run
from app.models import Context, Example, Latent, Sae
from trainer.runfolder import RunFolderError, load_harvest, save_harvest


def counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t.__tablename__: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in (Sae, Latent, Context, Example)}
    finally:
        engine.dispose()


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


def test_loading_twice_is_a_no_op(tmp_path, run_dir, sae_id):
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    assert load_run(run_dir, url) == sae_id
    first = counts(url)
    assert load_run(run_dir, url) == sae_id
    assert counts(url) == first


def test_same_id_different_files_needs_replace(tmp_path, run_dir, sae_id):
    url = f"sqlite:///{tmp_path / 'replace.db'}"
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
def test_bad_folder_raises_naming_the_file_and_writes_nothing(tmp_path, run_dir, breakage):
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
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    upgrade(url)
    with pytest.raises(RunFolderError, match=culprit):
        load_run(bad, url)
    assert counts(url) == {"saes": 0, "latents": 0, "contexts": 0, "examples": 0}


def test_a_failing_write_rolls_back_everything(tmp_path, run_dir):
    url = f"sqlite:///{tmp_path / 'rollback.db'}"
    upgrade(url)
    rows = read_run(run_dir)
    rows.examples.append(dict(rows.examples[0], rank=99, context_id=10_000))  # points at no context
    engine = make_engine(url)
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            write_run(conn, rows)
    engine.dispose()
    assert counts(url) == {"saes": 0, "latents": 0, "contexts": 0, "examples": 0}
