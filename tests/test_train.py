"""Training robustness: resume after SIGKILL gives the uninterrupted result; NaN stops cleanly."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from trainer import runfolder
from trainer.runconfig import CHECKPOINT_FILE, RunConfig

ARGS = ["--layer", "1", "--latents", "256", "--k", "8", "--tokens", "16384", "--heldout-tokens", "1024",
        "--context-length", "32", "--batch-size", "64", "--checkpoint-every", "25"]  # fmt: skip
if torch.cuda.is_available():  # CUDA's atomic adds make two runs differ in the last bits (a GPU machine's run)
    ARGS += ["--deterministic", "1"]


def saescope(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "saescope.cli", *args], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """A complete reference run, and the activation store it built (shared by the others)."""
    folder = tmp_path_factory.mktemp("train")
    result = saescope("train", "--out", str(folder / "reference"), "--store", str(folder / "store"),
                      "--model", str(tiny_model_dir), *ARGS)
    assert result.returncode == 0, result.stderr
    return folder


def kill_at_first_checkpoint(run: Path, *args: str) -> None:
    """`saescope train --out run *args`, SIGKILLed as soon as it has written a checkpoint."""
    process = subprocess.Popen([sys.executable, "-m", "saescope.cli", "train", "--out", str(run), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / CHECKPOINT_FILE).exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


@pytest.mark.multiprocess
def test_resume_after_sigkill_matches_uninterrupted_run(uninterrupted, tiny_model_dir):
    run = uninterrupted / "killed"
    kill_at_first_checkpoint(run, "--store", str(uninterrupted / "store"), "--model", str(tiny_model_dir), *ARGS)
    assert not (run / runfolder.SAE_FILE).exists()  # killed mid-way: no result yet
    killed_at = torch.load(run / CHECKPOINT_FILE, weights_only=False)["step"]
    assert 0 < killed_at < 256

    result = saescope("train", "--resume", str(run))
    assert result.returncode == 0, result.stderr
    reference = runfolder.load_sae_weights(uninterrupted / "reference")
    resumed = runfolder.load_sae_weights(run)
    for name in runfolder.SAE_TENSORS:
        assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-6)
    metrics, expected = runfolder.load_metrics(run), runfolder.load_metrics(uninterrupted / "reference")
    assert metrics["train_fvu_final"] == pytest.approx(expected["train_fvu_final"], rel=1e-6)
    # The training curve carries on from the checkpoint: the same points as the uninterrupted run.
    assert metrics["train_curve"]["tokens"] == expected["train_curve"]["tokens"]
    assert metrics["train_curve"]["dead"] == expected["train_curve"]["dead"]
    assert metrics["train_curve"]["fvu"] == pytest.approx(expected["train_curve"]["fvu"], rel=1e-6)
    assert not (run / CHECKPOINT_FILE).exists()  # the finished run needs no checkpoint
    again = saescope("train", "--resume", str(run))
    assert again.returncode == 2 and "already complete" in again.stderr


@pytest.mark.multiprocess
def test_a_run_moved_with_its_store_resumes_and_evaluates_there(uninterrupted, tiny_model_dir, tmp_path):
    """The checkpoint and cfg.json also name the store by its path from the run folder: a run
    moved together with its store (a demo or sweep folder) resumes and evaluates from the store's
    new place; moved without it, eval says what is missing."""
    first = tmp_path / "first"
    shutil.copytree(uninterrupted / "store", first / "store")
    kill_at_first_checkpoint(first / "run", "--store", str(first / "store"), "--model", str(tiny_model_dir), *ARGS)
    second = first.rename(tmp_path / "second")
    result = saescope("train", "--resume", str(second / "run"))
    assert result.returncode == 0, result.stderr
    assert RunConfig.load(second / "run").store.relative == "../store"
    reference = runfolder.load_sae_weights(uninterrupted / "reference")
    for name, tensor in runfolder.load_sae_weights(second / "run").items():
        assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6)

    third = second.rename(tmp_path / "third")
    assert saescope("eval", str(third / "run"), "--downstream-contexts", "0").returncode == 0
    lonely = shutil.move(third / "run", tmp_path / "lonely")
    result = saescope("eval", str(lonely), "--downstream-contexts", "0")
    assert result.returncode == 2 and f"{second / 'store'}: no such activation store (moved or deleted?): give its place with --store" in result.stderr


@pytest.mark.multiprocess
def test_the_training_curve_follows_the_whole_run(uninterrupted):
    """metrics.json's train_curve: a point every CURVE_EVERY steps and one after the last step,
    with the batches' FVU falling and AuxK's dead count from the progress bar."""
    from trainer.train import CURVE_EVERY

    metrics = runfolder.load_metrics(uninterrupted / "reference")
    curve, steps, batch = metrics["train_curve"], metrics["train_steps"], 64
    assert curve["tokens"] == [(step + 1) * batch for step in range(0, steps, CURVE_EVERY)] + (
        [steps * batch] if (steps - 1) % CURVE_EVERY else [])
    assert curve["tokens"][-1] == metrics["train_tokens"]
    assert len(curve["fvu"]) == len(curve["dead"]) == len(curve["tokens"])
    assert curve["fvu"][-1] == metrics["train_fvu_final"] and curve["fvu"][-1] < 0.7 * curve["fvu"][0]
    assert all(isinstance(d, int) and 0 <= d <= 256 for d in curve["dead"])


@pytest.mark.multiprocess
def test_a_shared_store_of_another_configuration_is_not_overwritten(uninterrupted, tiny_model_dir):
    """--store names a store that other SAEs read: a run of another layer or context length
    stops with one line before any compute, and the store stays as it was."""
    store = uninterrupted / "store"
    before = {name: (store / name).read_bytes() for name in ("meta.json", "tokens.npy")}
    stamp = (store / "activations.npy").stat().st_mtime_ns
    args = [*ARGS]
    args[args.index("--layer") + 1] = "0"
    result = saescope("train", "--out", str(uninterrupted / "other-layer"), "--store", str(store),
                      "--model", str(tiny_model_dir), *args)
    assert result.returncode == 2
    assert "holds the activations of another configuration (layer 1, not 0)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {name: (store / name).read_bytes() for name in before} == before
    assert (store / "activations.npy").stat().st_mtime_ns == stamp
    assert not (uninterrupted / "other-layer").exists()


@pytest.mark.multiprocess
def test_train_does_not_replace_a_trained_sae_or_a_checkpoint_unless_told(uninterrupted, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "reference", run)
    weights = (run / runfolder.SAE_FILE).read_bytes()
    again = ["train", "--out", str(run), "--store", str(uninterrupted / "store"), "--model", str(tiny_model_dir), *ARGS]
    result = saescope(*again)
    assert result.returncode == 2 and "already holds a trained SAE: pass --overwrite" in result.stderr
    assert (run / runfolder.SAE_FILE).read_bytes() == weights and (run / runfolder.METRICS_FILE).exists()

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / CHECKPOINT_FILE).write_bytes(b"a killed run's")
    result = saescope("train", "--out", str(killed), *again[3:])
    assert result.returncode == 2 and f"saescope train --resume {killed}" in result.stderr
    assert (killed / CHECKPOINT_FILE).read_bytes() == b"a killed run's"

    args = [*again]
    args[args.index("--k") + 1] = "6"  # another SAE on the same store
    assert saescope(*args, "--overwrite").returncode == 0
    assert RunConfig.load(run).k == 6
    assert (run / runfolder.SAE_FILE).read_bytes() != weights


@pytest.mark.multiprocess
def test_an_overwrite_killed_mid_way_keeps_the_old_run_until_it_finishes(uninterrupted, tiny_model_dir, tmp_path):
    """train --overwrite replaces a run's SAE, metrics and harvest only when its own weights are
    written: killed before, the folder still holds the old run, whole; --resume then finishes the
    new one and leaves none of the old run's results beside it."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "reference", run)
    (run / runfolder.HARVEST_DIR).mkdir()
    runfolder.write_json(run / runfolder.HARVEST_DIR / "harvest.json", {"version": runfolder.HARVEST_VERSION})
    runfolder.save_metrics(run, {**runfolder.load_metrics(run), "fvu": 0.1})  # as if evaluated
    old = {path.relative_to(run): path.read_bytes() for path in run.rglob("*") if path.is_file()}
    args = [*ARGS]
    args[args.index("--k") + 1] = "6"
    kill_at_first_checkpoint(run, "--store", str(uninterrupted / "store"), "--model", str(tiny_model_dir), "--overwrite", *args)
    assert {path: (run / path).read_bytes() for path in old} == old

    assert saescope("train", "--resume", str(run)).returncode == 0
    assert RunConfig.load(run).k == 6 and not (run / CHECKPOINT_FILE).exists()
    assert (run / runfolder.SAE_FILE).read_bytes() != old[Path(runfolder.SAE_FILE)]
    assert not (run / runfolder.HARVEST_DIR).exists()  # the old weights' harvest went with them
    assert "fvu" not in runfolder.load_metrics(run)  # the new run's training metrics, not the old eval's


