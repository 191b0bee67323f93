"""SAE numerics against naive references, over awkward sizes, on the CPU."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.sae import SubsetLatents, TopKSAE, check_size, geometric_median, top_k

SIZES = [(7, 13, 3, 1), (33, 64, 5, 4), (5, 17, 16, 2)]  # (batch, n_latents, d_in, k)


def naive_forward(sae: TopKSAE, x: torch.Tensor):
    """Token by token, latent by latent: the paper's equations written out."""
    x_hat = torch.zeros_like(x)
    z = torch.zeros(x.shape[0], sae.n_latents)
    for i, row in enumerate(x):
        pre = torch.stack([(row - sae.b_dec) @ sae.W_enc[:, j] + sae.b_enc[j] for j in range(sae.n_latents)])
        keep = pre.argsort(descending=True)[: sae.k]
        for j in keep:
            z[i, j] = max(float(pre[j]), 0.0)
        x_hat[i] = sum(z[i, j] * sae.W_dec[j] for j in range(sae.n_latents)) + sae.b_dec
    return x_hat, z


def random_sae(n, d, k, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k)
    with torch.no_grad():  # break the transpose tie and the zero biases so every term matters
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.1 * torch.randn(n))
        sae.b_dec.copy_(torch.randn(d))
    return sae


@pytest.mark.parametrize("batch,n,d,k", SIZES)
def test_forward_matches_naive_reference(batch, n, d, k):
    sae = random_sae(n, d, k)
    x = torch.randn(batch, d)
    with torch.no_grad():
        x_hat, latents = sae(x)
        ref_x_hat, ref_z = naive_forward(sae, x)
        assert_close(sae.encode_dense(x), ref_z, atol=1e-5, rtol=1e-5)
        assert_close(x_hat, ref_x_hat, atol=1e-5, rtol=1e-5)
    assert latents.indices.shape == (batch, k)
    assert (latents.values >= 0).all()


@pytest.mark.parametrize("batch,n,d,k", SIZES)
def test_sparse_decoder_gradients_match_dense(batch, n, d, k):
    sae = random_sae(n, d, k)
    x = torch.randn(batch, d)
    x_hat, latents = sae(x)
    x_hat.pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    z = torch.zeros(batch, n).scatter(-1, latents.indices, sae.encode(x).values)  # dense path
    (z @ sae.W_dec + sae.b_dec).pow(2).sum().backward()
    for sparse, dense in zip(sparse_grads, (p.grad for p in sae.parameters())):
        assert_close(sparse, dense, atol=1e-4, rtol=1e-4)


def test_encoder_starts_as_decoder_transpose_with_unit_rows():
    sae = TopKSAE(24, 100, 8)
    assert_close(sae.W_enc, sae.W_dec.T)
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(100))


@pytest.mark.parametrize("batch,n,d,k", SIZES)
def test_unit_decoder_gradient_is_the_dense_one_without_its_parallel_part(batch, n, d, k):
    """Training's decoder gradient: plain autograd's, minus each row's component along the row
    (Section 2.4), so that a small step keeps the rows on the unit sphere."""
    sae = random_sae(n, d, k)
    x, target = torch.randn(batch, d), torch.randn(batch, d)
    x_hat, _ = sae(x)
    (x_hat - target).pow(2).sum().backward()
    dense = sae.W_dec.grad.clone()
    sae.zero_grad()

    x_c = x - sae.b_dec
    pre = sae.pre_acts_centered(x_c)
    x_hat, _ = sae.sparse_forward(x_c, pre, pre.topk(k, dim=-1).indices, unit_decoder=True)
    (x_hat + sae.b_dec - target).pow(2).sum().backward()
    W = sae.W_dec.detach()
    assert_close(sae.W_dec.grad, dense - (dense * W).sum(-1, keepdim=True) * W, atol=1e-4, rtol=1e-4)
    assert_close((sae.W_dec.grad * W).sum(-1), torch.zeros(n), atol=1e-4, rtol=0)


def test_rows_renormalised():
    sae = random_sae(50, 12, 4)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit_norm()
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(50))


@pytest.mark.parametrize("n_latents,k,problem", [(16, 16, "k must be between 1 and n_latents - 1 (15), got 16"),
                                                 (16, 0, "k must be between 1 and n_latents - 1 (15), got 0"),
                                                 (1, 1, "n_latents must be at least 2, got 1")])
def test_one_rule_for_the_size_in_the_words_of_each_caller(n_latents, k, problem):
    """check_size is the one rule: the command line names --latents and --k, cfg.json its keys."""
    from trainer.config import TrainConfig
    from trainer.errors import ConfigError, RunFolderError
    from trainer.runconfig import RunConfig

    with pytest.raises(ConfigError, match=re.escape(problem)):
        check_size(n_latents, k)
    flags = problem.replace("n_latents", "--latents").replace("k must", "--k must")
    with pytest.raises(ConfigError, match=re.escape(flags)):
        TrainConfig(n_latents=n_latents, k=k)
    with pytest.raises(RunFolderError, match=re.escape(problem)):
        RunConfig(model="m", layer=0, d_in=4, n_latents=n_latents, k=k)


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.randn(200, 5) * 0.1
    x[:20] += 100.0  # 10 % far outliers drag the mean, not the median
    median = geometric_median(x)
    assert median.norm() < 1.0 < x.mean(0).norm()

    def summed_distance(p):
        return (x - p).norm(dim=-1).sum()

    for _ in range(20):  # no nearby point does better
        assert summed_distance(median) <= summed_distance(median + 0.01 * F.normalize(torch.randn(5), dim=0)) + 1e-4


