"""The activation store: `train` runs the model over the training contexts only; the first
evaluation fills the held-out rows, once, and a killed fill is redone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_TRAIN_ARGS
from trainer import store as store_module
from trainer.model import load_language_model
from trainer.store import ActivationStore, StoreError, complete_heldout


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
    real = store_module.run_model

    def killed(lm, contexts, first, last, rows, desc, batch_size):
        rows[first * contexts.shape[1] :] = 7.0  # part-written garbage, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "run_model", killed)
    with pytest.raises(KeyboardInterrupt):
        complete_heldout(store)
    assert not ActivationStore.open(trained / "store").heldout_ready

    monkeypatch.setattr(store_module, "run_model", real)
    store = complete_heldout(ActivationStore.open(trained / "store"))
    assert store.heldout_ready and not (heldout_rows(store) == 7.0).any()


def mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of the file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_the_model_writes_the_store_in_released_slices_with_the_same_rows(tiny_model_dir, tmp_path, monkeypatch):
    """run_model unmaps what it wrote every RELEASE_BYTES (and flushes at the end), so that building a store never
    holds all of it in the process; the rows are the same bytes as when it keeps them all until
    the end, and the model's residual stream. (Linux: /proc/self/smaps and madvise, as the
    project needs anyway.)"""
    lm = load_language_model(str(tiny_model_dir), 1, "cpu")
    C, T, d = 128, 64, lm.d_model  # 512 KiB of fp16 rows
    contexts = torch.randint(0, len(lm.tokenizer), (C, T), generator=torch.Generator().manual_seed(0))

    residual = lm.residual

    def written(name: str, release_bytes: int) -> tuple[np.ndarray, int]:
        """The rows run_model writes, and the most KiB of them it held at once."""
        monkeypatch.setattr(store_module, "RELEASE_BYTES", release_bytes)
        path = (tmp_path / f"{name}.npy").resolve()
        rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(C * T, d))
        held = []
        monkeypatch.setattr(lm, "residual", lambda batch: held.append(mapped_kib(path)) or residual(batch))
        store_module.run_model(lm, contexts, 0, C, rows, name, batch_size=5)  # 20 KiB a batch: slices end mid-page
        held.append(mapped_kib(path))
        del rows
        return np.load(path), max(held)

    kept, kept_kib = written("kept", 2**40)
    released, released_kib = written("released", 64 * 2**10)
    assert kept_kib >= 450  # the test sees the pages held (512 KiB in all)...
    assert released_kib < 100  # ...and that they are released as they are written
    assert np.array_equal(kept, released)
    expected = residual(contexts[:16]).reshape(-1, d).to(torch.float16).numpy()
    assert np.array_equal(released[: 16 * T], expected)
