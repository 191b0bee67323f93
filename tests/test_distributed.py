"""Training over 2 real gloo processes (torchrun on the CPU) against the single-process run: data
parallel and latent sharded give the same weights, and a killed torchrun run resumes."""

from __future__ import annotations

import json
import os
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
from trainer.config import TrainConfig
from trainer.runconfig import CHECKPOINT_FILE
from trainer.store import ActivationStore

pytestmark = pytest.mark.multiprocess  # torchrun and the CLI in subprocesses (the module's reference run too)

# d = 16, 64 latents, k = 4 on 8,192 synthetic tokens: 64 steps of 128 (a killed run is stopped
# well before its end even on a busy machine), AuxK active after a few steps (dead after 819
# tokens); fp32 selection, so that both splits select exactly what one process does; on the CPU
# (gloo), also on a machine with GPUs.
CFG = TrainConfig(model="synthetic", layer=0, n_latents=64, k=4, tokens=8192, heldout_tokens=256, context_length=16,
                  batch_size=128, checkpoint_every=4, fast_matmul=0, lr=3e-3, device="cpu")
ARGS = ["--model", "synthetic", "--layer", "0", "--latents", "64", "--k", "4", "--tokens", "8192", "--heldout-tokens", "256",
        "--context-length", "16", "--batch-size", "128", "--checkpoint-every", "4", "--fast-matmul", "0", "--lr", "0.003",
        "--device", "cpu"]  # fmt: skip


def write_store(path, cfg: TrainConfig, d: int = 16) -> None:
    """An activation store in the real format, from random vectors with a few strong directions."""
    meta = cfg.store_config().meta() | {"d_model": d, "complete": True, "hookpoint": "synthetic", "special_token_ids": []}
    T, C = cfg.context_length, meta["n_contexts"]
    generator = np.random.default_rng(0)
    directions = generator.standard_normal((32, d))
    codes = generator.standard_normal((C * T, 32)) * (generator.random((C * T, 32)) < 0.1)
    activations = 3 + codes @ directions + 0.1 * generator.standard_normal((C * T, d))  # a mean, like a residual stream
    path.mkdir(parents=True)
    np.save(path / "activations.npy", activations.astype(np.float16))
    np.save(path / "tokens.npy", np.zeros((C, T), dtype=np.int32))
    (path / "meta.json").write_text(json.dumps(meta))


def run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer", "train", *args]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The store and a single-process reference run on it."""
    folder = tmp_path_factory.mktemp("distributed")
    write_store(folder / "store", CFG)
    result = run("-m", "saescope.cli", "train", "--out", str(folder / "single"), "--store", str(folder / "store"), *ARGS)
    assert result.returncode == 0, result.stderr
    return folder


def assert_same_weights(run_dir, reference_dir, tolerance=1e-5):
    got, expected = runfolder.load_sae_weights(run_dir), runfolder.load_sae_weights(reference_dir)
    for name in runfolder.SAE_TENSORS:
        assert_close(got[name], expected[name], rtol=tolerance, atol=tolerance)
    metrics, reference = runfolder.load_metrics(run_dir), runfolder.load_metrics(reference_dir)
    assert metrics["train_fvu_final"] == pytest.approx(reference["train_fvu_final"], rel=1e-4)
    curve, expected = metrics["train_curve"], reference["train_curve"]  # dead counts summed over the shards
    assert curve["tokens"] == expected["tokens"] and curve["dead"] == expected["dead"]
    assert curve["fvu"] == pytest.approx(expected["fvu"], rel=1e-4)


def test_data_parallel_on_two_gloo_processes_equals_one_process(folder):
    result = run(*torchrun("--out", str(folder / "dp"), "--store", str(folder / "store"), *ARGS)[1:])
    assert result.returncode == 0, result.stderr
    assert_same_weights(folder / "dp", folder / "single")
    assert json.loads((folder / "dp" / "cfg.json").read_text())["n_latents"] == 64


def test_latent_sharded_on_two_gloo_processes_equals_the_unsharded_model(folder):
    """`saescope train --nproc 2` starts torchrun itself."""
    result = run("-m", "saescope.cli", "train", "--nproc", "2", "--shard-latents", "1",
                 "--out", str(folder / "sharded"), "--store", str(folder / "store"), *ARGS)
    assert result.returncode == 0, result.stderr
    assert_same_weights(folder / "sharded", folder / "single")


@pytest.mark.parametrize("shard", ["0", "1"])
def test_killed_torchrun_run_resumes_to_the_uninterrupted_weights(folder, shard):
    out = folder / f"killed-{shard}"
    process = subprocess.Popen(torchrun("--out", str(out), "--store", str(folder / "store"), "--shard-latents", shard, *ARGS),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT_FILE).exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    for pid in [*children(process.pid), process.pid]:  # both ranks (torchrun puts them in sessions of their own), then torchrun
        os.kill(pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(out / CHECKPOINT_FILE, weights_only=False)["step"]
    assert 0 < killed_at < 64 and not (out / runfolder.SAE_FILE).exists()
    result = run(*torchrun("--resume", str(out), "--shard-latents", shard, "--device", "cpu")[1:])
    assert result.returncode == 0, result.stderr
    assert_same_weights(out, folder / "single")


def test_each_data_parallel_rank_reads_only_its_share_of_the_store(folder):
    import torch.distributed as dist

    from trainer.distributed import World
    from trainer.train import Trainer

    # DDP is built with the trainer: a one-process group stands in for the two ranks, whose
    # reading is what this test looks at (no collective runs in `batches`).
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=0, world_size=1)
    store = ActivationStore.open(folder / "store")
    read = []
    token_rows = store.token_rows
    store.token_rows = lambda positions: read.append(positions.clone()) or token_rows(positions)
    batches = {}
    for rank in range(2):
        read.clear()
        trainer = Trainer(CFG, store, 1.0, World(rank, 2))
        batches[rank] = [x for _, x in trainer.batches()]
        batches[rank, "rows"] = torch.cat(read)
    whole_batches = int(trainer.counted.sum()) // CFG.batch_size  # of the positions that count (not the first)
    assert len(batches[0, "rows"]) == len(batches[1, "rows"]) == whole_batches * CFG.batch_size // 2
    assert not set(batches[0, "rows"].tolist()) & set(batches[1, "rows"].tolist())
    dist.destroy_process_group()
    single = [x for _, x in Trainer(CFG, store, 1.0).batches()]
    for step, x in enumerate(single):  # the global batch is the single process's batch
        assert_close(torch.cat([batches[0][step], batches[1][step]]), x, rtol=0, atol=0)


def test_more_processes_than_gpus_fails_before_torchrun_starts(folder, monkeypatch, capsys):
    """On a machine with one GPU, `--nproc 2` would start a rank with no GPU of its own, which
    dies in CUDA ("invalid device ordinal"). The CUDA runtime is faked: this machine has none."""
    from saescope.cli import main
    from trainer import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "launch", lambda *args: pytest.fail("torchrun started"))
    out = folder / "too-many"
    assert main(["train", "--nproc", "2", "--out", str(out), "--store", str(folder / "store"), *ARGS[:-2]]) == 2
    assert "--nproc 2 needs 2 GPUs, this machine has 1 (--device cpu runs the processes on the CPU)" in capsys.readouterr().err
    assert not out.exists()
    distributed.check_gpus(2, "cpu")  # gloo on the CPU needs no GPU
    distributed.check_gpus(1, "")
    assert distributed.uses_gpus("cuda:0") and not distributed.uses_gpus("cpu")
