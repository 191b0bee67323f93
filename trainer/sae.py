"""The TopK sparse autoencoder of Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

    z     = ReLU(TopK(W_enc^T (x - b_dec) + b_enc))      (Section 2.3)
    x_hat = W_dec^T z + b_dec

Tensor names and layouts follow SAELens: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in].
The decoder is evaluated sparsely (only the k chosen rows of W_dec are read per token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TopKLatents(NamedTuple):
    values: torch.Tensor  # (N, k) post-ReLU activations of the chosen latents
    indices: torch.Tensor  # (N, k) which latents


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_latents: int, k: int):
        super().__init__()
        if not 0 < k < n_latents:
            raise ValueError(f"k must be between 1 and n_latents - 1, got k={k}, n_latents={n_latents}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        # Random unit-norm decoder rows; the encoder starts as the decoder's transpose,
        # which the paper found to prevent most dead latents (Section 2.4).
        W_dec = F.normalize(torch.randn(n_latents, d_in), dim=-1)
        self.W_dec = nn.Parameter(W_dec)  # (n, d)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # (d, n)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))  # (n,)
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # (d,)

    # ------------------------------------------------------------ forward

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc  # (N, n)

    def encode(self, x: torch.Tensor, k: int | None = None) -> TopKLatents:
        values, indices = self.pre_acts(x).topk(k or self.k, dim=-1, sorted=False)  # (N, k)
        return TopKLatents(F.relu(values), indices)

    def decode(self, latents: TopKLatents) -> torch.Tensor:
        # embedding_bag sums the k chosen decoder rows weighted by their activations,
        # without materialising an (N, k, d) tensor.
        x_hat = F.embedding_bag(latents.indices, self.W_dec, per_sample_weights=latents.values, mode="sum")
        return x_hat + self.b_dec  # (N, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, TopKLatents]:
        latents = self.encode(x)
        return self.decode(latents), latents

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """All n latent activations, zeros where not in the top k: (N, n)."""
        latents = self.encode(x)
        z = x.new_zeros(x.shape[0], self.n_latents)
        return z.scatter_(-1, latents.indices, latents.values)

    # ------------------------------------------------------------ decoder geometry

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data = F.normalize(self.W_dec.data, dim=-1)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Keep each decoder row on the unit sphere to first order (Section 2.4, Appendix A.4)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(-1, keepdim=True)  # (n, 1)
        self.W_dec.grad -= parallel * self.W_dec.data

    # ------------------------------------------------------------ (de)serialisation

    def state_for_disk(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().float().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

    @classmethod
    def load(cls, run_dir, device: str | torch.device = "cpu") -> tuple[dict, "TopKSAE"]:
        """The run folder's cfg.json and its SAE, ready for inference."""
        from trainer import runfolder

        cfg = runfolder.load_cfg(run_dir)
        sae = cls.from_weights(runfolder.load_sae_weights(run_dir, cfg), cfg["k"])
        return cfg, sae.to(device).eval().requires_grad_(False)

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], k: int) -> "TopKSAE":
        d_in, n_latents = weights["W_enc"].shape
        sae = cls(d_in, n_latents, k)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(weights[name])
        return sae


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x.
    The paper initialises b_dec (their b_pre) this way (Section 2.4)."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=-1).clamp_min(eps)  # (N,)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() < eps * median.norm().clamp_min(1):
            return new
        median = new
    return median
