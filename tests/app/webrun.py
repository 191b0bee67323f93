"""Synthetic run folders for the web app's tests, in the real format (tests/synthetic.py's
random_harvest, written with trainer.runfolder's own save functions), no model needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.synthetic import random_harvest
from trainer.runconfig import RunConfig
from trainer.runfolder import Harvest, save_harvest, save_metrics, save_sae_weights

N_LATENTS, TOP_K, T, N_CONTEXTS, D_IN = 64, 5, 16, 40, 8
QUANTILE_BINS, SAMPLES_PER_BIN = 4, 3
VOCAB = ["<|bos|>", " the", " cat", " sat", "\n", "<script>", "alert(1)", "</script>", " on", " mat",
         "def", " f", "(", ")", ":", "    return", " 1", "&amp;", " \"quoted\"", "  two spaces", " def"]
SCRIPT_CONTEXT = 0  # context 0 holds <script>alert(1)</script>; latent 0's top example
DEAD = (62, 63)  # latents that never fire: no examples, no explanation
FEW = 1  # a latent that fired in only three contexts
CAT = 2  # the best explanation that mentions " cat"
DEF_TOKEN, DEF_LATENT = VOCAB.index(" def"), 3  # latent 3 fires most on " def"
HOSTILE_EXPLANATION = "<script>⟦alert(1)⟧"  # latent 0's explanation: markup that must stay text
WEAK = 4  # a latent whose explanation scores F1 0.05 on held-out text (shown dimmed)


def make_cfg(model: str = "./models/Tiny-Model", d_in: int = D_IN, layer: int = 3) -> RunConfig:
    return RunConfig(model=model, layer=layer, d_in=d_in, n_latents=N_LATENTS, k=TOP_K)


# metrics.json's training curve as trainer.train.Trainer.record writes it (a point every 10 steps of 64 tokens).
TRAIN_CURVE = {"tokens": [64, 704, 1344, 1984, 2624, 3264, 3904, 4096], "fvu": [1.2, 0.8, 0.5, 0.4, 0.33, 0.3, 0.28, 0.27],
               "dead": [0, 0, 3, 7, 5, 2, 1, 1]}


def make_run(run_dir: Path, seed: int = 0, model: str = "./models/Tiny-Model", d_in: int = D_IN, layer: int = 3) -> Path:
    """The tests' main run: 64 latents with known cases (see the constants above); `seed`
    changes the weights and the harvest (hence the content hash), `model`/`d_in`/`layer` point
    it at a real model so that the probe can run its random weights (the default names a folder
    no server has, so the probe says at once that it cannot run)."""
    make_cfg(model, d_in, layer).save(run_dir)
    write_weights(run_dir, d_in, N_LATENTS, seed)
    save_metrics(run_dir, {"fvu": 0.2345, "l0": 5.0, "dead_fraction": len(DEAD) / N_LATENTS, "delta_ce": float("nan"),
                           "eval_tokens": 2048, "train_tokens": 4096, "train_curve": TRAIN_CURVE})
    harvest = random_harvest(N_LATENTS, VOCAB, K=TOP_K, T=T, C=N_CONTEXTS, Q=QUANTILE_BINS, S=SAMPLES_PER_BIN, seed=seed)
    h = {name: tensor.numpy() for name, tensor in harvest.tensors.items()}
    h["token_ids"][SCRIPT_CONTEXT, 2:5] = [5, 6, 7]  # "<script>", "alert(1)", "</script>"
    h["token_ids"][SCRIPT_CONTEXT, 6] = 4  # a newline token
    h["top_activations"][:, :, ::3] = 0  # some tokens do not fire at all
    h["top_context"][0, 0] = SCRIPT_CONTEXT
    h["top_activations"][0, 0, 3] = 5.0  # latent 0 peaks on "alert(1)"
    h["quantile_edges"][0, -1] = 5.0
    h["top_context"][FEW, 3:] = -1
    h["quantile_context"][FEW, 0, 1:] = -1  # and its lowest bin has one sample
    dead = list(DEAD)
    for name in ("top_context", "quantile_context"):
        h[name][dead] = -1
    for name in ("density", "top_activations", "quantile_activations", "quantile_value", "histogram",
                 "quantile_edges", "quantile_share"):
        h[name][dead] = 0
    h["top_activations"][h["top_context"] < 0] = 0
    h["mean_activation"][dead] = float("nan")  # a dead latent's mean over zero firings
    sort_top_examples(h)
    h["mean_activation"][:] = np.where(np.isnan(h["mean_activation"]), np.nan, h["max_activation"] / 3)
    keep = ~np.isin(h["token_latent"], dead)  # a dead latent fires on no token
    for name in ("token_id", "token_latent", "token_mean_activation", "token_fire_rate", "token_occurrences"):
        h[name] = h[name][keep]
    h["token_id"][h["token_latent"] == DEF_LATENT] = [DEF_TOKEN, 0, 1]
    h["token_mean_activation"][h["token_latent"] == DEF_LATENT] = 3.0  # above every random one (< 1)

    explanations = harvest.explanations
    explanations[0] = explanation(HOSTILE_EXPLANATION, [[5, 6]], 0.9, 0.5)
    explanations[CAT] = explanation("the⟦ cat⟧", [[1, 2]], 0.99, 0.98)
    explanations[WEAK] = explanation("⟦ on⟧", [[8]], 0.06, 0.045)
    for latent in dead:
        explanations[latent] = explanation("", [], None, None)
    info = {**harvest.info, "n_tokens": 10_000, "excluded_positions": [0], "excluded_token_ids": [0],
            "explanation": {"method": "token n-gram patterns, scored on held-out contexts", "heldout_contexts": 12}}
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in h.items()}
    save_harvest(run_dir, Harvest(tensors=tensors, explanations=explanations, vocab=VOCAB, info=info))
    return run_dir


def explanation(text: str, patterns: list, precision: float | None, recall: float | None) -> dict:
    f1 = None if precision is None or recall is None else 2 * precision * recall / (precision + recall)
    return {"text": text, "patterns": patterns, "precision": precision, "recall": recall, "f1": f1,
            "matches": 0 if precision is None else 100, "firings": 0 if recall is None else 90}


def sort_top_examples(h: dict) -> None:
    """After editing top activations: each context's max, the slots sorted by it (empty slots
    last), and the latent's max activation, as the harvest writes them."""
    top_max = np.where(h["top_context"] >= 0, h["top_activations"].max(-1).astype(np.float32), -1)
    order = np.argsort(-top_max, axis=1, kind="stable")
    for name in ("top_context", "top_activations"):
        h[name] = np.take_along_axis(h[name], order if h[name].ndim == 2 else order[..., None], 1)
    h["top_max"] = np.maximum(np.take_along_axis(top_max, order, 1), 0)
    h["max_activation"] = h["top_max"][:, 0].copy()