def other_layer_store(uninterrupted, folder: Path) -> Path:
    """A copy of the tests' store that says it holds layer 0 (as a store rebuilt there would)."""
    shutil.copytree(uninterrupted / "store", folder)
    meta = runfolder.read_json(folder / "meta.json")
    runfolder.write_json(folder / "meta.json", {**meta, "layer": 0})
    return folder


@pytest.mark.multiprocess
def test_the_run_folders_own_store_of_another_configuration_is_replaced_only_with_overwrite(
        uninterrupted, tiny_model_dir, tmp_path):
    """A folder that keeps one store for several runs (the demo's, a sweep's) is not rebuilt for
    another layer by a run trained into it."""
    workdir = tmp_path / "workdir"
    store = other_layer_store(uninterrupted, workdir / "activations")
    before = (store / "meta.json").read_bytes()
    args = ["train", "--out", str(workdir), "--model", str(tiny_model_dir), *ARGS]
    result = saescope(*args)
    assert result.returncode == 2 and "holds the activations of another configuration (layer 0, not 1)" in result.stderr
    assert (store / "meta.json").read_bytes() == before
    assert saescope(*args, "--overwrite").returncode == 0
    assert runfolder.read_json(store / "meta.json")["layer"] == 1


@pytest.mark.multiprocess
def test_resume_refuses_a_store_replaced_since_the_kill(uninterrupted, tmp_path):
    store = other_layer_store(uninterrupted, tmp_path / "store")
    run = tmp_path / "killed"
    run.mkdir()
    cfg = RunConfig.load(uninterrupted / "reference")
    saved = cfg.train.to_dict()
    torch.save({"sae": {}, "cfg": saved, "store": str(store), "step": 3}, run / CHECKPOINT_FILE)
    result = saescope("train", "--resume", str(run))
    assert result.returncode == 2 and "cannot be resumed on them" in result.stderr, result.stderr
    assert not (run / runfolder.SAE_FILE).exists()


