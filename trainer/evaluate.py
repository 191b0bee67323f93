"""Evaluation on held-out tokens: FVU, L0, dead and dense latent fractions."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import runfolder
from trainer.activations import ActivationStore
from trainer.sae import TopKSAE

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10 % of tokens counts as dense


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, store: ActivationStore, scale: float, batch_contexts: int = 64) -> dict:
    """Metrics over the store's held-out contexts (in the normalised space the SAE sees)."""
    device = sae.W_dec.device
    first = store.n_train_contexts
    squared_error = 0.0
    n_tokens = 0
    active = 0
    fire_counts = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    x_sum = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    x_sq_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(first, store.n_contexts, batch_contexts), desc="eval", unit="batch"):
        x = store.rows(start, min(start + batch_contexts, store.n_contexts)).to(device) * scale  # (N, d)
        x_hat, latents = sae(x)
        squared_error += float((x - x_hat).pow(2).sum())
        fired = latents.values > 0  # (N, k)
        active += int(fired.sum())
        fire_counts += torch.bincount(latents.indices[fired], minlength=sae.n_latents)
        x_sum += x.sum(0).double()
        x_sq_sum += x.double().pow(2).sum()
        n_tokens += x.shape[0]
    # Variance around the mean over all held-out tokens: FVU = 1 means "no better than the mean".
    total_variance = float(x_sq_sum - x_sum.pow(2).sum() / n_tokens)
    density = fire_counts.float() / n_tokens
    return {
        "fvu": squared_error / total_variance,
        "l0": active / n_tokens,
        "dead_fraction": float((fire_counts == 0).float().mean()),
        "dense_fraction": float((density > DENSE_THRESHOLD).float().mean()),
        "eval_tokens": n_tokens,
    }


def evaluate_run(run_dir: Path, store_dir: Path | None = None) -> dict:
    cfg, sae = TopKSAE.load(run_dir)
    store = ActivationStore.open(store_dir or cfg["store"])
    metrics = evaluate_sae(sae, store, cfg["input_scale"])
    runfolder.save_metrics(run_dir, metrics)
    return metrics
