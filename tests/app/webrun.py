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
