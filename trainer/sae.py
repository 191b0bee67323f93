"""The TopK sparse autoencoder of Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

    z     = ReLU(TopK(W_enc^T (x - b_dec) + b_enc))      (Section 2.3)
    x_hat = W_dec^T z + b_dec

Tensor names and layouts follow SAELens: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in]
(W_enc is a view: the parameter is its contiguous transpose W_enc_T [n, d_in]).
The decoder is evaluated sparsely (only the k chosen rows of W_dec are read per token).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError


class TopKLatents(NamedTuple):
    values: torch.Tensor  # (N, k) post-ReLU activations of the chosen latents
    indices: torch.Tensor  # (N, k) which latents


# gather_dot relies on a CSR pattern (sampled_addmm), which is stable; the beta notice would print on every run,
# and so would (torch 2.11 on CUDA) a notice that the pattern's invariant checks are off, which they are on purpose.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class SelectionPattern:
    """Which latents each token selected, sorted by latent (the CSR form of the sparse (n, N)
    matrix S with S[latent, token] = 1 where the token chose the latent); built once per step and
    shared by the encoder's and the decoder's weight gradients."""

    def __init__(self, indices: torch.Tensor, n_latents: int):
        N, k = indices.shape
        latents = indices.reshape(-1)
        # A stable (radix) sort of int32: PyTorch's default CPU sort is ~100x slower on top-k
        # indices (measured: 62 ms against 0.5 ms for 32k of them).
        self.order = torch.sort(latents.int(), stable=True).indices
        self.tokens = torch.arange(N, device=indices.device).repeat_interleave(k)[self.order]
        self.starts = torch.zeros(n_latents, dtype=torch.long, device=indices.device)
        self.starts[1:] = torch.bincount(latents, minlength=n_latents)[:-1].cumsum(0)

    def product(self, values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n, d): row l is the sum of values[t, slot] * y[t] over the tokens t that chose l in that
        slot, i.e. S @ y with S holding `values` (N, k). One embedding_bag with a bag per latent:
        12x faster on this CPU than a CSR @ dense product, which zero-fills and then copies its
        (n, d) result."""
        return F.embedding_bag(self.tokens, y, self.starts, mode="sum", per_sample_weights=values.reshape(-1)[self.order])


