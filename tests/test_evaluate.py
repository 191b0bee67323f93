"""Evaluation: reconstruction metrics on held-out rows, and downstream loss by splicing the
reconstruction into the forward pass."""

import json

import numpy as np
import pytest
import torch

from trainer import runfolder
from trainer.evaluate import downstream_loss, evaluate_sae
from trainer.runconfig import RunConfig
from trainer.sae import TopKSAE
from trainer.store import ActivationStore, Positions


def exact_sae(d: int) -> TopKSAE:
    """A TopK SAE that reconstructs every x exactly: latents x+ and x- with k = d."""
    eye = torch.eye(d)
    weights = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
               "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)}
    return TopKSAE.from_weights(weights, k=d)


def test_exact_reconstruction_changes_nothing_downstream(tiny_run):
    cfg = RunConfig.load(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    metrics = downstream_loss(exact_sae(cfg.d_in), cfg, store, n_contexts=8)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=1e-4)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-4)
    if metrics["loss_recovered"] is not None:  # None where ablating the block costs nothing
        assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["downstream_tokens"] == 8 * (cfg.train.context_length - 1)


def test_trained_sae_downstream_metrics(tiny_run):
    metrics = runfolder.load_metrics(tiny_run)  # written by `saescope eval`
    for key in ("ce_clean", "ce_spliced", "ce_ablated", "kl", "delta_ce"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["kl"] >= 0
    assert metrics["delta_ce"] == pytest.approx(metrics["ce_spliced"] - metrics["ce_clean"])


def test_the_spliced_and_ablated_passes_skip_the_blocks_before_the_hookpoint(tiny_run):
    """Blocks 0..L run once per batch (in the clean pass); the metrics equal three full forward
    passes with block L's output replaced by a hook, as the paper splices (at the positions that
    count: the attention sink keeps its own residual)."""
    from trainer.model import find_blocks

    cfg, sae = runfolder.load_sae(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    model = cfg.language_model(sae.W_dec.device, fast=False).loaded.causal_lm  # the one downstream_loss gets
    calls = []
    counting = find_blocks(model.base_model)[1][0].register_forward_hook(lambda *a: calls.append(1))
    got = downstream_loss(sae, cfg, store, n_contexts=8, batch=4)
    assert len(calls) == 2  # once per batch of 4, not three times
    counting.remove()

    _, blocks = find_blocks(model.base_model)
    assert all(type(block).__name__ != "Replay" for block in blocks)  # put back
    first = store.n_train_contexts
    ids = torch.from_numpy(store.tokens[first : first + 8]).long()
    counted = torch.from_numpy(store.counted(cfg.positions, first, first + 8))  # (8, T)
    assert not counted.all()  # the first position (and any separator) keeps the model's own residual
    def spliced(module, args, output):
        x, stats = cfg.norm.normalize(output.reshape(-1, output.shape[-1]))
        return torch.where(counted[..., None], cfg.norm.restore(sae(x)[0], stats).view_as(output), output)

    def log_probs(hook=None):
        handle = blocks[cfg.layer].register_forward_hook(hook) if hook else None
        out = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        if handle:
            handle.remove()
        return out

    clean, with_sae, ablated = log_probs(), log_probs(spliced), log_probs(lambda m, a, o: torch.zeros_like(o))
    targets = ids[:, 1:, None]
    assert got["ce_clean"] == pytest.approx(float(-clean.gather(-1, targets).mean()), rel=1e-5)
    assert got["ce_spliced"] == pytest.approx(float(-with_sae.gather(-1, targets).mean()), rel=1e-5)
    assert got["ce_ablated"] == pytest.approx(float(-ablated.gather(-1, targets).mean()), rel=1e-5)
    assert got["kl"] == pytest.approx(float((clean.exp() * (clean - with_sae)).sum(-1).mean()), rel=1e-4, abs=1e-7)


def test_the_ablated_loss_is_computed_once_per_store(tiny_run, tmp_path, monkeypatch):
    """The zero-ablated CE depends on the store's tokens and the model, not on the SAE: a second
    eval on the store (another rung of a sweep) skips that pass and reports the same number."""
    import shutil

    from trainer.evaluate import ABLATED_CACHE
    from trainer.model import find_blocks

    cfg, sae = runfolder.load_sae(tiny_run)
    shutil.copytree(cfg.store.path, tmp_path / "store")
    (tmp_path / "store" / ABLATED_CACHE).unlink(missing_ok=True)  # the fixture's own eval made one
    store = ActivationStore.open(tmp_path / "store")
    calls = []
    model = cfg.language_model(sae.W_dec.device, fast=False).loaded.causal_lm  # the one downstream_loss gets
    # Its last block's runs: one per pass.
    counting = find_blocks(model.base_model)[1][-1].register_forward_hook(lambda *a: calls.append(1))
    first = downstream_loss(sae, cfg, store, n_contexts=8)
    assert len(calls) == 3  # clean, spliced, ablated (one batch of 8)
    calls.clear()
    again = downstream_loss(exact_sae(cfg.d_in), cfg, store, n_contexts=8)  # another SAE, same store
    assert len(calls) == 2 and again["ce_ablated"] == first["ce_ablated"]
    assert again["ce_spliced"] == pytest.approx(again["ce_clean"], abs=1e-4)  # its own spliced pass
    calls.clear()
    other = downstream_loss(sae, cfg, store, n_contexts=4)  # other tokens: computed
    assert len(calls) == 3 and len(runfolder.read_json(tmp_path / "store" / ABLATED_CACHE)) == 2
    assert other["ce_ablated"] != first["ce_ablated"]
    counting.remove()


def synthetic_store(path, n_train: int, n_heldout: int, T: int, d: int, seed: int = 0) -> ActivationStore:
    """A complete store in the real format: random rows, the training ones far larger (so that
    reading them in an evaluation would show)."""
    rng = np.random.default_rng(seed)
    C = n_train + n_heldout
    rows = rng.standard_normal((C * T, d)) + rng.standard_normal(d)  # around a mean other than 0
    rows[: n_train * T] *= 100
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"n_contexts": C, "n_heldout": n_heldout, "context_length": T,
                                               "d_model": d, "complete": True, "heldout_complete": True,
                                               "special_token_ids": [0]}))
    np.save(path / "tokens.npy", np.zeros((C, T), dtype=np.int32))
    np.save(path / "activations.npy", rows.astype(np.float16))
    return ActivationStore.open(path)


