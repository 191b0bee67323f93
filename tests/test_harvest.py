"""The harvest's arithmetic against naive references: statistics, quantiles and their samples,
top contexts, rebuilt example activations, token search, nearest latents, logit effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from trainer import harvest as H
from trainer.directions import logit_effects, nearest_latents


def random_firings(n=7, C=30, T=9, k=3, seed=0, dead=(5,)):
    """Firings as the streaming pass makes them: k distinct latents per token, some values tied."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(C * T)])  # (C T, k)
    values = torch.rand(C * T, k, generator=g) * 4
    values[values < 0.6] = 0  # ReLU zeros are not firings
    values[::7] = 1.5  # ties
    keep = values > 0
    for latent in dead:
        keep &= latents != latent
    position = torch.arange(C * T)[:, None].expand(-1, k)
    firings = H.Firings.from_unsorted(latents[keep], position[keep], values[keep], n)
    dense = torch.zeros(C * T, n)
    dense[position[keep], latents[keep]] = values[keep]
    return firings, dense.view(C, T, n)


def test_firings_are_sorted_by_latent_then_position():
    firings, _ = random_firings()
    key = firings.latent * 10**6 + firings.position
    assert (key[1:] > key[:-1]).all()
    assert firings.offsets[-1] == len(firings.value)


def test_statistics_match_dense(bins=8):
    firings, dense = random_firings()
    n = dense.shape[-1]
    stats = H.latent_statistics(firings, n_tokens=dense.shape[0] * dense.shape[1], bins=bins)
    z = dense.reshape(-1, n)
    assert_close(stats["density"], (z > 0).float().mean(0))
    assert_close(stats["max_activation"], z.amax(0))
    for latent in range(n):
        fired = z[:, latent][z[:, latent] > 0].numpy()
        if len(fired) == 0:
            assert stats["histogram"][latent].sum() == 0 and stats["mean_activation"][latent] == 0
            continue
        assert_close(stats["mean_activation"][latent], torch.tensor(fired.mean()))
        counts, _ = np.histogram(fired, bins=bins, range=(0, fired.max()))
        assert stats["histogram"][latent].tolist() == counts.tolist()


def test_top_contexts_match_dense(K=4):
    firings, dense = random_firings()
    C, T, n = dense.shape
    pairs = H.latent_context_pairs(firings, T)
    top = H.top_pairs(pairs, n, K)
    context_max = dense.amax(1)  # (C, n)
    for latent in range(n):
        fired = (context_max[:, latent] > 0).nonzero().squeeze(1)
        expected = context_max[fired, latent].sort(descending=True, stable=True).values[:K]
        got = top[latent][top[latent] >= 0]
        assert_close(pairs.max[got], expected)
        assert (pairs.latent[got] == latent).all()
        assert len(set(pairs.context[got].tolist())) == len(got)


@pytest.mark.parametrize("distribution", ["uniform", "exponential", "ties", "one"])
def test_quantile_edges_and_shares_match_numpy(distribution, Q=10):
    rng = np.random.default_rng(1)
    values = {"uniform": rng.uniform(0.1, 5, 997), "exponential": rng.exponential(2.0, 2000) + 1e-3,
              "ties": np.repeat([0.5, 1.0, 2.0], [300, 10, 90]), "one": np.array([3.0])}[distribution]
    # latent 1 holds the distribution, latent 0 a few values, latent 2 is dead.
    latent = np.concatenate([np.zeros(3), np.ones(len(values))]).astype(np.int64)
    value = np.concatenate([[1.0, 2.0, 3.0], values]).astype(np.float32)
    firings = H.Firings.from_unsorted(torch.from_numpy(latent), torch.arange(len(latent)), torch.from_numpy(value), 3)
    edges = H.quantile_edges(firings, Q)
    assert_close(edges[1], torch.from_numpy(np.quantile(value[latent == 1], np.linspace(0, 1, Q + 1))).float())
    assert_close(edges[0], torch.from_numpy(np.quantile([1.0, 2.0, 3.0], np.linspace(0, 1, Q + 1))).float())
    assert (edges[2] == 0).all()
    bins = H.quantile_bins(firings, edges)
    # Naive: bin j holds edge_j <= v < edge_j+1, the last bin also the max.
    ours = value[latent == 1]
    e = edges[1].numpy()
    naive = np.array([min(np.searchsorted(e[1:-1], v, side="right"), Q - 1) for v in ours])
    assert bins[torch.from_numpy(latent == 1)].tolist() == naive.tolist()
    for j in range(Q):
        inside = ours[naive == j]
        assert ((inside >= e[j]) & ((inside < e[j + 1]) | (j == Q - 1))).all()


