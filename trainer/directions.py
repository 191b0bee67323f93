"""What a latent's decoder direction says on its own, without any text: which output tokens it
pushes up and down (logit effects), and which other latents point the same way (neighbours).

Both work on blocks of latents, so memory stays O(block · max(n, vocab)), never O(n²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 512  # latents per block


@torch.no_grad()
def nearest_latents(W_dec: torch.Tensor, m: int, others: torch.Tensor | None = None,
                    block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of W_dec (n, d), the m rows of `others` (default: W_dec itself, excluding the
    row) with the highest cosine similarity: (indices (n, m), cosines (n, m)), most similar first."""
    same = others is None
    A = F.normalize(W_dec.float(), dim=-1)
    B = A if same else F.normalize(others.float(), dim=-1)
    m = min(m, B.shape[0] - (1 if same else 0))
    indices = torch.empty(A.shape[0], m, dtype=torch.long)
    cosines = torch.empty(A.shape[0], m)
    for start in range(0, A.shape[0], block):
        sims = A[start : start + block] @ B.T  # (b, n_other)
        if same:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -float("inf")  # a latent is not its own neighbour
        values, found = sims.topk(m, dim=-1)
        indices[start : start + block], cosines[start : start + block] = found.cpu(), values.cpu()
    return indices, cosines


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, final_norm: nn.Module, unembed: nn.Module, n_tokens: int = 10,
                  bins: int = 32, block: int = 256, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Each decoder direction pushed through the model's final norm and unembedding: the tokens
    whose logits it raises and lowers most, and a histogram of its effect on every token. The
    unembedding of the whole vocabulary runs in `dtype` (bf16 halves its cost where the hardware
    has it) for the histogram and to shortlist the extremes; the listed values are exact fp32.

    Returns logit_top_ids/values (n, L) (largest first), logit_bottom_ids/values (n, L) (most
    negative first), logit_histogram (n, bins) over logit_range (n, 2) = (min, max)."""
    device = next(unembed.parameters()).device
    W_U = unembed.weight.to(dtype)  # (V, d)
    out = {name: [] for name in ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values",
                                 "logit_histogram", "logit_range")}
    normed = final_norm(W_dec.to(device).float())  # (n, d)
    # The (b, V) products go into buffers made once: allocated anew for every block, glibc kept
    # most of them (a 32,768-latent harvest peaked 2.5 GiB higher in this function).
    V = W_U.shape[0]
    product = torch.empty(block, V, dtype=dtype, device=device)
    effects_buffer = product if dtype == torch.float32 else torch.empty(block, V, device=device)
    which_buffer = torch.empty(block, V, dtype=torch.int32, device=device)
    for start in range(0, W_dec.shape[0], block):
        directions = normed[start : start + block]  # (b, d)
        b = len(directions)
        effects = effects_buffer[:b].copy_(torch.mm(directions.to(dtype), W_U.T, out=product[:b]))  # (b, V)
        if getattr(unembed, "bias", None) is not None:
            effects += unembed.bias
        top = exact_extremes(effects, directions, unembed, n_tokens, largest=True)
        bottom = exact_extremes(effects, directions, unembed, n_tokens, largest=False)
        low, high = effects.amin(-1), effects.amax(-1)  # (b,)
        # In place, to spare passes over (b, V): bin = floor((effect - low) / width * bins), the
        # effects being >= 0 once low is taken off (copying to int32 truncates).
        effects.sub_(low[:, None]).mul_((bins / (high - low).clamp_min(1e-12))[:, None])
        which = which_buffer[:b].copy_(effects)
        which.clamp_(0, bins - 1).add_(torch.arange(b, device=device, dtype=torch.int32)[:, None] * bins)
        histogram = torch.bincount(which.flatten(), minlength=len(directions) * bins).view(-1, bins)
        for name, value in (("logit_top_ids", top.indices), ("logit_top_values", top.values),
                            ("logit_bottom_ids", bottom.indices), ("logit_bottom_values", bottom.values),
                            ("logit_histogram", histogram), ("logit_range", torch.stack([low, high], -1))):
            out[name].append(value.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def exact_extremes(effects: torch.Tensor, directions: torch.Tensor, unembed: nn.Module, n_tokens: int,
                   largest: bool) -> torch.return_types.topk:
    """The n_tokens largest (or smallest) effects per row with fp32 values: shortlisted from the
    possibly bf16 `effects` (twice as many, for near-ties), recomputed exactly, re-ranked."""
    shortlist = effects.topk(min(2 * n_tokens, effects.shape[-1]), dim=-1, largest=largest).indices  # (b, 2L)
    exact = torch.einsum("bd,bld->bl", directions, unembed.weight[shortlist].float())
    if getattr(unembed, "bias", None) is not None:
        exact += unembed.bias[shortlist]
    values, order = exact.topk(n_tokens, dim=-1, largest=largest)
    return torch.return_types.topk((values, shortlist.gather(-1, order)))
