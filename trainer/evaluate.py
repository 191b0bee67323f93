"""Evaluation on held-out tokens: FVU, L0, dead and dense latent fractions."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer import runfolder
from trainer.errors import RunFolderError
from trainer.files import read_json, write_json
from trainer.formats import CFG_FILE
from trainer.model import find_blocks
from trainer.progress import progress
from trainer.runconfig import RunConfig
from trainer.sae import TopKSAE, default_device
from trainer.store import ActivationStore, complete_heldout, open_store_for_sae
from trainer.thresholds import DENSE_THRESHOLD

# In the store: the summed CE with block L zero-ablated, per (model, layer, device, held-out
# tokens). It does not depend on the SAE, so the SAEs of a sweep (or a second eval) on one store
# skip that pass: a third of the downstream loss's forward passes.
ABLATED_CACHE = "ce_ablated.json"


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
    for start in progress(range(first, store.n_contexts, batch_contexts), desc="eval", unit="batch"):
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


def evaluate_run(run_dir: Path, store_dir: Path | None = None, downstream_contexts: int = 64) -> dict:
    """Reconstruction metrics, then downstream loss on `downstream_contexts` held-out contexts
    (0 skips it), into metrics.json."""
    cfg, sae = runfolder.load_sae(run_dir, default_device())
    runfolder.load_metrics(run_dir)  # a damaged metrics.json fails now, not after the whole evaluation
    store_dir = store_dir or cfg.store_dir(run_dir)
    if store_dir is None:
        raise RunFolderError(f"{Path(run_dir) / CFG_FILE}: no activation store; pass --store or run `saescope harvest` first")
    store = complete_heldout(open_store_for_sae(store_dir, cfg, run_dir))  # the first eval on a store computes them
    metrics = evaluate_sae(sae, store, cfg.input_scale)  # as harvest and the probe read it
    if downstream_contexts > 0:
        metrics |= downstream_loss(sae, cfg, store, downstream_contexts)
    runfolder.save_metrics(run_dir, metrics)
    return metrics


# ------------------------------------------------------------ downstream loss


class Replay(torch.nn.Module):
    """Stands in for one of blocks 0..L while the blocks after L run on a residual computed
    before: blocks before L pass their input through (never read), block L returns `resid`.
    Other attributes are the real block's (some models' loops read e.g. its attention type)."""

    def __init__(self, real: torch.nn.Module, resid: torch.Tensor | None, like):
        super().__init__()
        object.__setattr__(self, "real", real)  # not registered as a submodule
        self.resid, self.like = resid, like  # like: block L's real output, for its structure

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["real"], name)

    def forward(self, hidden_states, *args, **kwargs):
        x = hidden_states if self.resid is None else self.resid
        return (x, *self.like[1:]) if isinstance(self.like, tuple) else x


@contextmanager
def replaying(blocks: torch.nn.ModuleList, layer: int, resid: torch.Tensor, like):
    """Within: the model's blocks 0..L are skipped and block L's output is `resid`."""
    real = list(blocks)
    try:
        for i in range(layer + 1):
            blocks[i] = Replay(real[i], resid if i == layer else None, like)
        yield
    finally:
        for i, block in enumerate(real):
            blocks[i] = block


@torch.no_grad()
def downstream_loss(sae: TopKSAE, run_cfg: RunConfig, store: ActivationStore, n_contexts: int = 64, batch: int = 8) -> dict:
    """Splice the SAE's reconstruction into the forward pass at the hookpoint (Section 4.1) on
    held-out contexts: clean CE, spliced CE, CE with the block output zero-ablated, their
    differences, and KL(clean || spliced) per token. Blocks 0..L run once per batch, in the clean
    pass; the spliced and ablated passes run only the blocks after L."""
    model = run_cfg.language_model(sae.W_dec.device, fast=False).loaded.causal_lm  # the whole model, fp32
    _, blocks = find_blocks(model.base_model)
    layer, scale = run_cfg.layer, run_cfg.input_scale
    first = store.n_train_contexts
    rows = range(first, min(store.n_contexts, first + n_contexts))
    tokens = torch.from_numpy(store.tokens[list(rows)]).long().to(sae.W_dec.device)  # (C, T)

    def log_probs(ids):
        return model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)

    def reconstruct(resid):
        x = resid.reshape(-1, resid.shape[-1]).float() * scale
        return (sae(x)[0] / scale).view_as(resid).to(resid.dtype)

    key = ablated_key(run_cfg, tokens)
    known = read_ablated(store).get(key)  # the summed ablated CE, if an earlier eval on this store made it
    passes = [("ce_spliced", reconstruct)] + ([("ce_ablated", torch.zeros_like)] if known is None else [])
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_ablated": 0.0, "kl": 0.0}
    n_predictions = 0
    for start in progress(range(0, len(tokens), batch), desc="downstream", unit="batch"):
        ids = tokens[start : start + batch]
        captured = {}
        handle = blocks[layer].register_forward_hook(lambda module, args, output: captured.update(output=output))
        try:
            clean = log_probs(ids)
        finally:
            handle.remove()
        output = captured["output"]
        resid = (output[0] if isinstance(output, tuple) else output).clone()  # (B, T, d); the blocks after may write in place
        results = {"ce_clean": clean}
        for name, transform in passes:
            with replaying(blocks, layer, transform(resid), output):
                results[name] = log_probs(ids)
        targets = ids[:, 1:]
        for name, logprobs in results.items():
            sums[name] += float(-logprobs.gather(-1, targets[..., None]).sum())
        sums["kl"] += float((clean.exp() * (clean - results["ce_spliced"])).sum())
        n_predictions += targets.numel()
    if known is None:
        save_ablated(store, key, sums["ce_ablated"])
    else:
        sums["ce_ablated"] = known
    metrics = {name: total / n_predictions for name, total in sums.items()}
    metrics["delta_ce"] = metrics["ce_spliced"] - metrics["ce_clean"]
    # Share of the loss the layer's ablation costs that the SAE recovers (1 = all of it);
    # undefined (None) when ablating costs nothing, as in a random model.
    ablation_cost = metrics["ce_ablated"] - metrics["ce_clean"]
    metrics["loss_recovered"] = (
        (metrics["ce_ablated"] - metrics["ce_spliced"]) / ablation_cost if ablation_cost > 1e-6 else None
    )
    metrics["downstream_tokens"] = n_predictions
    return metrics


def ablated_key(run_cfg: RunConfig, tokens: torch.Tensor) -> str:
    """What the ablated CE depends on: the model, the layer, the device kind (its arithmetic) and
    the held-out tokens themselves (a store rebuilt in place gets new keys)."""
    digest = hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]
    return f"{run_cfg.model}|layer {run_cfg.layer}|{tokens.device.type}|{tuple(tokens.shape)}|{digest}"


def read_ablated(store: ActivationStore) -> dict:
    try:
        return read_json(store.path / ABLATED_CACHE)
    except RunFolderError:  # none yet (or damaged): computed again
        return {}


def save_ablated(store: ActivationStore, key: str, total: float) -> None:
    """Atomically; two evals writing at once may drop one's entry, which costs only its recomputation."""
    try:
        write_json(store.path / ABLATED_CACHE, {**read_ablated(store), key: total})
    except OSError:  # a read-only store: the next eval computes it again
        pass
