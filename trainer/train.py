"""Training a TopK SAE on stored activations (Gao et al. 2024, Section 2)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import corpus, runfolder
from trainer.activations import ActivationStore, build_store, store_matches
from trainer.config import TrainConfig
from trainer.model import ModelError, check_layer, load_language_model
from trainer.sae import TopKLatents, TopKSAE, geometric_median

log = logging.getLogger(__name__)

CHUNK_CONTEXTS = 256  # contexts read from the store at once, then shuffled token by token


class TrainingError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def store_meta(cfg: TrainConfig) -> dict:
    """What identifies a store: runs that agree on these can share it."""
    return {
        "model": cfg.model,
        "layer": cfg.layer,
        "corpus": cfg.corpus,
        "context_length": cfg.context_length,
        "n_heldout": cfg.n_heldout_contexts,
        "n_contexts": cfg.n_train_contexts + cfg.n_heldout_contexts,
        "seed": cfg.seed,
    }


def prepare_store(cfg: TrainConfig, store_dir: Path) -> ActivationStore:
    """Reuse a matching complete store, or tokenize the corpus and run the truncated model."""
    meta = store_meta(cfg)
    if store_matches(store_dir, meta):
        log.info("reusing activations in %s", store_dir)
        return ActivationStore.open(store_dir)
    # Cheap checks first: a bad corpus or layer fails before the model loads.
    check_layer(cfg.model, cfg.layer)
    next(iter(corpus.iter_documents(cfg.corpus)), None)
    log.info("loading %s through block %d", cfg.model, cfg.layer)
    lm = load_language_model(cfg.model, cfg.layer, cfg.device or None)
    log.info("tokenizing %s into %d contexts of %d tokens", cfg.corpus, meta["n_contexts"], cfg.context_length)
    contexts = corpus.tokenize_contexts(
        lm.tokenizer, corpus.iter_documents(cfg.corpus), cfg.context_length, meta["n_contexts"]
    )
    train, heldout = corpus.split_contexts(contexts, cfg.n_heldout_contexts, cfg.seed)
    meta["hookpoint"] = lm.hookpoint
    return build_store(store_dir, lm, torch.cat([train, heldout]), meta)


def input_scale(store: ActivationStore, n_contexts: int = 64) -> float:
    """A fixed scale making E||x||^2 = d_in, so hyperparameters transfer across models and
    layers; stored in cfg.json and applied at training, evaluation, harvest and probing."""
    x = store.rows(0, min(n_contexts, store.n_train_contexts))
    return float((x.shape[1] / x.pow(2).sum(-1).mean()).sqrt())


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    decay_start = int((1 - cfg.decay_fraction) * total_steps)
    scale = min(1.0, (step + 1) / warmup)
    if cfg.decay_fraction > 0 and step >= decay_start:
        scale = min(scale, (total_steps - step) / max(1, total_steps - decay_start))
    return cfg.effective_lr * scale


@dataclass
class StepResult:
    fvu: float
    auxk: float


class Trainer:
    def __init__(self, cfg: TrainConfig, store: ActivationStore, scale: float):
        self.cfg, self.store, self.scale = cfg, store, scale
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.sae = TopKSAE(store.meta["d_model"], cfg.n_latents, cfg.k).to(self.device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.effective_lr, eps=6.25e-10)
        self.tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=self.device)
        self.k_aux = min(store.meta["d_model"] // 2, cfg.n_latents)

    def init_b_dec(self) -> None:
        sample = self.store.rows(0, min(32, self.store.n_train_contexts)) * self.scale
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(sample.to(self.device)))

    def step(self, x: torch.Tensor, lr: float) -> StepResult:
        """One optimiser step on a batch x: (B, d), already normalised."""
        sae = self.sae
        pre = sae.pre_acts(x)  # (B, n)
        values, indices = pre.topk(sae.k, dim=-1, sorted=False)  # (B, k)
        x_hat = sae.decode(TopKLatents(values.relu(), indices))  # (B, d)
        error = x - x_hat
        # Normalised MSE: divided by the variance around the mean (not by mean x^2), so 1.0 is
        # the loss of always predicting the mean; this is FVU.
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / total_variance
        auxk = self.auxk_loss(pre, error.detach(), total_variance)
        loss = fvu + self.cfg.auxk_alpha * auxk

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired[fired] = 0
        return StepResult(float(fvu.detach()), float(auxk.detach()))

    def auxk_loss(self, pre: torch.Tensor, error: torch.Tensor, total_variance: torch.Tensor) -> torch.Tensor:
        """AuxK (Section 2.4 / Appendix A.2): the top-k_aux dead latents reconstruct the residual
        error, which gives dead latents a gradient and brings them back."""
        dead = self.tokens_since_fired > self.cfg.effective_dead_tokens
        n_dead = int(dead.sum())
        if self.cfg.auxk_alpha == 0 or n_dead == 0:
            return pre.new_zeros(())
        k_aux = min(self.k_aux, n_dead)
        values, indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        error_hat = self.sae.decode(TopKLatents(values.relu(), indices)) - self.sae.b_dec
        return (error - error_hat).pow(2).sum() / total_variance

    def batches(self):
        """Chunks of contexts read sequentially from the store, shuffled token by token."""
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        B = self.cfg.batch_size
        for first in range(0, self.store.n_train_contexts, CHUNK_CONTEXTS):
            last = min(first + CHUNK_CONTEXTS, self.store.n_train_contexts)
            chunk = self.store.rows(first, last) * self.scale  # (chunk_tokens, d)
            chunk = chunk[torch.randperm(chunk.shape[0], generator=generator)]
            for start in range(0, chunk.shape[0] - B + 1, B):
                yield chunk[start : start + B].to(self.device)

    def fit(self) -> dict:
        total_steps = self.store.n_train_contexts * self.store.context_length // self.cfg.batch_size
        if total_steps == 0:
            raise TrainingError(f"--batch-size {self.cfg.batch_size} is larger than the training tokens")
        self.init_b_dec()
        start = time.perf_counter()
        bar = tqdm(total=total_steps, desc="train", unit="step")
        fvu_ema = None
        for step, x in enumerate(self.batches()):
            result = self.step(x, learning_rate(self.cfg, step, total_steps))
            if not torch.isfinite(torch.tensor(result.fvu)):
                raise TrainingError(f"loss became {result.fvu} at step {step}; try a lower --lr")
            fvu_ema = result.fvu if fvu_ema is None else 0.9 * fvu_ema + 0.1 * result.fvu
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(fvu=f"{fvu_ema:.3f}", dead=int((self.tokens_since_fired > self.cfg.effective_dead_tokens).sum()))
        bar.close()
        elapsed = time.perf_counter() - start
        return {
            "train_steps": total_steps,
            "train_tokens": total_steps * self.cfg.batch_size,
            "train_fvu_final": fvu_ema,
            "sae_tokens_per_s": total_steps * self.cfg.batch_size / elapsed,
        }


def train(cfg: TrainConfig, out_dir: Path, store_dir: Path | None = None) -> Path:
    """Activations (or a reused store) -> trained SAE -> run folder `out_dir`."""
    out_dir = Path(out_dir)
    store_dir = Path(store_dir) if store_dir else out_dir / "activations"
    began = time.perf_counter()
    try:
        store = prepare_store(cfg, store_dir)
    except (ModelError, corpus.CorpusError) as e:
        raise TrainingError(str(e)) from None
    scale = input_scale(store)
    trainer = Trainer(cfg, store, scale)
    stats = trainer.fit()
    stats["train_wall_s"] = time.perf_counter() - began
    stats["end_to_end_tokens_per_s"] = stats["train_tokens"] / stats["train_wall_s"]
    run_cfg = {
        **cfg.to_dict(),
        "model_name": cfg.model.rstrip("/").split("/")[-1],
        "hookpoint": store.meta.get("hookpoint", f"layers.{cfg.layer}"),
        "d_in": store.meta["d_model"],
        "input_scale": scale,
        "lr_effective": cfg.effective_lr,
        "dead_tokens_effective": cfg.effective_dead_tokens,
        "store": str(store_dir.resolve()),
        "architecture": "topk",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    runfolder.save_sae_weights(out_dir, trainer.sae.state_for_disk())
    runfolder.save_cfg(out_dir, run_cfg)
    runfolder.save_metrics(out_dir, stats)
    return out_dir