def test_quantile_samples_are_in_their_bin_distinct_and_not_top(Q=4, S=3, K=3):
    firings, dense = random_firings(C=60)
    C, T, n = dense.shape
    pairs = H.latent_context_pairs(firings, T)
    top = H.top_pairs(pairs, n, K)
    edges = H.quantile_edges(firings, Q)
    bins = H.quantile_bins(firings, edges)
    sampled = H.quantile_samples(firings, pairs, top, bins, Q, S, seed=0)
    assert torch.equal(sampled, H.quantile_samples(firings, pairs, top, bins, Q, S, seed=0))  # seeded
    assert not torch.equal(sampled, H.quantile_samples(firings, pairs, top, bins, Q, S, seed=1))
    for latent in range(n):
        top_contexts = set(pairs.context[top[latent][top[latent] >= 0]].tolist())
        chosen = sampled[latent][sampled[latent] >= 0]
        contexts = (firings.position[chosen] // T).tolist()
        assert len(set(contexts)) == len(contexts)  # de-duplicated
        assert not set(contexts) & top_contexts
        assert (firings.latent[chosen] == latent).all()
        for j in range(Q):
            got = sampled[latent, j][sampled[latent, j] >= 0]
            assert (bins[got] == j).all()
        # Every context outside the top K takes part once, so a latent shows min(S, its
        # candidates in the bin) per bin; in total at least as many as its bins can fill.
        candidates = set((firings.position[firings.latent == latent] // T).tolist()) - top_contexts
        assert len(contexts) >= min(S, len(candidates)) if candidates else len(contexts) == 0


def test_example_activations_rebuild_dense_rows():
    firings, dense = random_firings()
    C, T, n = dense.shape
    pairs = H.latent_context_pairs(firings, T)
    chosen = torch.tensor([0, 5, len(pairs.latent) - 1, 3])
    rebuilt = H.example_activations(firings, pairs, chosen, T)
    for row, pair in enumerate(chosen.tolist()):
        assert_close(rebuilt[row], dense[pairs.context[pair], :, pairs.latent[pair]])


def test_token_search_matches_dense(per_token=2):
    firings, dense = random_firings()
    C, T, n = dense.shape
    tokens = np.random.default_rng(0).integers(0, 5, (C, T))
    counted = np.ones((C, T), dtype=bool)
    found = H.token_search(firings, tokens, counted, vocab_size=5, per_token=per_token)
    z = dense.reshape(-1, n)
    for token in range(5):
        at = torch.from_numpy(tokens.reshape(-1) == token)
        mean = z[at].mean(0)  # over every occurrence, firing or not
        rows = found["token_id"] == token
        expected = mean.sort(descending=True, stable=True)
        fired = int((mean > 0).sum())
        assert found["token_latent"][rows].tolist() == expected.indices[: min(per_token, fired)].tolist()
        assert_close(found["token_mean_activation"][rows], expected.values[: min(per_token, fired)])
        assert (found["token_occurrences"][rows] == int(at.sum())).all()


def test_counted_positions_leave_out_the_first_and_special_tokens():
    from trainer.store import Positions

    tokens = np.array([[0, 1, 2, 9], [9, 3, 9, 4]])
    assert Positions(1, True).mask(tokens, [9]).tolist() == [[False, True, True, False], [False, True, False, True]]
    assert Positions(2, False).mask(tokens, [9]).tolist() == [[False, False, True, True], [False, False, True, True]]
    assert Positions(0, False).mask(tokens, [9]).all() and Positions(0, False).everywhere


@pytest.mark.parametrize("n,d,block", [(37, 5, 8), (64, 16, 64), (10, 3, 3)])
def test_nearest_latents_match_brute_force(n, d, block, m=4):
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    indices, cosines = nearest_latents(W, m, block=block)
    unit = torch.nn.functional.normalize(W, dim=-1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-float("inf"))
    expected = sims.topk(m, dim=-1)
    assert_close(cosines, expected.values)
    assert_close(sims.gather(1, indices), expected.values)  # the same latents (ties aside)
    assert not (indices == torch.arange(n)[:, None]).any()


def test_nearest_latents_across_two_saes():
    a, b = torch.randn(9, 4), torch.randn(13, 4)
    indices, cosines = nearest_latents(a, 3, others=b, block=4)
    sims = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    assert_close(cosines, sims.topk(3, dim=-1).values)


def test_logit_effects_match_brute_force(n=11, d=6, V=50, bins=7):
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(n, d, generator=g)
    norm, unembed = nn.LayerNorm(d), nn.Linear(d, V, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    effects = unembed(norm(W_dec)).detach()
    out = logit_effects(W_dec, norm, unembed, n_tokens=3, bins=bins, block=4)
    assert_close(out["logit_top_values"], effects.topk(3).values)
    assert_close(out["logit_bottom_values"], effects.topk(3, largest=False).values)
    assert_close(effects.gather(1, out["logit_top_ids"]), effects.topk(3).values)
    assert (out["logit_histogram"].sum(1) == V).all()
    for latent in range(n):
        counts, _ = np.histogram(effects[latent].numpy(), bins=bins,
                                 range=(float(effects[latent].min()), float(effects[latent].max())))
        assert out["logit_histogram"][latent].tolist() == counts.tolist()


def test_logit_effects_in_bf16_list_exact_values(n=9, d=16, V=300):
    g = torch.Generator().manual_seed(1)
    W_dec, norm, unembed = torch.randn(n, d, generator=g), nn.Identity(), nn.Linear(d, V, bias=False)
    effects = unembed(W_dec).detach()
    out = logit_effects(W_dec, norm, unembed, n_tokens=5, dtype=torch.bfloat16)
    assert_close(out["logit_top_values"], effects.gather(1, out["logit_top_ids"]))  # fp32, not bf16-rounded
    assert_close(out["logit_top_values"], effects.topk(5).values, atol=0.05, rtol=0.01)  # near-ties may swap
    assert (out["logit_top_values"][:, :-1] >= out["logit_top_values"][:, 1:]).all()