def write_weights(run_dir: Path, d_in: int, n_latents: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    save_sae_weights(run_dir, {
        "W_enc": torch.from_numpy(rng.standard_normal((d_in, n_latents), dtype=np.float32)),
        "b_enc": torch.zeros(n_latents),
        "W_dec": torch.from_numpy(rng.standard_normal((n_latents, d_in), dtype=np.float32)),
        "b_dec": torch.zeros(d_in),
    })


def make_synthetic_run(run_dir: Path, n_latents: int, n_examples: int, context_length: int = 64,
                       n_contexts: int | None = None, vocab: list[str] | None = None, seed: int = 0,
                       model: str = "test/Synthetic-Model", quantile_bins: int = 4, samples_per_bin: int = 2) -> Path:
    """A run of any size in the real format (for the kill test and the benchmarks): every latent
    has `n_examples` top contexts and `quantile_bins` x `samples_per_bin` quantile examples drawn
    from `n_contexts`. Built with numpy in seconds even at 65,536 latents."""
    n_contexts = n_contexts or n_latents
    vocab = vocab or [f" tok{i}" for i in range(1000)]
    d_in = 8
    k = min(32, n_latents // 2)  # a valid TopK even for the tiny ones
    RunConfig(model=model, layer=6, d_in=d_in, n_latents=n_latents, k=k).save(run_dir)
    write_weights(run_dir, d_in, n_latents, seed)
    save_metrics(run_dir, {"fvu": 0.1, "l0": float(k), "dead_fraction": 0.0})
    save_harvest(run_dir, random_harvest(n_latents, vocab, K=n_examples, T=context_length, C=n_contexts,
                                         Q=quantile_bins, S=samples_per_bin, seed=seed))
    return run_dir


def table_counts(database_url: str) -> dict[str, int]:
    """Rows per table of a loaded database."""
    from sqlalchemy import func, select

    from app.db import make_engine
    from app.models import Context, Example, ExplanationTerm, Latent, LatentDetail, Sae, TokenLatent, Vocab

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return {t.__tablename__: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in (Sae, Latent, LatentDetail, Context, Example, Vocab, TokenLatent, ExplanationTerm)}
    finally:
        engine.dispose()
