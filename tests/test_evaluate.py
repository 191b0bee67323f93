"""Evaluation: downstream loss by splicing the reconstruction into the forward pass."""

import pytest
import torch

from trainer import runfolder
from trainer.activations import ActivationStore
from trainer.evaluate import downstream_loss
from trainer.sae import TopKSAE


def exact_sae(d: int) -> TopKSAE:
    """A TopK SAE that reconstructs every x exactly: latents x+ and x- with k = d."""
    eye = torch.eye(d)
    weights = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
               "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)}
    return TopKSAE.from_weights(weights, k=d)


def test_exact_reconstruction_changes_nothing_downstream(tiny_run):
    cfg = runfolder.load_cfg(tiny_run)
    store = ActivationStore.open(cfg["store"])
    metrics = downstream_loss(exact_sae(cfg["d_in"]), cfg, store, n_contexts=8)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=1e-4)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-4)
    if metrics["loss_recovered"] is not None:  # None where ablating the block costs nothing
        assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["downstream_tokens"] == 8 * (cfg["context_length"] - 1)


def test_trained_sae_downstream_metrics(tiny_run):
    metrics = runfolder.load_metrics(tiny_run)  # written by `saescope eval`
    for key in ("ce_clean", "ce_spliced", "ce_ablated", "kl", "delta_ce"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["kl"] >= 0
    assert metrics["delta_ce"] == pytest.approx(metrics["ce_spliced"] - metrics["ce_clean"])
