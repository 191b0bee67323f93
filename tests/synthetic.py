"""A random but self-consistent harvest in the real format, for tests and benchmarks that need a
run folder without a model (tests/app/webrun.py builds the web app's runs on it)."""

from __future__ import annotations

import numpy as np
import torch

from trainer.runfolder import HARVEST_VERSION, Harvest


def random_harvest(n: int, vocab: list[str], K: int = 5, T: int = 16, C: int = 40, Q: int = 10, S: int = 5,
                   H: int = 32, L: int = 10, M: int = 10, tokens_per_latent: int = 3, seed: int = 0) -> Harvest:
    """Every latent fires (densities in (0, 5 %)), examples sorted as the harvest sorts them,
    quantile edges increasing, neighbours other latents; numpy only, fast at 65,536 latents."""
    rng = np.random.default_rng(seed)
    V = len(vocab)

    def descending(shape):
        return -np.sort(-rng.random(shape, dtype=np.float32), axis=-1)

    top_activations = (rng.random((n, K, T), dtype=np.float32) * 4).astype(np.float16)
    top_max = top_activations.max(-1).astype(np.float32)  # (n, K)
    order = np.argsort(-top_max, axis=1, kind="stable")
    top_max = np.take_along_axis(top_max, order, 1)
    top_activations = np.take_along_axis(top_activations, order[..., None], 1)
    max_activation = top_max[:, 0].copy()
    edges = np.sort(rng.random((n, Q + 1), dtype=np.float32), axis=1) * max_activation[:, None]
    edges[:, -1] = max_activation
    quantile_activations = (rng.random((n, Q, S, T), dtype=np.float32) * max_activation[:, None, None, None]).astype(np.float16)
    R = n * tokens_per_latent
    arrays = {
        "density": rng.random(n, dtype=np.float32) * 0.05 + 1e-6,
        "max_activation": max_activation,
        "mean_activation": max_activation / 3,
        "histogram": rng.integers(0, 100, (n, H)),
        "quantile_edges": edges,
        "quantile_share": np.full((n, Q), 1 / Q, dtype=np.float32),
        "logit_top_ids": rng.integers(0, V, (n, L)),
        "logit_top_values": descending((n, L)),
        "logit_bottom_ids": rng.integers(0, V, (n, L)),
        "logit_bottom_values": -descending((n, L)),
        "logit_histogram": rng.integers(0, 1000, (n, H)),
        "logit_range": np.stack([-np.ones(n, dtype=np.float32), np.ones(n, dtype=np.float32)], 1),
        "neighbour_index": (np.arange(n)[:, None] + rng.integers(1, max(n, 2), (n, M))) % n,
        "neighbour_cosine": descending((n, M)),
        "top_context": rng.integers(0, C, (n, K)),
        "top_activations": top_activations,
        "top_max": top_max,
        "quantile_context": rng.integers(0, C, (n, Q, S)),
        "quantile_activations": quantile_activations,
        "quantile_value": quantile_activations.max(-1).astype(np.float32),
        "quantile_position": rng.integers(0, T, (n, Q, S)),
        "token_ids": rng.integers(0, V, (C, T), dtype=np.int32),
        # distinct tokens per latent: (token, latent) is the search table's key
        "token_id": ((rng.integers(0, V, n)[:, None] + np.arange(tokens_per_latent)) % V).reshape(R),
        "token_latent": np.repeat(np.arange(n), tokens_per_latent),
        "token_mean_activation": rng.random(R, dtype=np.float32),
        "token_fire_rate": rng.random(R, dtype=np.float32),
        "token_occurrences": rng.integers(1, 1000, R),
    }
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    explanations = [
        {"text": f"⟦{vocab[t]}⟧", "patterns": [[int(t)]], "precision": float(p), "recall": float(r),
         "f1": float(2 * p * r / (p + r)), "matches": 100, "firings": 80}
        for t, p, r in zip(rng.integers(0, V, n), rng.random(n) * 0.9 + 0.05, rng.random(n) * 0.9 + 0.05)
    ]
    info = {"version": HARVEST_VERSION, "n_tokens": C * T, "n_contexts": C, "context_length": T, "top_k": K,
            "quantile_bins": Q, "samples_per_bin": S, "seed": seed, "excluded_positions": [0],
            "excluded_token_ids": []}
    return Harvest(tensors=tensors, explanations=explanations, vocab=vocab, info=info)