@pytest.mark.multiprocess
def test_nan_stops_training_naming_the_step_and_keeps_the_checkpoint(uninterrupted, tiny_model_dir):
    store = uninterrupted / "nan-store"
    shutil.copytree(uninterrupted / "store", store)
    activations = np.load(store / "activations.npy", mmap_mode="r+")
    activations[300 * 32 + 5] = np.nan  # one token of context 300: the second chunk, steps 128..255
    activations.flush()
    del activations
    run = uninterrupted / "nan"
    result = saescope("train", "--out", str(run), "--store", str(store), "--model", str(tiny_model_dir), *ARGS)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "non-finite at step" in error
    failed_at = int(error.split("at step ")[1].split()[0])
    assert 128 <= failed_at < 256
    saved = torch.load(run / CHECKPOINT_FILE, weights_only=False)
    assert saved["step"] <= failed_at and all(torch.isfinite(t).all() for t in saved["sae"].values())
    assert not (run / runfolder.SAE_FILE).exists()


def test_multi_topk_makes_the_sae_work_at_4k(tiny_run):
    """Multi-TopK (Gao et al. 2024, Section 5.3): trained with L(k) + L(4k)/8, the SAE
    reconstructs better than a plain TopK SAE when run at 4k."""
    from trainer.config import TrainConfig
    from trainer.store import ActivationStore
    from trainer.train import Trainer

    cfg = RunConfig.load(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    x = store.rows(store.n_train_contexts, store.n_contexts) * cfg.input_scale

    def fvu_at_4k(multi_topk: int) -> float:
        train_cfg = TrainConfig(model=cfg.model, layer=1, n_latents=64, k=4, tokens=8192, heldout_tokens=2048,
                                context_length=32, batch_size=256, multi_topk=multi_topk, lr=4e-3,
                                normalization="scale")  # x above is scaled, not normalised per token
        trainer = Trainer(train_cfg, store, cfg.input_scale)
        trainer.fit()
        with torch.no_grad():
            sae = trainer.sae
            x_on = x.to(trainer.device)  # cuda where there is one
            x_hat = sae.decode(sae.encode(x_on, k=16))
        return float((x_on - x_hat).pow(2).sum() / (x_on - x_on.mean(0)).pow(2).sum())

    assert fvu_at_4k(multi_topk=1) < fvu_at_4k(multi_topk=0)


def test_rescaled_auxk_turns_dead_latents_without_shrinking_them(tiny_run):
    """AuxK's reconstruction of the residual from many near-random dead latents overshoots it;
    the paper's unscaled loss then pushes every dead latent's activation down (its derivative
    along the dead latents' own encoder weights is positive), which in short runs killed more
    latents than it revived. Rescaled per token by its least-squares factor, that radial
    derivative is zero: the gradient only turns the dead latents."""
    from trainer.config import TrainConfig
    from trainer.store import ActivationStore
    from trainer.train import Trainer, input_scale

    cfg = RunConfig.load(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    scale = input_scale(store, cfg.positions)  # x below is scaled by hand
    trainer = Trainer(TrainConfig(model=cfg.model, layer=1, n_latents=256, k=4, context_length=32, normalization="scale"),
                      store, scale)
    trainer.init_b_dec()
    trainer.k_aux = 64
    trainer.tokens_since_fired[8:] = 10**9  # all but 8 latents dead
    sae = trainer.sae
    x = (store.rows(0, 8) * scale).to(trainer.device)
    x_c = x - sae.b_dec.detach()
    pre = sae.pre_acts_centered(x_c)
    error = 0.2 * (x - x.mean(0))  # a residual a fifth of the data's spread, as after some training
    total_variance = (x - x.mean(0)).pow(2).sum()

    def gradients(rescale: int) -> tuple[float, float]:
        """The derivative along the encoder's own weights (radial), and the gradient's norm."""
        trainer.cfg.auxk_rescale = rescale
        sae.zero_grad()
        trainer.auxk_loss(x_c, pre, error, total_variance).backward()
        grad, weights = torch.cat([sae.W_enc_T.grad, sae.b_enc.grad[:, None]], 1), torch.cat([sae.W_enc_T, sae.b_enc[:, None]], 1)
        return float((grad * weights.detach()).sum()), float(grad.norm() * weights.detach().norm())

    (unscaled, unscaled_norm), (rescaled, rescaled_norm) = gradients(0), gradients(1)
    assert unscaled > 0.1 * unscaled_norm  # mostly shrinking
    assert abs(rescaled) < 1e-4 * rescaled_norm  # a gradient (not zero), none of it radial


@pytest.mark.parametrize("k_aux", [64, 20])
def test_a_step_with_few_dead_latents_updates_as_the_sparse_route_would(tiny_run, k_aux):
    """With at most SUBSET_LIMIT times as many dead latents as AuxK chooses, AuxK runs as dense
    products over the dead latents (SubsetLatents; with more than k_aux of them, those a token did
    not choose at zero); the optimiser steps, decoder renormalisation and dead counters after them
    are the ones the sparse route (SparseTopK over the top k_aux of the masked pre-activations)
    gives."""
    from trainer.train import SUBSET_LIMIT

    def stepped(route: str) -> dict:
        trainer = tiny_trainer(tiny_run, n_latents=256, k=4, dead_tokens=10**6)
        trainer.init_b_dec()
        trainer.tokens_since_fired[::5] = 10**9  # 52 dead latents
        trainer.k_aux = k_aux
        assert 52 <= SUBSET_LIMIT * k_aux
        subsets = []
        dense_route = trainer.decode_subset

        def decode_subset(x_c, pre, subset, k):
            subsets.append(len(subset))
            if route == "dense":
                return dense_route(x_c, pre, subset, k)
            masked = torch.full_like(pre, float("-inf"))
            masked[:, subset] = pre[:, subset]
            return trainer.decode(x_c, trainer.world.topk(masked, min(k, len(subset))))[0]

        trainer.decode_subset = decode_subset
        x = next(trainer.batches())[1]
        for step in range(3):  # Adam's moments in play
            result = trainer.step(x, 1e-3)
        assert result.auxk > 0 and subsets[0] == 52 and len(subsets) == 3  # with k_aux 20, more dead than chosen
        return {"auxk": result.auxk, "fired": trainer.tokens_since_fired.clone(),
                **{name: p.detach().clone() for name, p in trainer.sae.named_parameters()}}

    dense, sparse = stepped("dense"), stepped("sparse")
    assert torch.equal(dense.pop("fired"), sparse.pop("fired"))
    assert dense.pop("auxk") == pytest.approx(sparse.pop("auxk"), rel=1e-4)
    for name in sparse:
        assert_close(dense[name], sparse[name], atol=1e-5, rtol=1e-5, msg=name)


def test_retraining_a_folder_drops_its_old_metrics_and_harvest(tiny_run, tmp_path):
    """Stale numbers must never sit beside new weights (the demo skips stages whose output exists)."""
    from trainer.config import TrainConfig
    from trainer.train import train

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert (run / "metrics.json").exists() and (run / "harvest" / "harvest.json").exists()
    cfg = RunConfig.load(tiny_run)
    store_meta = runfolder.read_json(Path(cfg.store.path) / "meta.json")
    train(TrainConfig(model=cfg.model, layer=1, n_latents=64, k=4, tokens=8192, heldout_tokens=2048,
                      context_length=32, batch_size=256, corpus=cfg.train.corpus), run, cfg.store.path)
    assert runfolder.read_json(Path(cfg.store.path) / "meta.json") == store_meta  # the same store: reused, not rebuilt
    metrics = runfolder.load_metrics(run)
    assert "fvu" not in metrics  # training metrics only, until eval runs
    assert not (run / "harvest").exists()
    # The store was reused: its forward ran in another run, and no forward throughput is claimed.
    assert "end_to_end_tokens_per_s" in metrics and "forward_tokens_per_s" not in metrics
    assert "end_to_end_ratio_to_forward" not in metrics


def test_the_memory_budget_sets_the_chunks_read_from_the_store(tiny_run):
    """Training holds one chunk of activations at a time, sized by --memory-budget-mb; every
    token still trains exactly once, and the pages of a read chunk leave the process."""
    from trainer.config import ConfigError, TrainConfig
    from trainer.store import ActivationStore
    from trainer.train import Trainer

    cfg = RunConfig.load(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    bytes_per_context = 2 * store.context_length * store.meta["d_model"] * 4  # chunk + its shuffled copy, fp32
    released = []
    store.release = lambda first, last: released.append((first, last))
    for budget, expected in ((1, 2**20 // bytes_per_context), (10_000, store.n_train_contexts)):
        trainer = Trainer(TrainConfig(model=cfg.model, layer=1, n_latents=64, k=4, context_length=32,
                                      batch_size=64, memory_budget_mb=budget), store, 1.0)
        assert min(trainer.chunk_contexts, store.n_train_contexts) == min(expected, store.n_train_contexts)
        released.clear()
        tokens = sum(len(x) for _, x in trainer.batches())
        chunks = list(trainer.chunks())
        T = store.context_length  # the positions that count, in whole batches of 64 per chunk
        assert tokens == sum(int(trainer.counted[first * T : last * T].sum()) // 64 * 64 for first, last in chunks)
        assert released == chunks
    with pytest.raises(ConfigError, match="--memory-budget-mb"):
        TrainConfig(memory_budget_mb=0)


def test_each_epoch_trains_every_token_once_in_a_new_order(tiny_run):
    """--epochs 2: the training tokens that count (not the first position, not a separator) once
    per pass but for a part batch, each pass shuffled anew, the schedule and
    the default dead window over both passes, and a resumed run's batches the same as an
    uninterrupted run's (also when it resumes in the second pass)."""
    from trainer.config import ConfigError, TrainConfig
    from trainer.store import ActivationStore
    from trainer.train import Trainer

    cfg = RunConfig.load(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    store.token_rows = lambda positions: positions[:, None].float()  # each batch row says which token it is
    one, two = (Trainer(TrainConfig(model=cfg.model, layer=1, n_latents=64, k=4, context_length=32, batch_size=64,
                                    tokens=store.n_train_contexts * 32, epochs=epochs, normalization="scale"), store, 1.0)
                for epochs in (1, 2))  # scale 1: a batch's values stay the token numbers
    assert two.total_steps == 2 * one.total_steps
    assert two.cfg.effective_dead_tokens == 2 * one.cfg.effective_dead_tokens
    batches = [(step, x.flatten().long()) for step, x in two.batches()]
    assert [step for step, _ in batches] == list(range(two.total_steps))
    first, second = (torch.cat([x for _, x in part]) for part in (batches[: one.total_steps], batches[one.total_steps :]))
    assert torch.equal(first, torch.cat([x.flatten().long() for _, x in one.batches()]))  # pass 1 is the 1-epoch run
    # Each token at most once a pass; a chunk's last part batch is left out, another one each pass.
    assert len(first.unique()) == len(first) == len(second) == len(second.unique())
    left_out = int(one.counted.sum()) - len(first)
    assert 0 <= left_out < 64 * len(list(one.chunks()))
    assert len(set(first.tolist()) ^ set(second.tolist())) <= 2 * left_out
    assert one.counted[first].all() and len(first) > 0.9 * int(one.counted.sum())  # only the positions that count
    assert not torch.equal(first, second)  # in another order
    resume_at = one.total_steps + 3
    assert all(torch.equal(x.flatten().long(), batches[step][1]) for step, x in two.batches(resume_at))
    with pytest.raises(ConfigError, match="--epochs"):
        TrainConfig(epochs=0)


@pytest.mark.multiprocess
def test_resume_refuses_a_checkpoint_with_the_old_encoder_layout(tmp_path):
    """Checkpoints written before W_enc_T hold W_enc as [d_in, n] with Adam moments laid out for
    it: resuming one would pair moments with the wrong weights, so it stops with a clear error."""
    run = tmp_path / "old"
    run.mkdir()
    torch.save({"sae": {"W_enc": torch.zeros(4, 8)}, "cfg": {}}, run / CHECKPOINT_FILE)
    result = saescope("train", "--resume", str(run))
    assert result.returncode == 2 and "older saescope" in result.stderr and "without --resume" in result.stderr
    assert (run / CHECKPOINT_FILE).exists()  # nothing changed


# ------------------------------------------------------------ the recipe's details


def tiny_trainer(tiny_run, **overrides):
    """A Trainer on the tiny run's store (d_in 32, 256 training contexts of 32 tokens)."""
    from trainer.config import TrainConfig
    from trainer.store import ActivationStore
    from trainer.train import Trainer

    cfg = RunConfig.load(tiny_run)
    store = ActivationStore.open(cfg.store.path)
    options = dict(model=cfg.model, layer=1, n_latents=64, k=4, tokens=8192, heldout_tokens=2048, context_length=32,
                   batch_size=64, checkpoint_every=0, normalization="scale") | overrides
    return Trainer(TrainConfig(**options), store, cfg.input_scale)


def test_inputs_are_scaled_to_a_mean_squared_norm_of_d_in(tiny_run, tiny_model_dir, hostile_corpus, tmp_path):
    """Gao et al. 2024 (Section 2.1), --normalization scale: a fixed scale makes E||x||^2 = d_in,
    measured on the first training contexts at the positions that count (not the attention sink);
    it is the one cfg.json records and training applies. Per token (the default), none is kept."""
    from saescope.cli import main
    from tests.conftest import TINY_TRAIN_ARGS
    from trainer.store import ActivationStore
    from trainer.train import input_scale

    cfg = RunConfig.load(tiny_run)
    assert cfg.normalization == "token" and cfg.input_scale == 1.0
    store = ActivationStore.open(cfg.store.path)
    scale = input_scale(store, cfg.positions)
    n = min(64, store.n_train_contexts)
    x = store.rows(0, n)[torch.from_numpy(store.counted(cfg.positions, 0, n).reshape(-1))]
    assert len(x) < n * store.context_length  # the first positions and separators are left out
    assert float((x * scale).pow(2).sum(-1).mean()) == pytest.approx(cfg.d_in, rel=1e-4)
    assert float(x.pow(2).sum(-1).mean()) != pytest.approx(cfg.d_in, rel=0.1)  # not so before
    scaled = tmp_path / "scaled"
    args = ["--model", str(tiny_model_dir), "--corpus", str(hostile_corpus), *TINY_TRAIN_ARGS, "--normalization", "scale"]
    assert main(["train", "--out", str(scaled), "--store", str(cfg.store.path), *args]) == 0
    assert RunConfig.load(scaled).input_scale == pytest.approx(scale, rel=1e-6)


def test_b_dec_starts_at_the_geometric_median_of_a_sample(tiny_run):
    """Section 2.4: b_dec (their b_pre) starts at the geometric median of the data: the point with
    the least summed distance to the sample, not the mean."""
    from trainer.sae import geometric_median

    trainer = tiny_trainer(tiny_run)
    trainer.init_b_dec()
    b_dec = trainer.sae.b_dec.detach().cpu()
    counted = torch.from_numpy(trainer.store.counted(trainer.cfg.positions, 0, 32).reshape(-1))
    sample = trainer.store.rows(0, 32)[counted] * trainer.scale  # the positions that count
    assert_close(b_dec, geometric_median(sample), rtol=1e-5, atol=1e-5)

    def summed_distance(point):
        return float((sample - point).norm(dim=-1).sum())

    assert summed_distance(b_dec) < summed_distance(sample.mean(0))
    steps = torch.randn(8, sample.shape[1], generator=torch.Generator().manual_seed(0)) * 0.05
    assert all(summed_distance(b_dec) <= summed_distance(b_dec + step) for step in steps)


def test_decoder_rows_have_unit_norm_after_training(tiny_run):
    W_dec = runfolder.load_sae_weights(tiny_run)["W_dec"]
    assert_close(W_dec.norm(dim=-1), torch.ones(W_dec.shape[0]), rtol=0, atol=1e-5)


def test_defaults_follow_the_recipe(tiny_run):
    """AuxK at weight 1 on the top d_in/2 dead latents, a latent dead after min(10M, a 300th of the
    tokens trained on), batches of 256, per-token normalisation, Adam with a small eps, and the
    1/sqrt(n) learning rate with the constant config.py documents (9e-4 at n = 2^14, measured on
    the reference task; EleutherAI's is 2e-4). The sweep keeps the settings it was measured with."""
    from trainer.config import LR_CONSTANT, SWEEP_TRAIN_DEFAULTS, TrainConfig

    cfg = TrainConfig()
    assert cfg.auxk_alpha == 1 and cfg.auxk_rescale == 1 and cfg.multi_topk == 0
    assert cfg.batch_size == 256 and cfg.normalization == "token"
    assert cfg.effective_dead_tokens == min(10_000_000, cfg.tokens * cfg.epochs // 300) == 1_000
    assert TrainConfig(tokens=4_000_000_000).effective_dead_tokens == 10_000_000
    assert TrainConfig(epochs=3).effective_dead_tokens == 3 * cfg.tokens // 300
    assert TrainConfig(dead_tokens=5).effective_dead_tokens == 5
    assert LR_CONSTANT == 9e-4
    assert TrainConfig(n_latents=2**14).effective_lr == pytest.approx(9e-4)
    assert TrainConfig(n_latents=2**12).effective_lr == pytest.approx(1.8e-3)  # the reference task's
    assert TrainConfig(n_latents=2**16).effective_lr == pytest.approx(4.5e-4)  # 1/sqrt(n)
    assert TrainConfig(lr=1e-3).effective_lr == 1e-3
    assert SWEEP_TRAIN_DEFAULTS["batch_size"] == 1024 and SWEEP_TRAIN_DEFAULTS["lr"] == 1.2e-3

    trainer = tiny_trainer(tiny_run, n_latents=256)
    assert trainer.k_aux == trainer.store.meta["d_model"] // 2 == 16
    assert tiny_trainer(tiny_run, n_latents=8).k_aux == 8  # never more than there are latents
    adam = trainer.optimizer.defaults
    assert adam["eps"] <= 1e-9 and adam["betas"] == (0.9, 0.999) and adam["lr"] == trainer.cfg.effective_lr


def test_the_learning_rate_warms_up_then_holds_or_decays():
    from trainer.config import TrainConfig
    from trainer.train import learning_rate

    total = 1000
    held = TrainConfig(n_latents=2**14, warmup_fraction=0.05, decay_fraction=0)
    peak = held.effective_lr
    rates = [learning_rate(held, step, total) for step in range(total)]
    assert rates[0] == pytest.approx(peak / 50)  # linear warm-up over 5 % of the steps
    assert all(a < b for a, b in zip(rates[:50], rates[1:50]))
    assert rates[49:] == [pytest.approx(peak)] * (total - 49)  # then held to the end

    decayed = TrainConfig(n_latents=2**14, warmup_fraction=0.05, decay_fraction=0.3)
    rates = [learning_rate(decayed, step, total) for step in range(total)]
    assert rates[49:700] == [pytest.approx(peak)] * (700 - 49)
    assert all(a > b for a, b in zip(rates[700:], rates[701:]))  # a linear decay over the last 30 %
    assert rates[850] == pytest.approx(peak / 2) and 0 < rates[-1] < 0.01 * peak


def test_non_finite_weights_stop_training_naming_the_step_and_keep_the_last_good_checkpoint(tiny_run, tmp_path):
    """Weights are checked before each checkpoint: one that turned NaN stops the run there, with
    the step named, and the checkpoint before it stays (finite) for a retry at a lower --lr."""
    from trainer.train import TrainingError, checkpointer

    trainer = tiny_trainer(tiny_run, checkpoint_every=25)
    real_step, steps = trainer.step, []

    def step(x, lr):
        result = real_step(x, lr)
        steps.append(len(steps))
        if len(steps) == 50:  # after step 49, just before the second checkpoint
            with torch.no_grad():
                trainer.sae.b_enc[3] = float("nan")
        return result

    trainer.step = step
    save = checkpointer(tmp_path, trainer.cfg, trainer.store.path, trainer.scale)
    with pytest.raises(TrainingError, match=r"at step 49 \(non-finite weights\).*last good checkpoint is kept"):
        trainer.fit(save)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert saved["step"] == 25
    assert all(torch.isfinite(t).all() for t in saved["sae"].values())


def test_metrics_record_the_throughput_of_the_run_and_of_its_forward(tiny_run):
    """The tiny run built its store: metrics.json has the SAE step's and the whole run's tokens/s,
    and the forward's (the model over the training tokens, timed in meta.json) with the ratio of
    the two; a run that reuses a store has no forward to report (test above)."""
    from trainer.store import ActivationStore

    metrics = runfolder.load_metrics(tiny_run)
    for key in ("sae_tokens_per_s", "end_to_end_tokens_per_s", "forward_tokens_per_s"):
        assert metrics[key] > 0, key
    store = ActivationStore.open(RunConfig.load(tiny_run).store.path)
    tokens = store.n_train_contexts * store.context_length
    assert metrics["forward_tokens_per_s"] == pytest.approx(tokens / store.meta["forward_seconds"])
    ratio = metrics["end_to_end_tokens_per_s"] / metrics["forward_tokens_per_s"]
    assert metrics["end_to_end_ratio_to_forward"] == pytest.approx(ratio)
    assert 0 < ratio < 1  # the run's wall time holds the forward, over at least its tokens
    assert metrics["end_to_end_tokens_per_s"] < metrics["sae_tokens_per_s"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("content", [b"\x80garbage" * 40, b""])
def test_resume_names_a_damaged_checkpoint_in_one_line(tmp_path, content):
    (tmp_path / CHECKPOINT_FILE).write_bytes(content)
    result = saescope("train", "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.multiprocess
def test_resume_says_which_given_options_it_ignores(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"")
    result = saescope("train", "--resume", str(tmp_path), "--latents", "128", "--layer", "0", "--overwrite")
    assert (f"note: --resume continues {tmp_path} with the settings it was started with; "
            "ignored: --layer 0, --latents 128, --overwrite") in result.stderr
    assert saescope("train", "--resume", str(tmp_path)).stderr.count("note:") == 0


def outlier_sink_store(path, n_contexts: int = 320, n_heldout: int = 64, T: int = 16, d: int = 16):
    """A store in the real format whose position 0 is an attention sink: every context's first
    row is far larger than the others (a sparse code over 48 directions plus noise)."""
    from trainer.store import ActivationStore

    rng = np.random.default_rng(0)
    directions = rng.standard_normal((48, d))
    codes = rng.standard_normal((n_contexts * T, 48)) * (rng.random((n_contexts * T, 48)) < 0.08)
    rows = (codes @ directions + 0.05 * rng.standard_normal((n_contexts * T, d))).reshape(n_contexts, T, d)
    rows[:, 0] = 40 * rng.standard_normal((n_contexts, d))  # ~10x the others' norm, in no fixed direction
    path.mkdir(parents=True)
    meta = {"model": "synthetic", "layer": 0, "n_contexts": n_contexts, "n_heldout": n_heldout, "context_length": T,
            "d_model": d, "complete": True, "heldout_complete": True, "special_token_ids": []}
    runfolder.write_json(path / "meta.json", meta)
    np.save(path / "tokens.npy", np.ones((n_contexts, T), dtype=np.int32))
    np.save(path / "activations.npy", rows.reshape(-1, d).astype(np.float16))
    return ActivationStore.open(path)


def test_leaving_the_attention_sink_out_of_training_lowers_the_fvu_on_the_other_positions(tmp_path):
    """An SAE trained on every position spends latents on the sink; trained without it, it
    reconstructs the positions that count better. eval reports both FVUs."""
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate_sae
    from trainer.store import Positions
    from trainer.train import Trainer, input_scale

    store = outlier_sink_store(tmp_path / "store")
    results = {}
    for exclude_first in (0, 1):
        cfg = TrainConfig(model="synthetic", layer=0, n_latents=32, k=4, tokens=256 * 16, heldout_tokens=64 * 16,
                          context_length=16, batch_size=128, epochs=4, exclude_first=exclude_first,
                          exclude_special_tokens=False, fast_matmul=False, checkpoint_every=0, device="cpu", lr=3e-3)
        scale = input_scale(store, cfg.positions)
        trainer = Trainer(cfg, store, scale)
        trainer.fit()
        results[exclude_first] = evaluate_sae(trainer.sae.eval().requires_grad_(False), store, scale, Positions(1, False))
    assert results[1]["fvu"] < 0.8 * results[0]["fvu"], results
    for metrics in results.values():
        assert metrics["fvu_all_positions"] != metrics["fvu"]