def test_reconstruction_metrics_equal_a_hand_computation(tmp_path):
    """FVU = sum (x - x_hat)^2 / sum (x - mean)^2 over the held-out tokens only, L0, and the
    shares of latents that never fire and that fire on more than 10 % of tokens; accumulated
    over batches of contexts that do not divide the held-out ones."""
    d, n, k, scale = 8, 12, 3, 0.7
    store = synthetic_store(tmp_path / "store", n_train=5, n_heldout=7, T=16, d=d)
    g = torch.Generator().manual_seed(1)
    b_enc = torch.randn(n, generator=g) * 0.5
    b_enc[0] = 100.0  # always among the top k: dense
    b_enc[-2:] = -100.0  # never among them: dead
    weights = {"W_enc": torch.randn(d, n, generator=g), "b_enc": b_enc,
               "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    sae = TopKSAE.from_weights(weights, k)

    metrics = evaluate_sae(sae, store, scale, Positions(0, False), batch_contexts=3)

    x = torch.from_numpy(np.load(tmp_path / "store" / "activations.npy")[5 * 16 :].astype(np.float64)) * scale
    W = {name: t.double() for name, t in weights.items()}
    pre = (x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]  # (N, n)
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.clamp_min(0))  # ReLU on the kept k
    x_hat = z @ W["W_dec"] + W["b_dec"]
    density = (z > 0).double().mean(0)
    assert metrics["eval_tokens"] == 7 * 16
    assert metrics["fvu"] == pytest.approx(float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert metrics["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-6)
    assert metrics["dead_fraction"] == pytest.approx(float((density == 0).double().mean())) and metrics["dead_fraction"] >= 2 / n
    assert metrics["dense_fraction"] == pytest.approx(float((density > 0.1).double().mean()))
    assert 1 / n <= metrics["dense_fraction"] < 1 - metrics["dead_fraction"] + 1e-9
    assert metrics["fvu_all_positions"] == pytest.approx(metrics["fvu"], rel=1e-12)  # every position counted


def test_the_positions_left_out_are_left_out_of_every_metric_but_fvu_all_positions(tmp_path):
    """With the first position and the special tokens (id 0 here) left out, FVU, L0 and the
    densities count the other tokens only; fvu_all_positions counts them all."""
    d, n, k, T = 8, 12, 3, 16
    store = synthetic_store(tmp_path / "store", n_train=5, n_heldout=7, T=T, d=d)
    tokens = np.load(tmp_path / "store" / "tokens.npy")
    tokens[:] = 5
    tokens[5:, 7] = 0  # a separator in every held-out context
    np.save(tmp_path / "store" / "tokens.npy", tokens)
    store = ActivationStore.open(tmp_path / "store")
    g = torch.Generator().manual_seed(2)
    weights = {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.randn(n, generator=g),
               "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    sae = TopKSAE.from_weights(weights, k).requires_grad_(False)
    metrics = evaluate_sae(sae, store, 1.0, Positions(1, True), batch_contexts=2)

    x = torch.from_numpy(np.load(tmp_path / "store" / "activations.npy")[5 * T :].astype(np.float32)).double()
    counted = torch.ones(7, T, dtype=torch.bool)
    counted[:, 0] = counted[:, 7] = False
    x_hat, latents = sae(x.float())
    x_hat = x_hat.double()

    def fvu(mask):
        return float((x[mask] - x_hat[mask]).pow(2).sum() / (x[mask] - x[mask].mean(0)).pow(2).sum())

    assert metrics["eval_tokens"] == 7 * (T - 2) and metrics["eval_positions"] == "all but the first position and special tokens"
    assert metrics["fvu"] == pytest.approx(fvu(counted.reshape(-1)), rel=1e-5)
    assert metrics["fvu_all_positions"] == pytest.approx(fvu(torch.ones(7 * T, dtype=torch.bool)), rel=1e-5)
    assert metrics["fvu"] != pytest.approx(metrics["fvu_all_positions"], rel=1e-3)
    fired = (latents.values > 0)[counted.reshape(-1)]
    assert metrics["l0"] == pytest.approx(float(fired.sum(1).double().mean()), rel=1e-6)


@pytest.mark.parametrize("command", ["eval", "harvest"])
def test_a_store_of_another_layer_is_refused_and_nothing_is_written(tiny_run, tmp_path, command):
    """--store given a store of another layer (same model, same width): one line, not metrics
    about the wrong activations."""
    import shutil

    from saescope.cli import main

    cfg = RunConfig.load(tiny_run)
    other = tmp_path / "other-layer-store"
    shutil.copytree(cfg.store.path, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "layer": cfg.layer + 1}))
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {path.name: path.read_bytes() for path in run.rglob("*.json")}
    assert main([command, str(run), "--store", str(other)]) == 2
    assert {path.name: path.read_bytes() for path in run.rglob("*.json")} == before
