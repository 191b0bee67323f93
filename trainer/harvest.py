"""Harvest: for every latent its firing statistics and top-activating contexts.

One pass over the stored contexts keeps, per latent, the K contexts with the highest activation
(one example per context); a second pass over only those contexts records the latent's
activation on every token of each.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import runfolder
from trainer.activations import ActivationStore
from trainer.config import HarvestConfig
from trainer.sae import TopKSAE, default_device


class TopContexts:
    """Running top-K contexts per latent by the latent's max activation within the context."""

    def __init__(self, n_latents: int, top_k: int, device):
        self.values = torch.zeros(top_k, n_latents, device=device)  # (K, n)
        self.contexts = torch.full((top_k, n_latents), -1, dtype=torch.long, device=device)  # (K, n)

    def update(self, context_max: torch.Tensor, context_ids: torch.Tensor) -> None:
        """context_max: (B, n) each context's max activation per latent; context_ids: (B,)."""
        values = torch.cat([self.values, context_max])  # (K + B, n)
        contexts = torch.cat([self.contexts, context_ids[:, None].expand_as(context_max)])
        self.values, order = values.topk(self.values.shape[0], dim=0)  # sorted, descending
        self.contexts = contexts.gather(0, order)
        self.contexts[self.values <= 0] = -1  # a context where the latent never fires is no example


@torch.no_grad()
def encode_batch(sae: TopKSAE, x: torch.Tensor, scale: float, exclude_first: int) -> torch.Tensor:
    """Dense latent activations of contexts x: (b, T, d) -> (b, T, n), excluded positions zeroed."""
    b, T, _ = x.shape
    z = sae.encode_dense(x.to(sae.W_dec.device).flatten(0, 1) * scale).view(b, T, sae.n_latents)
    z[:, :exclude_first] = 0
    return z


@torch.no_grad()
def harvest_sae(sae: TopKSAE, store: ActivationStore, scale: float, cfg: HarvestConfig) -> runfolder.Harvest:
    n, T, device = sae.n_latents, store.context_length, sae.W_dec.device
    fire_counts = torch.zeros(n, device=device)
    activation_sums = torch.zeros(n, device=device)
    max_activation = torch.zeros(n, device=device)
    top = TopContexts(n, cfg.top_k, device)
    batches = range(0, store.n_contexts, cfg.batch_contexts)
    for first in tqdm(batches, desc="harvest", unit="batch"):
        last = min(first + cfg.batch_contexts, store.n_contexts)
        x = store.rows(first, last).view(last - first, T, -1)  # a sequential read
        z = encode_batch(sae, x, scale, cfg.exclude_first)  # (B, T, n)
        fire_counts += (z > 0).sum((0, 1))
        activation_sums += z.sum((0, 1))
        context_max = z.amax(1)  # (B, n)
        max_activation = torch.maximum(max_activation, context_max.amax(0))
        top.update(context_max, torch.arange(first, last, device=device))

    # Second pass: the latent's activation on every token of each of its top contexts.
    top_context = top.contexts.T.contiguous()  # (n, K)
    unique = top_context[top_context >= 0].unique()  # sorted store rows
    top_activations = torch.zeros(n, cfg.top_k, T)
    for start in tqdm(range(0, len(unique), cfg.batch_contexts), desc="examples", unit="batch"):
        rows = unique[start : start + cfg.batch_contexts]  # (b,) sorted
        z = encode_batch(sae, store.contexts(rows.cpu().numpy()), scale, cfg.exclude_first)  # (b, T, n)
        latent, rank = ((top_context >= rows[0]) & (top_context <= rows[-1])).nonzero(as_tuple=True)
        local = torch.searchsorted(rows, top_context[latent, rank])
        top_activations[latent, rank] = z[local, :, latent].cpu()  # (pairs, T)

    # Renumber contexts densely so that each is stored once.
    remap = torch.full((store.n_contexts,), -1, dtype=torch.long)
    remap[unique.cpu()] = torch.arange(len(unique))
    n_tokens = store.n_contexts * (T - cfg.exclude_first)
    return runfolder.Harvest(
        density=(fire_counts / n_tokens).cpu(),
        max_activation=max_activation.cpu(),
        mean_activation=(activation_sums / fire_counts.clamp_min(1)).cpu(),
        top_context=torch.where(top_context.cpu() >= 0, remap[top_context.cpu().clamp_min(0)], -1),
        top_activations=top_activations,
        top_max=top.values.T.cpu(),
        token_ids=torch.from_numpy(store.tokens[unique.cpu().numpy()]).long(),
        vocab=[],
        info={
            "n_tokens": n_tokens,
            "n_contexts": store.n_contexts,
            "context_length": T,
            "top_k": cfg.top_k,
            "excluded_positions": list(range(cfg.exclude_first)),
        },
    )


def store_for_run(run_dir: Path, run_cfg: dict, cfg: HarvestConfig, store_dir: Path | None) -> ActivationStore:
    """The run's activation store; an imported SAE has none, so build one for its model and
    layer (and record it in cfg.json, so that eval finds it too)."""
    if store_dir or run_cfg.get("store"):
        return ActivationStore.open(store_dir or run_cfg["store"])
    from trainer.config import TrainConfig
    from trainer.train import prepare_store

    store_cfg = TrainConfig(
        model=run_cfg["model"], layer=run_cfg["layer"], n_latents=2, k=1, corpus=cfg.corpus,
        tokens=cfg.tokens, heldout_tokens=cfg.context_length * 16, context_length=cfg.context_length,
    )
    store = prepare_store(store_cfg, Path(run_dir) / "activations")
    if store.meta["d_model"] != run_cfg["d_in"]:
        raise runfolder.RunFolderError(
            f"{Path(run_dir) / runfolder.CFG_FILE}: the SAE reads {run_cfg['d_in']}-dim inputs but "
            f"{run_cfg['model']} has d_model {store.meta['d_model']}"
        )
    runfolder.save_cfg(run_dir, {**run_cfg, "store": str(store.path.resolve())})
    return store


def harvest_run(run_dir: Path, cfg: HarvestConfig | None = None, store_dir: Path | None = None) -> runfolder.Harvest:
    cfg = cfg or HarvestConfig()
    run_cfg, sae = TopKSAE.load(run_dir, default_device())
    store = store_for_run(run_dir, run_cfg, cfg, store_dir)
    harvest = harvest_sae(sae, store, run_cfg.get("input_scale", 1.0), cfg)
    harvest.vocab = store.vocab()
    runfolder.save_harvest(run_dir, harvest)
    return harvest
