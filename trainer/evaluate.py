"""Evaluation on held-out tokens: FVU (and at other k: progressive codes), L0, dead and dense latent
fractions, downstream loss, ablation sparsity and probe loss (trainer/probing.py)."""

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
from trainer.probe_tasks import read_probe_tasks
from trainer.probing import probe_loss_of
from trainer.progress import progress
from trainer.runconfig import RunConfig
from trainer.sae import InputNorm, TopKLatents, TopKSAE, default_device
from trainer.store import ActivationStore, Positions, complete_heldout, open_store_for_sae
from trainer.thresholds import DENSE_THRESHOLD

# In the store: the summed CE with block L zero-ablated, per (model, layer, device, held-out
# tokens). It does not depend on the SAE, so the SAEs of a sweep (or a second eval) on one store
# skip that pass: a third of the downstream loss's forward passes.
ABLATED_CACHE = "ce_ablated.json"
# The sparsity of ablation effects (ablation_sparsity_of): latents sampled, each removed at one
# held-out position where it fires, from the store's first held-out contexts.
ABLATION_SAMPLES = 24
ABLATION_CONTEXTS = 16


def progressive_ks(k: int, n_latents: int) -> list[int]:
    """The k' of the progressive-code FVU: k/4, k/2, k, 2k and 4k (below n, each at least 1)."""
    return sorted({max(1, k // 4), max(1, k // 2), k, *(m * k for m in (2, 4) if m * k < n_latents)})


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, store: ActivationStore, norm: InputNorm | float, positions: Positions = Positions(),
                 batch_contexts: int = 64, progressive: bool = True) -> dict:
    """Metrics over the store's held-out contexts at the positions that count; the FVU also over
    every position (`fvu_all_positions`), as tools that keep them all (sparsify, SAELens) report
    it. FVU compares the residual stream with its reconstruction mapped back from the SAE's
    normalised space (`norm`, or a number: the "scale" normalization), which is what a splice
    puts into the model. With `progressive`, also `progressive_fvu`: the FVU when the code keeps
    the k' largest latents instead of k, for each k' of progressive_ks (Gao et al. 2024, Section
    5.3: a Multi-TopK SAE degrades gracefully above and below its k), from the same
    pre-activations."""
    norm = norm if isinstance(norm, InputNorm) else InputNorm("scale", norm)
    device = sae.W_dec.device
    first = store.n_train_contexts
    counted = torch.from_numpy(store.counted(positions, first, store.n_contexts).reshape(-1)).to(device)
    sums = {"counted": Moments(sae.d_in, device), "all": Moments(sae.d_in, device)}
    ks = progressive_ks(sae.k, sae.n_latents) if progressive else [sae.k]
    at_k = {k: Moments(sae.d_in, device) for k in ks if k != sae.k}
    active = 0
    fire_counts = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    for start in progress(range(first, store.n_contexts, batch_contexts), desc="eval", unit="batch"):
        last = min(start + batch_contexts, store.n_contexts)
        x = store.rows(start, last).to(device)  # (N, d)
        mask = counted[(start - first) * store.context_length : (last - first) * store.context_length]  # (N,)
        x_n, stats = norm.normalize(x)
        # The k' largest of one pass, largest first: each code is a prefix, the SAE's own the k first.
        top = sae.pre_acts(x_n).topk(max(ks), dim=-1, sorted=True)

        def reconstruct(k: int) -> tuple[torch.Tensor, TopKLatents]:
            latents = TopKLatents(top.values[:, :k].relu(), top.indices[:, :k])
            return norm.restore(sae.decode(latents), stats), latents

        x_hat, latents = reconstruct(sae.k)
        sums["all"].add(x, x_hat)
        sums["counted"].add(x[mask], x_hat[mask])
        for k, moments in at_k.items():
            moments.add(x[mask], reconstruct(k)[0][mask])
        fired = (latents.values > 0) & mask[:, None]  # (N, k)
        active += int(fired.sum())
        fire_counts += torch.bincount(latents.indices[fired], minlength=sae.n_latents)
    n_tokens = sums["counted"].n
    density = fire_counts.float() / n_tokens
    at_k[sae.k] = sums["counted"]
    return {
        "fvu": sums["counted"].fvu,
        "fvu_all_positions": sums["all"].fvu,
        "l0": active / n_tokens,
        "dead_fraction": float((fire_counts == 0).float().mean()),
        "dense_fraction": float((density > DENSE_THRESHOLD).float().mean()),
        "eval_tokens": n_tokens,
        "eval_positions": positions.describe(),
        **({"progressive_fvu": {str(k): at_k[k].fvu for k in ks}} if progressive else {}),
    }


class Moments:
    """Running sums for FVU: squared error, and the inputs' sum and sum of squares (float64)."""

    def __init__(self, d: int, device: torch.device):
        self.squared_error, self.n = 0.0, 0
        self.x_sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.x_sq_sum = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.squared_error += float((x - x_hat).pow(2).sum())
        self.x_sum += x.sum(0).double()
        self.x_sq_sum += x.double().pow(2).sum()
        self.n += x.shape[0]

    @property
    def fvu(self) -> float:
        """Squared error over the variance around the mean: 1 means "no better than the mean"."""
        total_variance = float(self.x_sq_sum - self.x_sum.pow(2).sum() / self.n)
        return self.squared_error / total_variance


def evaluate_run(run_dir: Path, store_dir: Path | None = None, downstream_contexts: int = 64,
                 ablation_samples: int = ABLATION_SAMPLES, probe: bool = True, probe_tasks: Path | None = None,
                 progressive: bool = True) -> dict:
    """Reconstruction metrics (with the progressive-code FVU unless not `progressive`), then
    downstream loss on `downstream_contexts` held-out contexts (0 skips it), then the sparsity of
    ablation effects over `ablation_samples` latents (0 skips it), then the probe loss (unless not
    `probe`: on the held-out contexts labelled by Python's tokenize, or on the labelled texts of
    `probe_tasks`, trainer/probing.py), into metrics.json."""
    texts = read_probe_tasks(Path(probe_tasks)) if probe and probe_tasks is not None else None  # a bad file fails first
    cfg, sae = runfolder.load_sae(run_dir, default_device())
    runfolder.load_metrics(run_dir)  # a damaged metrics.json fails now, not after the whole evaluation
    store_dir = store_dir or cfg.store_dir(run_dir)
    if store_dir is None:
        raise RunFolderError(f"{Path(run_dir) / CFG_FILE}: no activation store; pass --store or run `saescope harvest` first")
    store = complete_heldout(open_store_for_sae(store_dir, cfg, run_dir))  # the first eval on a store computes them
    metrics = evaluate_sae(sae, store, cfg.norm, cfg.positions, progressive=progressive)  # as harvest and the probe read it
    if downstream_contexts > 0:
        metrics |= downstream_loss(sae, cfg, store, downstream_contexts)
    if ablation_samples > 0:
        metrics |= ablation_sparsity_of(sae, cfg, store, ablation_samples)
    if probe:
        metrics |= probe_loss_of(sae, cfg, store, texts, str(probe_tasks) if texts is not None else "")
    runfolder.save_metrics(run_dir, metrics)
    return metrics


# ------------------------------------------------------------ ablation sparsity (Section 4.5)

@torch.no_grad()
def ablation_sparsity_of(sae: TopKSAE, run_cfg: RunConfig, store: ActivationStore, n_samples: int = ABLATION_SAMPLES,
                         n_contexts: int = ABLATION_CONTEXTS) -> dict:
    """The sparsity of ablation effects (trainer.interventions.ablation_sparsity) on the store's
    first held-out contexts, at the positions the metrics count, with the fp32 model the
    downstream loss uses: ablation_sparsity, its random-direction baseline
    ablation_sparsity_random, ablation_samples and ablation_horizon."""
    from trainer.interventions import LatentReader, ablation_sparsity

    lm = run_cfg.language_model(sae.W_dec.device, fast=False)
    first = store.n_train_contexts
    rows = range(first, min(store.n_contexts, first + n_contexts))
    tokens = torch.from_numpy(store.tokens[list(rows)]).long()  # (C, T)
    counted = torch.from_numpy(store.counted(run_cfg.positions, rows.start, rows.stop))  # (C, T)
    return ablation_sparsity(lm, LatentReader(sae, run_cfg.norm, fast=False), tokens, counted, n_samples=n_samples)


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
    differences, and KL(clean || spliced) per token. The reconstruction replaces the residual at
    the positions that count (run_cfg.positions) and leaves the others (the attention sink) as
    they are; the ablation zeroes every position, as before. Blocks 0..L run once per batch, in
    the clean pass; the spliced and ablated passes run only the blocks after L."""
    model = run_cfg.language_model(sae.W_dec.device, fast=False).loaded.causal_lm  # the whole model, fp32
    _, blocks = find_blocks(model.base_model)
    layer, norm = run_cfg.layer, run_cfg.norm
    first = store.n_train_contexts
    rows = range(first, min(store.n_contexts, first + n_contexts))
    tokens = torch.from_numpy(store.tokens[list(rows)]).long().to(sae.W_dec.device)  # (C, T)
    counted = torch.from_numpy(store.counted(run_cfg.positions, rows.start, rows.stop)).to(sae.W_dec.device)  # (C, T)

    def log_probs(ids):
        return model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)

    def reconstruct(resid, mask):
        x, stats = norm.normalize(resid.reshape(-1, resid.shape[-1]).float())
        x_hat = norm.restore(sae(x)[0], stats).view_as(resid).to(resid.dtype)
        return torch.where(mask[..., None], x_hat, resid)  # (B, T, d)

    key = ablated_key(run_cfg, tokens)
    known = read_ablated(store).get(key)  # the summed ablated CE, if an earlier eval on this store made it
    passes = [("ce_spliced", reconstruct)] + ([("ce_ablated", lambda resid, mask: torch.zeros_like(resid))] if known is None else [])
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
            with replaying(blocks, layer, transform(resid, counted[start : start + batch]), output):
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
