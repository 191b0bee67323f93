"""Feature families: blockwise nearest decoder directions against the full cosine matrix."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close

from trainer import runfolder
from trainer.families import FAMILIES_FILE, family_tensors, nearest_both_ways, write_families
from trainer.runconfig import RunConfig


def brute_force(W_a, W_b, m):
    cosines = F.normalize(W_a, dim=-1) @ F.normalize(W_b, dim=-1).T  # (n_a, n_b), all at once
    ab = cosines.topk(min(m, len(W_b)), dim=1)
    ba = cosines.T.topk(min(m, len(W_a)), dim=1)
    return (ab.indices, ab.values), (ba.indices, ba.values)


@pytest.mark.parametrize("n_a, n_b, d, m, block", [(7, 13, 5, 3, 2), (30, 13, 6, 4, 7), (16, 3, 4, 5, 16), (1, 9, 3, 2, 1)])
def test_nearest_both_ways_matches_brute_force(n_a, n_b, d, m, block):
    generator = torch.Generator().manual_seed(n_a * 100 + n_b)
    W_a = torch.randn(n_a, d, generator=generator) * 3  # not unit norm: the function normalises
    W_b = torch.randn(n_b, d, generator=generator)
    got = nearest_both_ways(W_a, W_b, m, block)
    expected = brute_force(W_a, W_b, m)
    for (index, cosine), (index_ref, cosine_ref) in zip(got, expected):
        assert_close(cosine, cosine_ref)
        assert torch.equal(index, index_ref)


def test_family_tensors_cover_every_ordered_pair_of_a_small_ladder():
    generator = torch.Generator().manual_seed(0)
    decoders = [torch.randn(n, 8, generator=generator) for n in (4, 8, 16)]
    tensors = family_tensors(decoders, m=3, block=5)
    assert len(tensors) == 2 * 3 * 2  # 6 ordered pairs, index and cosine each
    for i, W_i in enumerate(decoders):
        for j, W_j in enumerate(decoders):
            if i == j:
                continue
            (index, cosine), _ = brute_force(W_i, W_j, 3)
            assert tensors[f"{i}->{j}.index"].dtype == torch.int32
            assert torch.equal(tensors[f"{i}->{j}.index"].long(), index)
            assert_close(tensors[f"{i}->{j}.cosine"], cosine)


def test_a_latent_split_in_two_finds_its_parent_and_its_children(tmp_path):
    """A larger SAE whose decoder holds two directions near a smaller SAE's latent 0 (a split)."""
    generator = torch.Generator().manual_seed(1)
    small = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    children = F.normalize(small[0] + 0.3 * F.normalize(torch.randn(2, 16, generator=generator), dim=-1), dim=-1)
    large = torch.cat([F.normalize(torch.randn(6, 16, generator=generator), dim=-1), children])  # rows 6, 7
    runs = []
    for n, W_dec in ((8, large), (4, small)):  # written out of order: the file sorts by n
        run = tmp_path / "runs" / f"n{n}-k2"
        weights = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(n), "W_dec": W_dec, "b_dec": torch.zeros(16)}
        runfolder.save_sae_weights(run, weights)
        RunConfig(model="m", layer=0, d_in=16, n_latents=n, k=2).save(run)
        runs.append(run)
    write_families(tmp_path, runs, m=2)
    with safe_open(tmp_path / FAMILIES_FILE, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "saescope-families" and json.loads(meta["n_latents"]) == [4, 8]
        assert json.loads(meta["rungs"]) == ["runs/n4-k2", "runs/n8-k2"]
        assert sorted(f.get_tensor("0->1.index")[0].tolist()) == [6, 7]  # latent 0 splits into 6 and 7
        assert f.get_tensor("1->0.index")[6, 0] == 0 and f.get_tensor("1->0.index")[7, 0] == 0
        assert f.get_tensor("0->1.cosine")[0].min() > 0.9
