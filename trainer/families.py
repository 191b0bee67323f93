"""Feature families across the sizes of a ladder: every latent's nearest latents, by decoder
cosine, in each other SAE of the n series (Gao et al. 2024 find that features split as n grows).

Computed block by block: for a pair of SAEs (a, b) only a (block, n_b) slice of cosines exists at
once, with block = d rows, so memory stays O(n·d) (the size of the weights), never O(n_a·n_b).
Each pair is computed once and read both ways (row-wise top-m for a -> b, a running column-wise
top-m for b -> a).

DIR/families.safetensors

    metadata   format "saescope-families", version "1",
               rungs: JSON list of the run folders (relative to DIR), smallest n first,
               n_latents: JSON list of their sizes, neighbours: m
    tensors    for every ordered pair of rungs (i, j), i != j, named by their positions in `rungs`:
               "{i}->{j}.index"   int32 [n_i, m]: latents of rung j nearest to each latent of rung i,
                                  most similar first
               "{i}->{j}.cosine"  float32 [n_i, m]: their decoder cosines

How to read it for latent l of rung i: in a smaller rung j (j < i), "{i}->{j}.index"[l, 0] is
what l was before it split; in a larger rung j, "{i}->{j}.index"[l] are the latents l splits
into (its children are also those latents c of j with "{j}->{i}.index"[c, 0] == l).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import runfolder
from trainer.files import write_tensors
from trainer.runconfig import RunConfig

FAMILIES_FILE = "families.safetensors"


def merge_top(values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor, new_indices: torch.Tensor, m: int):
    """Keep the m largest of two candidate sets per row: (r, m) each."""
    values, order = torch.cat([values, new_values], 1).topk(m, dim=1)  # (r, m)
    return values, torch.cat([indices, new_indices], 1).gather(1, order)


@torch.no_grad()
def nearest_both_ways(W_a: torch.Tensor, W_b: torch.Tensor, m: int, block: int | None = None):
    """Top-m cosine neighbours of each row of W_a among the rows of W_b, and of each row of W_b
    among the rows of W_a: ((index_ab, cosine_ab), (index_ba, cosine_ba)), [n, m] each.
    Rows are normalised here; only (block, n_b) cosines exist at once."""
    U_a, U_b = F.normalize(W_a.float(), dim=-1), F.normalize(W_b.float(), dim=-1)  # (n_a, d), (n_b, d)
    n_a, n_b = len(U_a), len(U_b)
    m_ab, m_ba = min(m, n_b), min(m, n_a)
    block = block or U_a.shape[1]
    cos_ab = U_a.new_empty(n_a, m_ab)
    index_ab = torch.empty(n_a, m_ab, dtype=torch.long)
    cos_ba = U_a.new_full((n_b, m_ba), -float("inf"))
    index_ba = torch.zeros(n_b, m_ba, dtype=torch.long)
    for start in range(0, n_a, block):
        cosines = U_a[start : start + block] @ U_b.T  # (block, n_b)
        cos_ab[start : start + block], index_ab[start : start + block] = cosines.topk(m_ab, dim=1)
        top, rows = cosines.topk(min(m_ba, len(cosines)), dim=0)  # (<=m, n_b): best rows of this block per column
        cos_ba, index_ba = merge_top(cos_ba, index_ba, top.T, rows.T + start, m_ba)
    return (index_ab, cos_ab), (index_ba, cos_ba)


def family_tensors(decoders: list[torch.Tensor], m: int, block: int | None = None) -> dict[str, torch.Tensor]:
    """The families.safetensors tensors for decoders [n_i, d], in rung order."""
    tensors = {}
    for i in range(len(decoders)):
        for j in range(i + 1, len(decoders)):
            (index_ij, cos_ij), (index_ji, cos_ji) = nearest_both_ways(decoders[i], decoders[j], m, block)
            tensors |= {f"{i}->{j}.index": index_ij.int(), f"{i}->{j}.cosine": cos_ij,
                        f"{j}->{i}.index": index_ji.int(), f"{j}->{i}.cosine": cos_ji}
    return tensors


def write_families(sweep_dir: Path, runs: list[Path], m: int) -> Path:
    """Match the decoders of `runs` (the n series, any order) and write DIR/families.safetensors."""
    sweep_dir = Path(sweep_dir)
    cfgs = {run: RunConfig.load(run) for run in runs}
    runs = sorted(runs, key=lambda run: cfgs[run].n_latents)
    decoders = [runfolder.load_sae_weights(run, cfgs[run])["W_dec"] for run in runs]
    metadata = {
        "format": "saescope-families",
        "version": "1",
        "rungs": json.dumps([str(Path(run).resolve().relative_to(sweep_dir.resolve())) for run in runs]),
        "n_latents": json.dumps([cfgs[run].n_latents for run in runs]),
        "neighbours": str(m),
    }
    path = sweep_dir / FAMILIES_FILE
    write_tensors(path, family_tensors(decoders, m), metadata)
    return path