@pytest.mark.parametrize("batch,n,d,k", SIZES)
def test_sparse_encoder_gradients_match_dense_autograd(batch, n, d, k):
    """The training path (no-grad selection + SparseEncoderGrad) against plain autograd."""
    sae = random_sae(n, d, k)
    x = torch.randn(batch, d)
    target = torch.randn(batch, d)

    x_hat, _ = sae(x)  # dense autograd through pre_acts and topk
    (x_hat - target).pow(2).sum().backward()
    dense = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()

    x_c = x - sae.b_dec
    pre = sae.pre_acts_centered(x_c)
    indices = pre.topk(k, dim=-1, sorted=False).indices
    x_hat, values = sae.sparse_forward(x_c, pre, indices)
    (x_hat + sae.b_dec - target).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        assert_close(p.grad, dense[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("batch,n,d,k", SIZES)
@pytest.mark.parametrize("unit_decoder", [False, True])
def test_subset_latents_match_the_sparse_path_choosing_them_all(batch, n, d, k, unit_decoder):
    """AuxK's dense route (every token chooses every latent of a subset, some of them below zero)
    gives the sparse route's reconstruction and gradients for that selection, b_dec's included;
    the latents outside the subset get none."""
    sae = random_sae(n, d, k)
    x, target = torch.randn(batch, d), torch.randn(batch, d)
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: max(1, n // 3)].sort().values

    def gradients(decode) -> tuple[torch.Tensor, dict]:
        sae.zero_grad()
        x_c = x - sae.b_dec
        pre = sae.pre_acts_centered(x_c)
        x_hat = decode(x_c, pre)
        (x_hat + sae.b_dec - target).pow(2).sum().backward()
        return x_hat.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}

    sparse_x_hat, sparse = gradients(lambda x_c, pre: sae.sparse_forward(x_c, pre, subset.expand(batch, -1), unit_decoder=unit_decoder)[0])
    dense_x_hat, dense = gradients(
        lambda x_c, pre: SubsetLatents.apply(pre[:, subset], x_c, sae.W_enc_T, sae.b_enc, sae.W_dec, subset, unit_decoder)[0]
    )
    assert_close(dense_x_hat, sparse_x_hat, atol=1e-5, rtol=1e-5)
    for name in sparse:
        assert_close(dense[name], sparse[name], atol=1e-4, rtol=1e-4, msg=name)
    outside = torch.ones(n, dtype=torch.bool)
    outside[subset] = False
    assert (dense["W_dec"][outside] == 0).all() and (dense["W_enc_T"][outside] == 0).all() and (dense["b_enc"][outside] == 0).all()
    assert dense["W_dec"][subset].abs().sum() > 0 and dense["b_dec"].abs().sum() > 0


@pytest.mark.parametrize("n,k", [(4096, 32), (256, 8), (64, 4), (100, 3), (64, 40)])
def test_top_k_equals_torch_topk_with_ties(n, k):
    g = torch.Generator().manual_seed(n + k)
    pre = (torch.randn(300, n, generator=g) * 4).round().to(torch.bfloat16)  # many ties
    pre[:5] = 0  # whole rows tied
    got = top_k(pre, k)
    want = pre.topk(k, dim=-1)
    assert torch.equal(got.values.sort(-1).values, want.values.sort(-1).values)
    assert torch.equal(pre.gather(1, got.indices), got.values)
    assert (got.indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct latents per row


def test_per_token_normalisation_is_openais_ln_and_its_decode():
    """InputNorm("token"): x - mean over d, divided by the (unbiased) standard deviation + 1e-5;
    restore multiplies by the deviation and adds the mean back, as OpenAI's released code decodes
    (not quite the inverse: the eps is not added back)."""
    from trainer.sae import InputNorm

    x = torch.randn(7, 12, dtype=torch.float64) * 3 + 5
    norm = InputNorm("token")
    x_n, (mu, std) = norm.normalize(x)
    reference_mu = x.mean(-1, keepdim=True)
    reference_std = ((x - reference_mu).pow(2).sum(-1, keepdim=True) / (12 - 1)).sqrt()
    assert_close(x_n, (x - reference_mu) / (reference_std + 1e-5))
    assert_close(norm.restore(x_n, (mu, std)), x_n * reference_std + reference_mu)
    assert_close(norm.restore(x_n, (mu, std)), x, rtol=1e-4, atol=1e-4)  # nearly the inverse (eps * |x_n|)
    assert_close(norm.normalize_(x.clone()), x_n)  # in place, the same numbers


def test_one_scale_normalises_and_restores_exactly():
    from trainer.sae import InputNorm

    x = torch.randn(5, 8)
    norm = InputNorm("scale", 0.25)
    x_n, stats = norm.normalize(x)
    assert torch.equal(x_n, x * 0.25) and torch.equal(norm.normalize_(x.clone()), x * 0.25)
    assert_close(norm.restore(x_n, stats), x)