def gather_dot(rows: torch.Tensor, indices: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[i, j] = rows[indices[i, j]] · y[i]: (N, k). On a GPU in bf16, one dense matmul then a
    gather; otherwise exact fp32 dot products at those (i, j) only: a sampled dense-dense product
    over the CSR pattern of `indices` (on this CPU 14x faster than gathering the rows into an
    (N, k, d) copy for bmm, and 7x faster than the dense bf16 matmul it replaces)."""
    if dtype != torch.float32 and y.is_cuda:
        return (y.to(dtype) @ rows.T.to(dtype)).gather(1, indices).float()
    N, k = indices.shape
    pattern = torch.sparse_csr_tensor(
        torch.arange(0, N * k + 1, k, device=y.device), indices.reshape(-1), y.new_zeros(N * k), (N, rows.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, y.float(), rows.T.float(), beta=0.0).values().view(N, k)


class SparseTopK(torch.autograd.Function):
    """x_hat - b_dec = W_dec^T ReLU(pre[indices]) for the chosen latents, where pre = x_c @ W_enc
    + b_enc was computed without grad (to select them). The backward pass touches only the N·k
    selected (token, latent) pairs of W_enc and W_dec: O(N·k·d) instead of the dense O(N·n·d).
    Takes W_enc_T, (n, d), and gives its gradient in that layout. With `unit_decoder`, W_dec's
    gradient comes with each row's component along that row removed, as training needs for
    unit-norm decoder rows (Section 2.4, Appendix A.4); the component is found from the N·k dot
    products the backward computes anyway, with no extra pass over (n, d) (exact in fp32; on a
    GPU the dot products are bf16's, so the component left is within its rounding). x_c must be
    x - b_dec for a constant x: its gradient comes back as the batch's sum spread over the rows,
    which is b_dec's exact gradient and nothing else's."""

    @staticmethod
    def forward(ctx, pre_selected, x_c, W_enc_T, b_enc, W_dec, indices, grad_dtype, unit_decoder=False):
        values = pre_selected.relu()  # (N, k)
        x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")  # (N, d)
        ctx.save_for_backward(x_c, W_enc_T, W_dec, indices, values)
        ctx.grad_dtype, ctx.unit_decoder = grad_dtype, unit_decoder
        ctx.mark_non_differentiable(values)
        return x_hat, values

    @staticmethod
    def backward(ctx, grad_x_hat, _):
        x_c, W_enc_T, W_dec, indices, values = ctx.saved_tensors
        n = W_dec.shape[0]
        pattern = SelectionPattern(indices, n)
        grad_W_dec = pattern.product(values, grad_x_hat)  # (n, d)
        dots = gather_dot(W_dec, indices, grad_x_hat, ctx.grad_dtype)  # (N, k): W_dec[latent] · grad_x_hat[token]
        if ctx.unit_decoder:  # grad_W_dec[l] · W_dec[l] = the sum of values · dots over l's firings
            parallel = dots.new_zeros(n).index_add_(0, indices.reshape(-1), (values * dots).reshape(-1))
            grad_W_dec.addcmul_(parallel[:, None], W_dec, value=-1)
        grad_pre = dots * (values > 0)  # (N, k), through the ReLU
        grad_W_enc_T = pattern.product(grad_pre, x_c)  # (n, d)
        grad_b_enc = grad_pre.new_zeros(n).index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
        # x_c = x - b_dec with x constant, so b_dec alone takes x_c's gradient, and only its sum over
        # the tokens: grad_b_enc @ W_enc_T, (n,) @ (n, d), spread evenly over the rows. Each token's
        # own gradient would be an (N, k) gather of W_enc_T rows, 10 % of the step.
        grad_x_c = (grad_b_enc @ W_enc_T).div_(len(x_c)).expand_as(x_c)
        return None, grad_x_c, grad_W_enc_T, grad_b_enc, grad_W_dec, None, None, None


class SubsetLatents(torch.autograd.Function):
    """SparseTopK's result and gradients when every token chose its latents from a small subset
    (m,) (AuxK's dead latents: all of them, or each token's top k_aux of them): x_hat - b_dec =
    ReLU(pre_subset) @ W_dec[subset], with pre_subset (N, m) computed without grad. Dense (N, m)
    matmuls in place of SparseTopK's N·m gathered rows: the same sums in another order, read from
    an (m, d) block that stays in cache instead of a d-row per (token, latent) pair (one thread,
    N = 256, m = 150, d = 576: 7 against 20 ms forward and backward; BENCHMARKS.md). Latents a
    token did not choose enter with pre -inf (ReLU 0: no value, no gradient). Gradients come back
    full size, zero outside the subset."""

    @staticmethod
    def forward(ctx, pre_subset, x_c, W_enc_T, b_enc, W_dec, subset, unit_decoder=False):
        values = pre_subset.relu()  # (N, m)
        W_dec_s = W_dec[subset]  # (m, d)
        ctx.save_for_backward(x_c, W_enc_T, W_dec_s, subset, values)
        ctx.shape, ctx.unit_decoder = W_dec.shape, unit_decoder
        ctx.mark_non_differentiable(values)
        return values @ W_dec_s, values

    @staticmethod
    def backward(ctx, grad_x_hat, _):
        x_c, W_enc_T, W_dec_s, subset, values = ctx.saved_tensors
        dots = grad_x_hat @ W_dec_s.T  # (N, m): W_dec[latent] · grad_x_hat[token]
        grad_W_dec_s = values.T @ grad_x_hat  # (m, d)
        if ctx.unit_decoder:  # without each row's component along itself (see SparseTopK)
            grad_W_dec_s.addcmul_((values * dots).sum(0)[:, None], W_dec_s, value=-1)
        grad_pre = dots * (values > 0)  # (N, m), through the ReLU
        grad_b_enc_s = grad_pre.sum(0)  # (m,)
        grad_x_c = (grad_b_enc_s @ W_enc_T[subset]).div_(len(x_c)).expand_as(x_c)  # as in SparseTopK

        def full(part: torch.Tensor, like: tuple) -> torch.Tensor:
            return part.new_zeros(like).index_copy_(0, subset, part)

        n, d = ctx.shape
        return (None, grad_x_c, full(grad_pre.T @ x_c, (n, d)), full(grad_b_enc_s, (n,)), full(grad_W_dec_s, (n, d)),
                None, None)


TOPK_GROUP = 8  # latents per group in top_k's first step (measured best of 2..32 here)


def top_k(pre: torch.Tensor, k: int) -> torch.return_types.topk:
    """Each row's k largest values and their indices (unordered), like pre.topk(k, sorted=False).
    On a CPU in two steps, 25 % faster for k = 32 of 4,096: the rows cut into groups of
    TOPK_GROUP (latents j, j + m, j + 2m, ... with m = n / TOPK_GROUP, so the group maxima are one
    vectorised reduction), the k groups with the largest maxima kept, then the top k of their
    k · TOPK_GROUP values. Exact: a group holding one of the k largest values has a maximum at
    least the k-th largest value, and fewer than k groups can have a larger one."""
    N, n = pre.shape
    if pre.is_cuda or n % TOPK_GROUP or 2 * k * TOPK_GROUP > n:
        return pre.topk(k, dim=-1, sorted=False)
    m = n // TOPK_GROUP
    groups = pre.view(N, TOPK_GROUP, m).amax(1).topk(k, dim=-1, sorted=False).indices  # (N, k)
    candidates = (groups[:, None, :] + torch.arange(0, n, m, device=pre.device)[None, :, None]).view(N, -1)
    values, which = pre.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return torch.return_types.topk((values, candidates.gather(1, which)))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_matmul_dtype(device: torch.device | str | None = None, enabled: bool = True) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA, CPUs with AVX512-BF16 or AMX) and
    `enabled`, else fp32 (device None: the default one). Used for the language model's forward
    under autocast (1.8-2x the fp32 tokens/s through SmolLM2's block 6 on an AVX512-BF16 CPU, the
    residual stream within 0.6 %, BENCHMARKS.md) and to *select* the top k; the residual stream,
    the gradients and (in the harvest and the probe, encode_selected) the chosen latents' values
    stay fp32. Training's forward uses the bf16 product's values of the chosen latents: exact fp32
    values cost 20 % of the step on an AMX CPU for the same held-out FVU (BENCHMARKS.md)."""
    device = torch.device(device or default_device())
    if not enabled:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if supported else torch.float32


NORMALIZATIONS = ("scale", "token")


class InputNorm(NamedTuple):
    """How the SAE's inputs are normalised before encoding, and its reconstructions mapped back
    (Gao et al. 2024, Section 2.1; the same at training, evaluation, harvest and probing):

    - "scale": x times one number fixed for the run (`scale`, chosen so that E||x||^2 = d_in);
    - "token": each token on its own, as OpenAI's released code does: subtract its mean over d,
      divide by its standard deviation (+ eps); decoding multiplies by the deviation and adds the
      mean back (their LN and decode, exactly, so that their SAEs read here as they do there).
    """

    kind: str = "scale"
    scale: float = 1.0
    eps: float = 1e-5

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """(N, d) -> the SAE's input (N, d), and what `restore` needs."""
        if self.kind == "scale":
            return x * self.scale, None
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        return x / (std + self.eps), (mu, std)

    def normalize_(self, x: torch.Tensor) -> torch.Tensor:
        """`normalize` in place (a training chunk: no second copy of it in memory)."""
        if self.kind == "scale":
            return x.mul_(self.scale)
        mu = x.mean(dim=-1, keepdim=True)
        x.sub_(mu)
        return x.div_(x.std(dim=-1, keepdim=True).add_(self.eps))

    def restore(self, x_hat: torch.Tensor, stats: tuple | None) -> torch.Tensor:
        """A reconstruction in the SAE's space -> in the model's residual stream."""
        if self.kind == "scale":
            return x_hat / self.scale
        mu, std = stats
        return x_hat * std + mu


def check_size(n_latents: int, k: int, latents: str = "n_latents", k_name: str = "k") -> None:
    """The rule of a TopK SAE's size, in the caller's words for n and k (the flags --latents and
    --k on the command line, the keys in cfg.json): two latents at least, and 0 < k < n."""
    if n_latents < 2:
        raise ConfigError(f"{latents} must be at least 2, got {n_latents}")
    if not 0 < k < n_latents:
        raise ConfigError(f"{k_name} must be between 1 and {latents} - 1 ({n_latents - 1}), got {k}")


class TopKSAE(nn.Module):
    """Built from a validated size (check_size: TrainConfig, RunConfig)."""

    def __init__(self, d_in: int, n_latents: int, k: int):
        super().__init__()
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        # Random unit-norm decoder rows; the encoder starts as the decoder's transpose,
        # which the paper found to prevent most dead latents (Section 2.4).
        W_dec = F.normalize(torch.randn(n_latents, d_in), dim=-1)
        self.W_dec = nn.Parameter(W_dec)  # (n, d)
        # W_enc is kept as its transpose, a row per latent like W_dec, and contiguous: the bf16
        # encoder matmul reads it fastest this way (12.5 against 16 ms on this CPU at n = 4,096),
        # its sparse gradient comes out in this layout, and the fused Adam kernel updates a
        # contiguous tensor in one pass (0.9 against 4.6 ms for the transposed layout).
        self.W_enc_T = nn.Parameter(W_dec.clone())  # (n, d)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))  # (n,)
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # (d,)

    @property
    def W_enc(self) -> torch.Tensor:
        """(d, n), SAELens' name and layout: a view of W_enc_T."""
        return self.W_enc_T.T

    # ------------------------------------------------------------ forward

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc  # (N, n)

    @torch.no_grad()
    def pre_acts_centered(self, x_c: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pre-activations of x - b_dec without grad, in `dtype` (N, n): only for choosing latents,
        so bf16 keeps both (N, n)-sized passes (matmul, top-k) at half the bytes. The bias is a
        column of the matmul ([x_c, 1] @ [W_enc; b_enc]): a separate pass adding it to the (N, n)
        product cost two thirds as much as the product itself on an AMX CPU (1.7 against 2.5 ms at
        n = 4,096, BENCHMARKS.md); the copies into the widened operands are the casts to `dtype`
        anyway. In the weights' own dtype there is no cast to fold it into, and addmm is as fast."""
        if dtype == self.W_enc_T.dtype:
            return torch.addmm(self.b_enc, x_c, self.W_enc)
        (N, d), n = x_c.shape, self.n_latents
        x_1 = x_c.new_empty(N, d + 1, dtype=dtype)
        x_1[:, :d], x_1[:, d] = x_c, 1
        W_b = x_c.new_empty(n, d + 1, dtype=dtype)
        W_b[:, :d], W_b[:, d] = self.W_enc_T, self.b_enc
        return torch.mm(x_1, W_b.T)

    def sparse_forward(
        self, x_c: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype = torch.float32,
        unit_decoder: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training's forward for the latents `indices` (N, k) chosen from `pre`: returns
        (x_hat - b_dec, values), differentiable with respect to W_enc, b_enc, W_dec and x_c
        (W_dec's gradient tangent to its unit rows with `unit_decoder`: see SparseTopK)."""
        return SparseTopK.apply(pre.gather(-1, indices).float(), x_c, self.W_enc_T, self.b_enc, self.W_dec, indices, dtype, unit_decoder)

    def encode(self, x: torch.Tensor, k: int | None = None) -> TopKLatents:
        values, indices = self.pre_acts(x).topk(k or self.k, dim=-1, sorted=False)  # (N, k)
        return TopKLatents(F.relu(values), indices)

    @torch.no_grad()
    def encode_selected(self, x: torch.Tensor, dtype: torch.dtype) -> TopKLatents:
        """encode(x) with the top k chosen from `dtype` pre-activations (bf16 is several times
        faster on hardware that has it) and the chosen values computed exactly in fp32."""
        x_c = x - self.b_dec
        indices = top_k(self.pre_acts_centered(x_c, dtype), self.k).indices  # (N, k)
        values = gather_dot(self.W_enc_T, indices, x_c, torch.float32) + self.b_enc[indices]
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
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------ (de)serialisation

    def state_for_disk(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().float().cpu().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

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
