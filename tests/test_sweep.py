"""`saescope sweep` on the tiny model: every rung a harvested run folder, scaling.json and families
written, a sweep killed mid-rung resumes to the weights of an uninterrupted one, and the sweep
folder loads into the web app as a ladder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from torch.testing import assert_close

from trainer import runfolder
from trainer.config import ConfigError, SweepConfig, TrainConfig
from trainer.runconfig import RunConfig
from trainer.sweep import rung_configs

ARGS = ["--latents", "32,64,128", "--k", "4", "--ks", "2,4,8", "--k-series-latents", "64",
        "--layer", "1", "--tokens", "4096", "--heldout-tokens", "1024", "--context-length", "32",
        "--batch-size", "64", "--checkpoint-every", "10", "--downstream-contexts", "2", "--family-neighbours", "3"]  # fmt: skip
RUNGS = ["n128-k4", "n32-k4", "n64-k2", "n64-k4", "n64-k8"]


def sweep_command(out, model):
    return [sys.executable, "-m", "saescope.cli", "sweep", "--out", str(out), "--model", str(model), *ARGS]


@pytest.fixture(scope="module")
def finished_sweep(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "ladder"
    result = subprocess.run(sweep_command(out, tiny_model_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.mark.multiprocess
def test_every_rung_is_an_evaluated_run_folder_on_one_store(finished_sweep):
    out, stdout = finished_sweep
    assert sorted(p.name for p in (out / "runs").iterdir()) == RUNGS
    for name in RUNGS:
        cfg, metrics = RunConfig.load(out / "runs" / name), runfolder.load_metrics(out / "runs" / name)
        assert f"n{cfg.n_latents}-k{cfg.k}" == name
        assert cfg.store.path == str((out / "activations").resolve())
        assert {"fvu", "dead_fraction", "delta_ce", "train_wall_s"} <= set(metrics)
        assert runfolder.harvest_is_current(out / "runs" / name)  # harvested from the shared store
    assert not list(out.glob("runs/*/activations"))  # no rung built a store of its own
    assert "fvu_n: R2" in stdout


@pytest.mark.multiprocess
def test_scaling_json_and_families_describe_the_ladder(finished_sweep):
    out, _ = finished_sweep
    scaling = json.loads((out / "scaling.json").read_text())
    assert [(r["n_latents"], r["k"]) for r in scaling["rungs"]] == [(32, 4), (64, 2), (64, 4), (64, 8), (128, 4)]
    assert scaling["fits"]["fvu_n"]["n_points"] == 3 and scaling["fits"]["fvu_n"]["dof"] == 0
    assert "skipped" in scaling["fits"]["fvu_joint"]  # 5 rungs: the joint form needs 6
    from safetensors import safe_open

    with safe_open(out / "families.safetensors", "pt") as f:
        assert json.loads(f.metadata()["rungs"]) == ["runs/n32-k4", "runs/n64-k4", "runs/n128-k4"]
        assert tuple(f.get_tensor("0->2.index").shape) == (32, 3)
        assert tuple(f.get_tensor("2->1.cosine").shape) == (128, 3)


@pytest.mark.multiprocess
def test_killed_sweep_resumes_to_the_uninterrupted_weights(finished_sweep, tiny_model_dir, tmp_path):
    reference, _ = finished_sweep
    out = tmp_path / "ladder"
    process = subprocess.Popen(sweep_command(out, tiny_model_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "runs" / "n64-k2" / "checkpoint.pt").exists():  # the second rung, mid-training
        assert process.poll() is None, "the sweep ended before the second rung's first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    first_done = (out / "runs" / "n32-k4" / runfolder.SAE_FILE).stat().st_mtime_ns

    result = subprocess.run(sweep_command(out, tiny_model_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / "runs" / "n32-k4" / runfolder.SAE_FILE).stat().st_mtime_ns == first_done  # skipped
    assert "n64-k2: resumed" in result.stderr
    assert "n32-k4: done before, harvested before" in result.stderr  # its harvest is not made again
    for name in RUNGS:
        resumed, uninterrupted = runfolder.load_sae_weights(out / "runs" / name), runfolder.load_sae_weights(reference / "runs" / name)
        for tensor in runfolder.SAE_TENSORS:
            assert_close(resumed[tensor], uninterrupted[tensor], rtol=1e-6, atol=1e-6)


@pytest.mark.multiprocess
def test_the_sweep_loads_as_a_ladder(finished_sweep, tmp_path):
    from fastapi.testclient import TestClient
    from safetensors import safe_open

    from app.main import create_app
    from app.settings import Settings
    from saescope.cli import main

    out, _ = finished_sweep
    url = f"sqlite:///{tmp_path / 'saescope.db'}"
    assert main(["load", str(out), "--db", url]) == 0
    with TestClient(create_app(Settings(database_url=url))) as client:
        (ladder,) = client.get("/ladders.json").json()["ladders"]
        page = client.get(ladder["json_url"]).json()
        assert [(r["n_latents"], r["k"]) for r in page["rungs"]] == [(32, 4), (64, 2), (64, 4), (64, 8), (128, 4)]
        assert all(r["sae_id"] for r in page["rungs"])
        assert client.get(ladder["url"]).status_code == 200
        middle = next(r["sae_id"] for r in page["rungs"] if (r["n_latents"], r["k"]) == (64, 4))
        with safe_open(out / "families.safetensors", "pt") as f:
            for latent in (0, 63):
                family = client.get(f"/saes/{middle}/features/{latent}.json").json()["across_sizes"]
                assert [r["index"] for r in family["smaller"][0]["latents"]] == f.get_tensor("1->0.index")[latent, :1].tolist()
                assert [r["index"] for r in family["larger"][0]["latents"]] == f.get_tensor("1->2.index")[latent].tolist()


@pytest.mark.multiprocess
def test_a_rung_that_cannot_work_fails_before_any_compute(tmp_path):
    sweep = SweepConfig(latents="16,32", k=4, ks="8,16", k_series_latents="16")
    with pytest.raises(ConfigError, match="--k must be between"):
        rung_configs(sweep, TrainConfig())  # k = 16 at n = 16
    with pytest.raises(ConfigError, match="comma-separated integers"):
        SweepConfig(latents="1024,lots")
    result = subprocess.run([sys.executable, "-m", "saescope.cli", "sweep", "--out", str(tmp_path / "s"), "--latents", "8", "--k", "8"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.multiprocess
def test_a_sweep_that_fails_its_checks_writes_no_sweep_json(tiny_model_dir, tmp_path):
    """sweep.json makes `load` read a folder as a sweep: a layer beyond the model or a run folder
    as --out fail in one line and leave no sweep.json."""
    run = lambda out, *extra: subprocess.run(  # noqa: E731
        [*sweep_command(out, tiny_model_dir), *extra], capture_output=True, text=True, timeout=120)
    failed = run(tmp_path / "s", "--layer", "7")
    assert failed.returncode == 2 and "layer 7" in failed.stderr and failed.stderr.count("\n") == 1
    assert not (tmp_path / "s" / "sweep.json").exists()

    (tmp_path / "run").mkdir()
    RunConfig(model="m", layer=1, d_in=6, n_latents=12, k=3).save(tmp_path / "run")
    into_a_run = run(tmp_path / "run")
    assert into_a_run.returncode == 2 and "is a run folder (it has cfg.json)" in into_a_run.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["cfg.json"]


def test_an_option_added_since_training_counts_as_its_default(tmp_path):
    """A rung (or the demo's run) trained before an option existed is not retrained for it,
    unless the option is set to something else than its default."""
    from dataclasses import replace

    from trainer import runfolder
    from trainer.config import TrainConfig
    from trainer.sweep import trained_with

    cfg = TrainConfig()
    saved = cfg.to_dict()
    del saved["memory_budget_mb"]  # as written before the option existed
    runfolder.write_json(tmp_path / "cfg.json", {**saved, "d_in": 576})
    (tmp_path / runfolder.SAE_FILE).write_bytes(b"weights")
    assert trained_with(tmp_path, cfg)
    assert not trained_with(tmp_path, replace(cfg, memory_budget_mb=16))
    assert not trained_with(tmp_path, replace(cfg, k=16))


def test_an_option_that_changed_training_counts_as_what_the_run_did(tmp_path):
    """auxk_rescale changed how AuxK trains when it was added (default 1): a run saved before it
    was trained unscaled, so it is current for --auxk-rescale 0 and retrained for the default."""
    from dataclasses import replace

    from trainer import runfolder
    from trainer.config import TrainConfig
    from trainer.sweep import trained_with

    cfg = TrainConfig()
    saved = cfg.to_dict()
    del saved["auxk_rescale"]
    runfolder.write_json(tmp_path / "cfg.json", {**saved, "d_in": 576})
    (tmp_path / runfolder.SAE_FILE).write_bytes(b"weights")
    assert not trained_with(tmp_path, cfg)
    assert trained_with(tmp_path, replace(cfg, auxk_rescale=0))
    assert TrainConfig.from_saved(saved).auxk_rescale == 0 and TrainConfig.from_saved(cfg.to_dict()) == cfg
