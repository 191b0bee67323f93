"""A ladder of SAEs on one activation store, fitted to scaling laws (Gao et al. 2024, Section 3).

    DIR/
      sweep.json             the sweep's config and the shared training config
      activations/           the activation store every rung trains and evaluates on
      runs/n{n}-k{k}/        one normal run folder per rung (cfg.json, sae.safetensors, metrics.json,
                             harvest/: each rung is harvested from the shared store, for the web app)
      scaling.json           fits of FVU and ΔCE against n and (n, k): trainer/scaling.py
      families.safetensors   each latent's nearest latents in the other sizes: trainer/families.py

Rerunning the same sweep resumes it: finished rungs (weights and held-out metrics present, cfg
unchanged) are skipped, a rung killed mid-training continues from its checkpoint, a rung trained
but not evaluated is evaluated, a rung without a current harvest is harvested. A rung whose config
changed (other --tokens, say) is retrained; its old weights, metrics and harvest stay until the new
weights replace them (trainer.train.finish_run), and it is harvested again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from trainer import families, runfolder, scaling
from trainer.config import SweepConfig, TrainConfig
from trainer.errors import ConfigError
from trainer.evaluate import evaluate_run
from trainer.files import write_json
from trainer.formats import CFG_FILE, SAE_FILE
from trainer.harvest import harvest_run
from trainer.runconfig import CHECKPOINT_FILE, RunConfig
from trainer.store import check_store_not_taken, prepare_store
from trainer.train import check_batches_fit, resume, train

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
STORE_DIR = "activations"
RUNS_DIR = "runs"


def rung_name(n_latents: int, k: int) -> str:
    return f"n{n_latents}-k{k}"


def rung_configs(sweep: SweepConfig, base: TrainConfig) -> dict[str, TrainConfig]:
    """Every rung's training config, validated (a rung with k >= n fails here, before compute)."""
    return {rung_name(n, k): replace(base, n_latents=n, k=k) for n, k in sweep.rungs()}


def trained_with(run: Path, cfg: TrainConfig) -> bool:
    """The run folder holds finished weights trained with exactly `cfg` (an option added since it
    was trained counts as what the run did: TrainConfig.from_saved)."""
    if not (run / SAE_FILE).exists() or not (run / CFG_FILE).exists():
        return False
    return trains_as(RunConfig.load(run).train, cfg)


def checkpoint_of(run: Path, cfg: TrainConfig) -> bool:
    """The run folder holds a checkpoint of a training with exactly `cfg` (the same rule as
    trained_with)."""
    path = run / CHECKPOINT_FILE
    return path.is_file() and trains_as(TrainConfig.from_saved(torch.load(path, weights_only=False, map_location="cpu")["cfg"]), cfg)


def trains_as(saved: TrainConfig | None, cfg: TrainConfig) -> bool:
    """A saved training is `cfg`'s when their options agree once each rule (an option's 0) is
    replaced by the value it gives."""
    return saved is not None and saved.resolved() == cfg.resolved()


def run_rung(run: Path, cfg: TrainConfig, store_dir: Path, downstream_contexts: int, ablation_samples: int = 0) -> str:
    """Bring one rung to trained and evaluated; returns what it did."""
    if trained_with(run, cfg):
        if "fvu" in runfolder.load_metrics(run):
            return "done before"
        done = "evaluated"
    else:  # train() removes the old weights' harvest when it writes the new ones
        if checkpoint_of(run, cfg):
            resume(run)
            done = "resumed, evaluated"
        else:
            train(cfg, run, store_dir)
            done = "trained, evaluated"
    evaluate_run(run, store_dir, downstream_contexts, ablation_samples)
    return done


def harvest_rung(run: Path, store_dir: Path) -> str:
    """Harvest a rung from the shared store (its feature pages in the app), unless its harvest is
    current; harvest.json is written last, so a harvest killed midway is made again."""
    if runfolder.harvest_is_current(run):
        return "harvested before"
    harvest_run(run, store_dir=store_dir)
    return "harvested"


def run_sweep(sweep: SweepConfig, base: TrainConfig, out_dir: Path) -> dict:
    """Train, evaluate and harvest every rung, then fit the scaling laws and match feature families."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: a file, not a folder")
    if (out_dir / CFG_FILE).exists():  # sweep.json beside it would make `load` read it as a sweep
        raise ConfigError(f"--out {out_dir} is a run folder (it has {CFG_FILE}): give the sweep a folder of its own")
    configs = rung_configs(sweep, base)
    store_dir = out_dir / STORE_DIR
    for cfg in configs.values():  # a rung that cannot train fails now, not after the store is built
        check_batches_fit(cfg, store_dir)
    check_store_not_taken(store_dir, base.store_config())  # the rungs trained on it would read another configuration's
    began = time.perf_counter()
    prepare_store(base.store_config(), store_dir)  # checks the layer and the corpus before the model runs
    log.info("activation store ready in %.0f s", time.perf_counter() - began)
    # Only now, with every check passed: sweep.json makes `load` read the folder as this sweep.
    write_json(out_dir / SWEEP_FILE, {"sweep": sweep.to_dict(), "train": base.to_dict(), "rungs": list(configs)})
    for i, (name, cfg) in enumerate(configs.items()):
        started = time.perf_counter()
        done = run_rung(out_dir / RUNS_DIR / name, cfg, store_dir, sweep.downstream_contexts, sweep.ablation_samples)
        done += ", " + harvest_rung(out_dir / RUNS_DIR / name, store_dir)
        metrics = runfolder.load_metrics(out_dir / RUNS_DIR / name)
        log.info("[%d/%d] %s: %s in %.0f s, fvu %.4f, dead %.2f %%", i + 1, len(configs), name, done,
                 time.perf_counter() - started, metrics["fvu"], 100 * metrics["dead_fraction"])
    result = scaling.write_scaling(out_dir, sweep.k)
    if sweep.family_neighbours:
        n_series = [out_dir / RUNS_DIR / rung_name(n, sweep.k) for n in sweep.n_series]
        families.write_families(out_dir, n_series, sweep.family_neighbours)
    log.info("sweep finished in %.0f s", time.perf_counter() - began)
    return result
