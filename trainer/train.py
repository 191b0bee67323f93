"""Training a TopK SAE on stored activations (Gao et al. 2024, Section 2)."""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from trainer import corpus, runfolder
from trainer.config import TrainConfig, check_device
from trainer.distributed import Selection, World, barrier, check_world, training_forward
from trainer.errors import ConfigError, RunFolderError
from trainer.files import read_json
from trainer.formats import SAE_FILE
from trainer.model import ModelError, model_width
from trainer.progress import progress
from trainer.runconfig import CHECKPOINT_FILE, RunConfig, StoreRecord
from trainer.sae import InputNorm, SparseTopK, SubsetLatents, TopKSAE, fast_matmul_dtype, geometric_median, top_k
from trainer.store import META_FILE, ActivationStore, Positions, check_store_not_taken, prepare_store, store_differences, store_matches

log = logging.getLogger(__name__)



# AuxK runs as dense products over the dead latents (Trainer.decode_subset) while they are at
# most this many times the k_aux it chooses from them, else sparsely over the chosen (SparseTopK).
# One thread at B = 256, d = 576, k_aux = 288: dense 2.4-2.9x faster up to 288 dead, 1.3-1.9x
# at 600-1,200, 0.9x at 2,400 (BENCHMARKS.md, "The SAE training step").
SUBSET_LIMIT = 4


class TrainingError(RuntimeError):
    pass


