"""The activation store: `train` runs the model over the training contexts only; the first
evaluation fills the held-out rows, once, and a killed fill is redone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_TRAIN_ARGS
from trainer import activations
from trainer.activations import ActivationStore, StoreError, complete_heldout
from trainer.model import load_language_model


@pytest.fixture()
def trained(tiny_model_dir, hostile_corpus, tmp_path):
    from saescope.cli import main

    args = ["--model", str(tiny_model_dir), "--corpus", str(hostile_corpus), *TINY_TRAIN_ARGS]
    assert main(["train", "--out", str(tmp_path / "run"), "--store", str(tmp_path / "store"), *args]) == 0
    return tmp_path


def heldout_rows(store: ActivationStore) -> np.ndarray:
    T = store.context_length
    return np.asarray(store.activations[store.n_train_contexts * T :], dtype=np.float32)


def test_train_leaves_the_heldout_rows_to_the_first_eval(trained, tiny_model_dir):
    from saescope.cli import main

    store = ActivationStore.open(trained / "store")
    assert store.meta["complete"] and not store.heldout_ready
    assert store.rows(0, store.n_train_contexts).abs().sum() > 0
    assert not heldout_rows(store).any()  # the model never ran over them
    with pytest.raises(StoreError, match="held-out activations are not computed yet"):
        store.rows(0, store.n_contexts)
    with pytest.raises(StoreError):
        store.contexts([store.n_contexts - 1])

    assert main(["eval", str(trained / "run")]) == 0
    store = ActivationStore.open(trained / "store")
    assert store.heldout_ready
    lm = load_language_model(str(tiny_model_dir), store.meta["layer"])
    tokens = torch.from_numpy(store.tokens[store.n_train_contexts :]).long()
    expected = lm.residual(tokens).reshape(-1, store.meta["d_model"]).cpu().numpy()
    np.testing.assert_allclose(heldout_rows(store), expected, rtol=1e-2, atol=1e-2)
    assert complete_heldout(store) is store  # filled once: later callers load no model


def test_a_killed_fill_is_redone(trained, monkeypatch):
    store = ActivationStore.open(trained / "store")
    real = activations.run_model

    def killed(lm, contexts, first, last, rows, desc, batch_size):
        rows[first * contexts.shape[1] :] = 7.0  # part-written garbage, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(activations, "run_model", killed)
    with pytest.raises(KeyboardInterrupt):
        complete_heldout(store)
    assert not ActivationStore.open(trained / "store").heldout_ready

    monkeypatch.setattr(activations, "run_model", real)
    store = complete_heldout(ActivationStore.open(trained / "store"))
    assert store.heldout_ready and not (heldout_rows(store) == 7.0).any()
