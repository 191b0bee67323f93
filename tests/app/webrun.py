"""A small synthetic run folder for the web app's tests, written with trainer.runfolder's own
save functions (the real format, no model needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.runfolder import Harvest, save_cfg, save_harvest, save_metrics, save_sae_weights

N_LATENTS, TOP_K, T, N_CONTEXTS, D_IN = 64, 5, 16, 40, 8
VOCAB = ["<|bos|>", " the", " cat", " sat", "\n", "<script>", "alert(1)", "</script>", " on", " mat",
         "def", " f", "(", ")", ":", "    return", " 1", "&amp;", " \"quoted\"", "  two spaces"]
SCRIPT_CONTEXT = 0  # context 0 holds <script>alert(1)</script>; latent 0's top example
DEAD = (62, 63)  # latents that never fire: no examples


def make_cfg() -> dict:
    return {"model": "test/Tiny-Model", "layer": 3, "d_in": D_IN, "n_latents": N_LATENTS, "k": TOP_K,
            "context_length": T, "seed": 0}


def make_run(run_dir: Path, seed: int = 0) -> Path:
    """A complete, consistent run folder; `seed` changes the weights (hence the content hash)."""
    g = torch.Generator().manual_seed(seed)
    cfg = make_cfg()
    save_cfg(run_dir, cfg)
    save_sae_weights(run_dir, {
        "W_enc": torch.randn(D_IN, N_LATENTS, generator=g), "b_enc": torch.zeros(N_LATENTS),
        "W_dec": torch.randn(N_LATENTS, D_IN, generator=g), "b_dec": torch.zeros(D_IN),
    })
    save_metrics(run_dir, {"fvu": 0.2345, "l0": 5.0, "dead_fraction": len(DEAD) / N_LATENTS, "delta_ce": float("nan")})

    token_ids = torch.randint(0, len(VOCAB), (N_CONTEXTS, T), generator=g, dtype=torch.int64)
    token_ids[SCRIPT_CONTEXT, 2:5] = torch.tensor([5, 6, 7])  # "<script>", "alert(1)", "</script>"
    token_ids[SCRIPT_CONTEXT, 6] = 4  # a newline token
    top_context = torch.randint(0, N_CONTEXTS, (N_LATENTS, TOP_K), generator=g)
    top_context[0, 0] = SCRIPT_CONTEXT
    top_context[1, 3:] = -1  # latent 1 fired in only 3 contexts
    top_context[list(DEAD)] = -1
    top_activations = torch.rand(N_LATENTS, TOP_K, T, generator=g) * 2
    top_activations[:, :, ::3] = 0  # some tokens not firing at all
    top_activations[0, 0, 3] = 5.0  # latent 0 peaks on "alert(1)"
    top_activations[top_context < 0] = 0
    top_max = top_activations.amax(-1)
    top_max, order = top_max.sort(dim=1, descending=True)
    top_context = top_context.gather(1, order)
    top_activations = top_activations.gather(1, order[..., None].expand(-1, -1, T))
    max_activation = top_max[:, 0].clone()
    density = torch.rand(N_LATENTS, generator=g) * 0.1
    density[list(DEAD)] = 0
    mean_activation = max_activation / 3
    mean_activation[list(DEAD)] = float("nan")  # a dead latent's mean over zero firings
    save_harvest(run_dir, Harvest(
        density=density, max_activation=max_activation, mean_activation=mean_activation,
        top_context=top_context, top_activations=top_activations, top_max=top_max,
        token_ids=token_ids.to(torch.int32), vocab=VOCAB,
        info={"n_tokens": 10_000, "top_k": TOP_K, "context_length": T},
    ))
    return run_dir


def make_synthetic_run(run_dir: Path, n_latents: int, n_examples: int, context_length: int = 64,
                       n_contexts: int | None = None, vocab: list[str] | None = None, seed: int = 0,
                       model: str = "test/Synthetic-Model") -> Path:
    """A run of any size in the real format (for the kill test and the benchmarks): every latent
    has `n_examples` top contexts drawn from `n_contexts`, activations random, sorted as the
    harvest sorts them. Built with numpy in a few seconds even at 65,536 x 50."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_contexts = n_contexts or n_latents
    vocab = vocab or [f" tok{i}" for i in range(1000)]
    d_in = 8
    cfg = {"model": model, "layer": 6, "d_in": d_in, "n_latents": n_latents, "k": 32,
           "context_length": context_length, "seed": seed}
    save_cfg(run_dir, cfg)
    save_sae_weights(run_dir, {
        "W_enc": torch.from_numpy(rng.standard_normal((d_in, n_latents), dtype=np.float32)),
        "b_enc": torch.zeros(n_latents),
        "W_dec": torch.from_numpy(rng.standard_normal((n_latents, d_in), dtype=np.float32)),
        "b_dec": torch.zeros(d_in),
    })
    save_metrics(run_dir, {"fvu": 0.1, "l0": 32.0, "dead_fraction": 0.0})
    token_ids = rng.integers(0, len(vocab), (n_contexts, context_length), dtype=np.int32)
    top_context = rng.integers(0, n_contexts, (n_latents, n_examples))
    top_activations = (rng.random((n_latents, n_examples, context_length), dtype=np.float32) * 4).astype(np.float16)
    top_max = top_activations.max(-1).astype(np.float32)  # (n, K)
    order = np.argsort(-top_max, axis=1, kind="stable")
    top_max = np.take_along_axis(top_max, order, 1)
    top_context = np.take_along_axis(top_context, order, 1)
    top_activations = np.take_along_axis(top_activations, order[..., None], 1)
    density = rng.random(n_latents, dtype=np.float32) * 0.05
    save_harvest(run_dir, Harvest(
        density=torch.from_numpy(density), max_activation=torch.from_numpy(top_max[:, 0].copy()),
        mean_activation=torch.from_numpy(top_max[:, 0] / 3), top_context=torch.from_numpy(top_context),
        top_activations=torch.from_numpy(top_activations), top_max=torch.from_numpy(top_max),
        token_ids=torch.from_numpy(token_ids), vocab=vocab,
        info={"n_tokens": n_contexts * context_length, "top_k": n_examples, "context_length": context_length},
    ))
    return run_dir


def table_counts(database_url: str) -> dict[str, int]:
    """Rows per table of a loaded database."""
    from sqlalchemy import func, select

    from app.db import make_engine
    from app.models import Context, Example, Latent, Sae

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return {t.__tablename__: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in (Sae, Latent, Context, Example)}
    finally:
        engine.dispose()