def read_ahead(read, items):
    """(item, read(item)) for each item in order, each read in a background thread while the
    caller works on the item before it. NumPy's gather releases the GIL, so on a GPU reading
    the store overlaps the Python thread that launches the steps."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for item in items:
            future = pool.submit(read, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = item, future
        if pending is not None:
            yield pending[0], pending[1].result()


def use_deterministic_kernels() -> None:
    """For --deterministic on CUDA, where index_add_ (the sparse backward's sums) adds atomically
    in whatever order the threads come: a run and its resume then drift apart in the last bits,
    and after a few hundred steps a different latent wins a TopK here and there."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True)


def chunk_contexts(memory_budget_mb: int, context_length: int, d_model: int) -> int:
    """Contexts read from the store at once: a chunk and its shuffled, scaled copy (fp32) fit in
    --memory-budget-mb."""
    bytes_per_context = 2 * context_length * d_model * 4
    return max(1, memory_budget_mb * 2**20 // bytes_per_context)


def check_batches(cfg: TrainConfig, d_model: int | None) -> None:
    """A batch fits in the training tokens, and in a chunk of --memory-budget-mb (batches are drawn
    within a chunk), checked before any compute. Not in TrainConfig.__post_init__: it needs the
    model's width (its config's, or the store's)."""
    T, B = cfg.context_length, cfg.batch_size
    train_tokens = cfg.n_train_contexts * T
    if B > train_tokens:
        raise ConfigError(f"--batch-size {B:,} is larger than the {train_tokens:,} training tokens "
                          f"(--tokens {cfg.tokens:,} in whole contexts of {T})")
    if d_model is None:
        return
    chunk = min(chunk_contexts(cfg.memory_budget_mb, T, d_model), cfg.n_train_contexts)
    if chunk * T < B:
        needed = math.ceil(math.ceil(B / T) * 2 * T * d_model * 4 / 2**20)
        raise ConfigError(f"--memory-budget-mb {cfg.memory_budget_mb} holds {chunk * T:,} tokens at d_model {d_model}, "
                          f"fewer than one batch of {B:,}: give --memory-budget-mb {needed} or more (or a smaller --batch-size)")


def check_batches_fit(cfg: TrainConfig, store_dir: Path) -> bool:
    """check_batches before any compute, with d_model from the model's config when the store is to
    be built, or from the store's meta.json when it will be reused; returns whether it will be built."""
    built = not store_matches(store_dir, cfg.store_config().meta())  # as prepare_store will decide
    check_batches(cfg, model_width(cfg.model) if built else read_json(Path(store_dir) / META_FILE)["d_model"])
    return built


def input_scale(store: ActivationStore, positions: Positions, n_contexts: int = 64) -> float:
    """A fixed scale making E||x||^2 = d_in over the positions that count, so hyperparameters
    transfer across models and layers; stored in cfg.json and applied at training, evaluation,
    harvest and probing."""
    x = counted_rows(store, positions, min(n_contexts, store.n_train_contexts))
    return float((x.shape[1] / x.pow(2).sum(-1).mean()).sqrt())


def counted_rows(store: ActivationStore, positions: Positions, n_contexts: int) -> torch.Tensor:
    """The first `n_contexts` training contexts' rows at the positions that count: (N, d)."""
    return store.rows(0, n_contexts)[torch.from_numpy(store.counted(positions, 0, n_contexts).reshape(-1))]


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


class Losses(NamedTuple):
    loss: torch.Tensor  # what backward runs on
    squared_error: torch.Tensor  # this rank's sum of squared errors (detached)
    total_variance: torch.Tensor  # of the global batch
    auxk: torch.Tensor  # this rank's share of the AuxK loss (detached)
    selected: Selection  # the latents each token chose, and their pre-activations
    values: torch.Tensor  # (B, k) their activations


class Trainer:
    def __init__(self, cfg: TrainConfig, store: ActivationStore, scale: float, world: World = World()):
        self.cfg, self.store, self.scale, self.world = cfg, store, scale, world
        self.norm = InputNorm(cfg.normalization, scale)
        self.device = world.device(cfg.device)
        if cfg.deterministic and self.device.type == "cuda":
            use_deterministic_kernels()
        torch.manual_seed(cfg.seed)
        # Built whole, then sharded: every number of processes starts from the same weights.
        self.sae = world.shard_module(TopKSAE(store.meta["d_model"], cfg.n_latents, cfg.k)).to(self.device)
        # The fused kernel does Adam's update in one pass over memory: ~5x faster on a CPU.
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.effective_lr, eps=6.25e-10, fused=True)
        self.tokens_since_fired = torch.zeros(self.sae.n_latents, dtype=torch.long, device=self.device)
        self.k_aux = min(store.meta["d_model"] // 2, cfg.n_latents)
        self.matmul_dtype = fast_matmul_dtype(self.device, cfg.fast_matmul)
        self.forward = training_forward(world, self.sae)  # DDP when data parallel
        self.curve = {"tokens": [], "fvu": [], "dead": []}  # metrics.json's train_curve (record)
        # The training positions that count (cfg.positions), flat over the store's training rows.
        self.counted = torch.from_numpy(store.counted(cfg.positions, 0, store.n_train_contexts).reshape(-1))

    def init_b_dec(self) -> None:
        sample, _ = self.norm.normalize(counted_rows(self.store, self.cfg.positions, min(32, self.store.n_train_contexts)))
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(sample.to(self.device)))

    def losses(self, x: torch.Tensor) -> Losses:
        """The step's forward on a batch x: (B, d), already normalised (this rank's share of the
        global batch when data parallel; this rank's latents when sharded)."""
        sae, world = self.sae, self.world
        x_c = world.to_shards(x - sae.b_dec)  # (B, d)
        pre = sae.pre_acts_centered(x_c, self.matmul_dtype)  # (B, n), no grad: only selects
        selected = world.topk(pre, sae.k)  # (B, k)
        x_hat, values = self.decode(x_c, selected)  # (B, d), (B, k)
        error = x - (x_hat + sae.b_dec)
        # Normalised MSE: divided by the variance around the mean (not by mean x^2), so 1.0 is
        # the loss of always predicting the mean; this is FVU. Both sums run over the global batch.
        total_variance = world.batch_variance(x)
        squared_error = error.pow(2).sum()
        auxk = self.auxk_loss(x_c, pre, error.detach(), total_variance)
        loss = squared_error / total_variance + self.cfg.auxk_alpha * auxk
        if self.cfg.multi_topk:  # Multi-TopK: L(k) + L(4k)/8
            x_hat_4k, _ = self.decode(x_c, world.topk(pre, 4 * sae.k))
            loss = loss + (x - x_hat_4k - sae.b_dec).pow(2).sum() / total_variance / 8
        # DDP averages gradients over the ranks; the loss is a sum over all of them.
        loss = loss * world.data_share[1]
        return Losses(loss, squared_error.detach(), total_variance, auxk.detach(), selected, values)

    def step(self, x: torch.Tensor, lr: float) -> StepResult:
        """One optimiser step on a batch x: (B, d), already normalised."""
        losses = self.forward(self.losses, x)
        self.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.sae.set_decoder_norm_to_unit_norm()

        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[losses.selected.indices[losses.values > 0]] = True
        fired = self.world.any(fired)  # fired on any rank's share of the batch
        self.tokens_since_fired += x.shape[0] * self.world.data_share[1]
        self.tokens_since_fired[fired] = 0
        fvu, auxk = self.world.sum(torch.stack([losses.squared_error / losses.total_variance, losses.auxk.float()]))
        return StepResult(float(fvu), float(auxk))

    def decode(self, x_c: torch.Tensor, selected: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat - b_dec from the selected latents (summed over the shards), and their activations."""
        sae = self.sae
        x_hat, values = SparseTopK.apply(
            selected.pre, x_c, sae.W_enc_T, sae.b_enc, sae.W_dec, selected.indices, self.matmul_dtype, True
        )  # W_dec's gradient tangent to its unit rows
        return self.world.from_shards(x_hat), values

    def decode_subset(self, x_c: torch.Tensor, pre: torch.Tensor, subset: torch.Tensor, k: int) -> torch.Tensor:
        """x_hat - b_dec from each token's k largest pre-activations among the latents `subset`
        (this shard's; all of them when there are no more than k): what `decode` gives for that
        selection, as dense matmuls over the subset (SubsetLatents), the latents not chosen at
        zero. Sharded, only for subsets no larger than k over all shards (no top-k across them)."""
        sae, pre_subset = self.sae, pre[:, subset]  # (B, m)
        if len(subset) > k:
            chosen = top_k(pre_subset, k)
            pre_subset = torch.full_like(pre_subset, float("-inf")).scatter_(1, chosen.indices, chosen.values)
        x_hat, _ = SubsetLatents.apply(pre_subset.float(), x_c, sae.W_enc_T, sae.b_enc, sae.W_dec, subset, True)
        return self.world.from_shards(x_hat)

    def auxk_loss(self, x_c: torch.Tensor, pre: torch.Tensor, error: torch.Tensor, total_variance: torch.Tensor) -> torch.Tensor:
        """AuxK (Section 2.4 / Appendix A.2): the top-k_aux dead latents reconstruct the residual
        error, which gives dead latents a gradient and brings them back.

        With cfg.auxk_rescale, each token's reconstruction is first scaled by the factor that fits
        it best (held constant). Unscaled, a few hundred near-random dead latents add up to
        more than the residual, so the gradient pushes every one of them down, and in
        a run of a few hundred steps AuxK killed more latents than it revived (n = 32,768: 7,552
        dead with it, 2,982 without; rescaled 1,840, at the same FVU; BENCHMARKS.md). Scaled, the
        gradient is orthogonal to the reconstruction: it turns the dead latents towards what the
        live ones miss instead of shrinking them all."""
        dead = self.tokens_since_fired > self.cfg.effective_dead_tokens
        n_dead = self.world.count(dead)
        if self.cfg.auxk_alpha == 0 or n_dead == 0:
            return pre.new_zeros(())
        if n_dead <= self.k_aux or (n_dead <= SUBSET_LIMIT * self.k_aux and not self.world.sharded):
            error_hat = self.decode_subset(x_c, pre, dead.nonzero().squeeze(1), self.k_aux)  # (B, d), no b_dec
        else:
            error_hat, _ = self.decode(x_c, self.world.topk(pre.masked_fill(~dead, float("-inf")), self.k_aux))
        if self.cfg.auxk_rescale:
            with torch.no_grad():
                fit = (error * error_hat).sum(-1, keepdim=True) / error_hat.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
            error_hat = fit.clamp_min(0) * error_hat
        return (error - error_hat).pow(2).sum() / total_variance

    @property
    def chunk_contexts(self) -> int:
        return chunk_contexts(self.cfg.memory_budget_mb, self.store.context_length, self.store.meta["d_model"])

    def chunks(self):
        """(first, last) context ranges read from the store at once."""
        size = self.chunk_contexts
        for first in range(0, self.store.n_train_contexts, size):
            yield first, min(first + size, self.store.n_train_contexts)

    @property
    def total_steps(self) -> int:
        T, B = self.store.context_length, self.cfg.batch_size
        return self.cfg.epochs * sum(int(self.counted[first * T : last * T].sum()) // B for first, last in self.chunks())

    def chunk_plan(self, start_step: int = 0):
        """(first context, last context, this rank's token positions in the chunk, the step of its
        first batch) of each chunk, shuffled token by token, once per epoch. The shuffle depends
        only on the seed (each epoch and chunk draws its own), so a resumed run sees exactly the
        batches it would have seen; chunks before `start_step` draw their permutation but are not
        planned. A chunk's tokens beyond its last whole batch are not used."""
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        T, B = self.store.context_length, self.cfg.batch_size
        share, shares = self.world.data_share
        step = 0
        for first, last in (chunk for _ in range(self.cfg.epochs) for chunk in self.chunks()):
            order = torch.randperm((last - first) * T, generator=generator)
            order = order[self.counted[first * T : last * T][order]]  # the positions that count, shuffled
            n_batches = len(order) // B
            if step + n_batches > start_step:
                mine = order[: n_batches * B].view(n_batches, shares, B // shares)[:, share].reshape(-1)
                yield first, last, mine, step
            step += n_batches

    def read_chunk(self, plan: tuple) -> torch.Tensor:
        """A chunk's token rows in the store's precision, in this rank's shuffled order."""
        first, last, mine, _ = plan
        rows = self.store.token_rows(first * self.store.context_length + mine)
        self.store.release(first, last)  # its pages leave this process (the OS cache may keep them)
        return rows

    def batches(self, start_step: int = 0):
        """(step, batch) from `start_step` on. The next chunk is read from the store while this
        one's steps run: on a GPU, reading took as long as the steps (BENCHMARKS.md, "On a GPU")."""
        b = self.cfg.batch_size // self.world.data_share[1]  # this rank's tokens of each batch
        for (_, _, mine, step), rows in read_ahead(self.read_chunk, self.chunk_plan(start_step)):
            # Moved to the device once per chunk, then widened and scaled there: on a GPU a copy
            # per batch cost more than the step itself, and fp16 is half the bytes to move.
            chunk = self.norm.normalize_(rows.to(self.device).float())
            for i in range(max(0, start_step - step), len(mine) // b):
                yield step + i, chunk[i * b : (i + 1) * b]

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, fvu_ema: float | None) -> dict:
        """In the single-process layout (shards gathered: every rank calls this)."""
        return {
            "step": step,  # the next step to run
            "fvu_ema": fvu_ema,
            "curve": {name: list(values) for name, values in self.curve.items()},
            **self.world.gather_state(self.sae, self.optimizer, self.tokens_since_fired),
            "rng": torch.get_rng_state(),
        }

    def restore(self, state: dict) -> tuple[int, float | None]:
        state = self.world.shard_state(state, self.sae)
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        torch.set_rng_state(state["rng"])
        self.curve = state.get("curve", self.curve)  # checkpoints before the curve: it starts here
        return state["step"], state["fvu_ema"]

    # ------------------------------------------------------------ the loop

    def train_step(self, step: int, x: torch.Tensor, total_steps: int, fvu_ema: float | None) -> float:
        result = self.step(x, learning_rate(self.cfg, step, total_steps))
        if not (math.isfinite(result.fvu) and math.isfinite(result.auxk)):
            self.fail(step, f"fvu={result.fvu}")
        return result.fvu if fvu_ema is None else 0.9 * fvu_ema + 0.1 * result.fvu

    def check_weights(self, step: int) -> None:
        """Weights are checked where they are kept (checkpoints, the result), not every step: a
        non-finite weight makes the next step's loss non-finite anyway."""
        if not all(bool(torch.isfinite(p).all()) for p in self.sae.parameters()):
            self.fail(step, "non-finite weights")

    def fail(self, step: int, what: str):
        raise TrainingError(
            f"loss or weights became non-finite at step {step} ({what}); "
            f"the last good checkpoint is kept; try a lower --lr"
        )

    def fit(self, save_checkpoint=None, start_step: int = 0, fvu_ema: float | None = None) -> dict:
        """Train from `start_step`; `save_checkpoint(state)` is called every
        cfg.checkpoint_every steps with weights known to be finite."""
        total_steps = self.total_steps
        if total_steps == 0:
            raise TrainingError(f"--batch-size {self.cfg.batch_size} is larger than the training tokens")
        if start_step == 0:
            self.init_b_dec()
        began = time.perf_counter()
        every_point = max(CURVE_EVERY, math.ceil(total_steps / CURVE_POINTS))
        with progress(total=total_steps, initial=start_step, desc="train", unit="step", disable=not self.world.writes) as bar:
            for step, x in self.batches(start_step):
                fvu_ema = self.train_step(step, x, total_steps, fvu_ema)
                bar.update(1)
                if step % every_point == 0 or step == total_steps - 1:
                    dead = self.record(step, fvu_ema)
                    passes = {"epoch": f"{step * self.cfg.epochs // total_steps + 1}/{self.cfg.epochs}"} if self.cfg.epochs > 1 else {}
                    bar.set_postfix(**passes, fvu=f"{fvu_ema:.3f}", dead=dead, refresh=False)  # shown at the next update
                every = self.cfg.checkpoint_every
                if save_checkpoint and every and (step + 1) % every == 0 and step + 1 < total_steps:
                    self.check_weights(step)
                    save_checkpoint(self.checkpoint(step + 1, fvu_ema))
        self.check_weights(total_steps - 1)
        steps_run = total_steps - start_step
        return {
            "train_steps": total_steps,
            "train_tokens": total_steps * self.cfg.batch_size,
            "train_fvu_final": fvu_ema,
            "sae_tokens_per_s": steps_run * self.cfg.batch_size / max(time.perf_counter() - began, 1e-9),
            "train_curve": self.curve,
        }

    def record(self, step: int, fvu_ema: float) -> int:
        """A point of the training curve after `step`: tokens trained on, the batches' FVU (the
        running mean the progress bar shows) and the latents AuxK counts as dead; returns that count."""
        dead = self.world.count(self.tokens_since_fired > self.cfg.effective_dead_tokens)
        for name, value in (("tokens", (step + 1) * self.cfg.batch_size), ("fvu", fvu_ema), ("dead", dead)):
            self.curve[name].append(value)
        return dead


# Steps between the training curve's points (and the progress bar's numbers); fewer on long runs,
# so that metrics.json holds at most CURVE_POINTS of them.
CURVE_EVERY, CURVE_POINTS = 10, 1000


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Atomically: a SIGKILL during the write leaves the previous checkpoint intact."""
    path = Path(out_dir) / CHECKPOINT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpointer(out_dir: Path, cfg: TrainConfig, store_dir: Path, scale: float, world: World = World()):
    """save_checkpoint for Trainer.fit: the training state plus what `resume` needs to rebuild it
    (rank 0 writes it)."""
    meta = {"cfg": cfg.to_dict(), **StoreRecord.of(store_dir, out_dir).to_json(), "input_scale": scale}
    return lambda state: save_checkpoint(out_dir, {**meta, **state}) if world.writes else None


def train(cfg: TrainConfig, out_dir: Path, store_dir: Path | None = None, world: World = World(),
          replace_store: bool = False) -> Path:
    """Activations (or a reused store) -> trained SAE -> run folder `out_dir`. A complete store of
    another configuration at `store_dir` is an error unless `replace_store`."""
    out_dir = Path(out_dir)
    check_device(cfg.device)
    check_world(cfg, world)
    store_dir = Path(store_dir) if store_dir else out_dir / "activations"
    if not replace_store:  # other runs may read it (a demo or sweep folder keeps one for all its runs)
        check_store_not_taken(store_dir, cfg.store_config())
    began = time.perf_counter()
    try:
        built = check_batches_fit(cfg, store_dir)
        store = prepare_store(cfg.store_config(), store_dir) if world.writes else None
    except (ModelError, corpus.CorpusError) as e:
        raise TrainingError(str(e)) from None
    barrier(world)  # rank 0 built or checked the store; the others open it
    store = store or ActivationStore.open(store_dir)
    scale = input_scale(store, cfg.positions) if cfg.normalization == "scale" else 1.0
    if world.writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts over; an earlier SAE, metrics and harvest here stay usable until
        # this run's weights replace them (finish_run), so a run killed on the way loses nothing.
        (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    trainer = Trainer(cfg, store, scale, world)
    stats = trainer.fit(checkpointer(out_dir, cfg, store_dir, scale, world))
    if built and store.meta.get("forward_seconds"):  # a reused store's forward ran in another run
        stats["forward_tokens_per_s"] = store.n_train_contexts * store.context_length / store.meta["forward_seconds"]
    return finish_run(out_dir, trainer, stats, began, store_dir)


def resume(out_dir: Path, world: World = World()) -> Path:
    """Continue a run killed mid-way from its last checkpoint; ends with the same weights and
    metrics as an uninterrupted run with the same seed."""
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        done = (out_dir / SAE_FILE).exists()
        imported = done and _is_imported(out_dir)
        why = " (an imported SAE: it was not trained here)" if imported else " (the run is already complete)" if done else ""
        raise TrainingError(f"{path}: no checkpoint to resume{why}")
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001: truncated, garbled or not a torch file at all
        raise TrainingError(f"{path}: not a readable checkpoint ({type(e).__name__}); train the run again with --overwrite") from None
    if isinstance(state, dict) and "W_enc" in state.get("sae", {}):  # before W_enc_T: its Adam moments are laid out the other way
        raise TrainingError(f"{path}: a checkpoint of an older saescope (W_enc stored as [d_in, n]); train the run again without --resume")
    if not isinstance(state, dict) or not {"sae", "cfg", "store", "step"} <= state.keys():
        raise TrainingError(f"{path}: not a saescope checkpoint; train the run again with --overwrite")
    cfg = TrainConfig.from_saved(state["cfg"])
    check_device(cfg.device)
    check_world(cfg, world)
    store_dir = StoreRecord.from_json(state).locate(out_dir)
    if not store_dir.exists():
        raise TrainingError(f"{store_dir}: the activation store this run trains on is gone (moved or deleted?); "
                            f"move it back there to resume, or train the run again")
    store = ActivationStore.open(store_dir)
    if differences := store_differences(store_dir, cfg.store_config().meta()):  # replaced since the kill
        raise TrainingError(f"{store_dir} now holds the activations of another configuration ({'; '.join(differences)}) "
                            f"than the run in {out_dir} was trained on: it cannot be resumed on them")
    trainer = Trainer(cfg, store, state["input_scale"], world)
    start_step, fvu_ema = trainer.restore(state)
    log.info("resuming %s at step %d of %d", out_dir, start_step, trainer.total_steps)
    began = time.perf_counter()
    stats = trainer.fit(checkpointer(out_dir, cfg, store_dir, state["input_scale"], world), start_step, fvu_ema)
    return finish_run(out_dir, trainer, stats, began, store_dir)


def _is_imported(run_dir: Path) -> bool:
    try:
        return RunConfig.load(run_dir).imported
    except RunFolderError:
        return False


def finish_run(out_dir: Path, trainer: Trainer, stats: dict, began: float, store_dir: Path) -> Path:
    cfg, store = trainer.cfg, trainer.store
    stats["train_wall_s"] = time.perf_counter() - began
    stats["end_to_end_tokens_per_s"] = stats["train_tokens"] / stats["train_wall_s"]
    if "forward_tokens_per_s" in stats:  # how close the whole run came to the model's forward alone
        stats["end_to_end_ratio_to_forward"] = stats["end_to_end_tokens_per_s"] / stats["forward_tokens_per_s"]
    run_cfg = RunConfig.from_training(cfg, d_in=store.meta["d_model"], input_scale=trainer.scale,
                                      hookpoint=store.meta.get("hookpoint"), store=StoreRecord.of(store_dir, out_dir))
    weights = {name: trainer.world.gather_tensor(name, t) for name, t in trainer.sae.state_for_disk().items()}
    barrier(trainer.world)
    if not trainer.world.writes:
        return out_dir
    # An earlier run's metrics and harvest describe other weights. The checkpoint goes last: until
    # then a run killed here finishes again with --resume.
    (out_dir / runfolder.METRICS_FILE).unlink(missing_ok=True)
    runfolder.drop_harvest(out_dir)
    runfolder.save_sae_weights(out_dir, weights)
    run_cfg.save(out_dir)
    runfolder.save_metrics(out_dir, stats)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # the run folder now holds the result
    return out_dir
