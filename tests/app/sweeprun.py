"""A synthetic sweep folder for the web app's tests: the layout `saescope sweep` writes
(sweep.json, runs/n{n}-k{k} harvested run folders, scaling.json, families.safetensors), with
webrun.py's synthetic rungs and metrics on a known power law, fitted and matched by the trainer's
own trainer.scaling and trainer.families. No model, a second or two."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path


from tests.app.webrun import make_synthetic_run
from trainer import families, runfolder, scaling
from trainer.runconfig import RunConfig

N_SERIES, K = (16, 32, 64, 128), 4
K_SERIES, K_SERIES_N = (2, 8), (32,)
NEIGHBOURS = 3
MODEL = "test/Ladder-Model"


def fvu_law(n: int, k: int) -> float:
    """The rungs' FVU: 0.05 + 0.8 n^-0.5, lower at larger k, and 1 % off the law (so that the fits
    have intervals)."""
    return (0.05 + 0.8 * n ** -0.5) * (k / K) ** -0.2 * (1 + 0.01 * math.sin(n + k))


def training_curve(final_fvu: float) -> dict:
    """metrics.json's train_curve of a rung: the batches' FVU falling to `final_fvu` over 4,096 tokens."""
    tokens = [512, 1024, 2048, 4096]
    return {"tokens": tokens, "fvu": [final_fvu * (4096 / t) ** 0.3 for t in tokens], "dead": [0, 1, 0, 0]}


def make_sweep(folder: Path, seed: int = 0, neighbours: int = NEIGHBOURS) -> Path:
    rungs = sorted({(n, K) for n in N_SERIES} | {(n, k) for n in K_SERIES_N for k in (K, *K_SERIES)})
    names = [f"n{n}-k{k}" for n, k in rungs]
    for (n, k), name in zip(rungs, names):
        run = make_synthetic_run(folder / "runs" / name, n_latents=n, n_examples=4, context_length=16, n_contexts=64,
                                 seed=seed * 1000 + n + k, model=MODEL)
        replace(RunConfig.load(run), k=k).save(run)
        runfolder.save_metrics(run, {"fvu": fvu_law(n, k), "delta_ce": (0.02 + 2 * n ** -0.4) * (1 + 0.01 * math.cos(n)), "l0": float(k),
                                     "dead_fraction": 1 / n if n == max(N_SERIES) else 0.0, "train_tokens": 4096,
                                     "train_curve": training_curve(fvu_law(n, k)),
                                     # sparser effects with more latents, as the paper found (Section 4.5)
                                     "ablation_sparsity": 0.2 * n ** -0.25, "ablation_sparsity_random": 0.3,
                                     # better probes with more latents; the references do not depend on the SAE
                                     "probe_loss": 0.4 - 0.02 * math.log2(n), "probe_residual_loss": 0.35,
                                     "probe_dense_loss": 0.1, "probe_base_entropy": 0.5})
    runfolder.write_json(folder / "sweep.json", {
        "sweep": {"latents": ",".join(map(str, N_SERIES)), "k": K, "ks": ",".join(map(str, K_SERIES)),
                  "k_series_latents": ",".join(map(str, K_SERIES_N)), "family_neighbours": neighbours},
        "train": {"model": MODEL, "layer": 6, "tokens": 4096, "epochs": 3}, "rungs": names})
    scaling.write_scaling(folder, K)
    if neighbours:
        families.write_families(folder, [folder / "runs" / f"n{n}-k{K}" for n in N_SERIES], neighbours)
    return folder


def ladder_id() -> str:
    return f"ladder-model-l6-{min(N_SERIES)}to{max(N_SERIES)}-k{K}"
