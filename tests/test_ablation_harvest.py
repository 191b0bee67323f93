"""`saescope harvest --ablation-examples N` on the tiny real model: every latent's feature-page
ablation section in RUN/harvest/ablations.safetensors, loaded into `latent_ablations`, the same
numbers the page computes on first view; a bad N changes nothing; a harvest killed in the middle
resumes from its checkpoint to the same artifact. And the mechanism under it: the blocks after the
hookpoint run from a captured residual stream give the whole model's output."""

from __future__ import annotations

import shutil
import threading
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from saescope.cli import main
from trainer import ablation_harvest
from trainer.ablation_harvest import CHECKPOINT_DIR, CHECKPOINT_FILE
from trainer.errors import RunFolderError
from trainer.files import write_tensors
from trainer.interventions import Ablator
from trainer.runfolder import ABLATIONS_FILE, HARVEST_DIR, load_harvest, load_sae

N = 5  # ablated top examples per latent: as many as the page computes on first view
TOL = 2e-4


@pytest.fixture(scope="module")
def ablated_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("ablated") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["harvest", str(run), "--ablation-examples", str(N)]) == 0
    return run


def test_resuming_from_the_hookpoint_gives_the_whole_forward_and_stays_in_its_thread(tiny_run):
    cfg, _ = load_sae(tiny_run)
    lm = cfg.language_model("cpu")
    loaded = lm.loaded
    ids = torch.from_numpy(load_harvest(tiny_run, cfg).token_ids[:3].numpy()).long()
    seen = {}

    def other_thread():  # a forward of another thread meanwhile captures nothing
        with loaded.autocast():  # autocast is per thread (bf16 where the CPU has it, as the product runs)
            seen["plain"] = loaded.base(input_ids=ids, use_cache=False).last_hidden_state

    with torch.no_grad(), loaded.autocast(), loaded.capturing(lm.layer) as captured:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert captured.resid is None
        whole = loaded.base(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.equal(captured.resid, lm.residual(ids))
        resumed = loaded.resume(captured, captured.resid.clone())
        assert torch.allclose(resumed, whole, atol=1e-5) and torch.allclose(seen["plain"], whole, atol=1e-5)
        # other contexts of the same shape, through the captured call: what their own pass gives
        other = torch.from_numpy(load_harvest(tiny_run, cfg).token_ids[3:6].numpy()).long()
        expected = loaded.base(input_ids=other, use_cache=False).last_hidden_state
        assert torch.allclose(loaded.resume(captured, lm.residual(other)), expected, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_resuming_works_for_gpt2_blocks_too(attention):
    """GPT-2's blocks take their mask and positions otherwise than Llama's: resume calls them as captured."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.model import LoadedModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0,
                        attn_implementation=attention)
    loaded = LoadedModel("tiny-gpt2", None, GPT2LMHeadModel(config).eval(), torch.float32)
    ids, other = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        with loaded.capturing(0) as captured:
            whole = loaded.base(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.allclose(loaded.resume(captured, captured.resid), whole, atol=1e-5)
        expected = loaded.base(input_ids=other, use_cache=False).last_hidden_state
        assert torch.allclose(loaded.resume(captured, loaded.residual(other, 0)), expected, atol=1e-5)


@pytest.mark.slow  # the harvest with its ablation stage: half a minute on a busy 2-core machine
def test_harvest_writes_every_latents_section_and_the_loader_stores_it(ablated_run):
    harvest = load_harvest(ablated_run)
    assert harvest.info["ablation_examples"] == N and (ablated_run / HARVEST_DIR / ABLATIONS_FILE).is_file()
    ablations = harvest.ablations
    n, T = harvest.n_latents, harvest.token_ids.shape[1]
    assert ablations["ablation_delta_logprob"].shape == (n, N, T)
    fired = harvest.top_context[:, :N] >= 0
    assert (ablations["ablation_activations"].amax(-1)[fired] > 0).any()
    assert (ablations["ablation_activations"][~fired] == 0).all()
    assert not (ablated_run / CHECKPOINT_DIR).exists()  # saving the harvest sweeps its checkpoint


@pytest.mark.slow  # ten sections computed on first view, to compare
def test_feature_pages_show_the_harvests_sections_as_the_page_computes_them(ablated_run, tmp_path):
    from fastapi.testclient import TestClient

    from app.loader import load_run
    from app.main import create_app
    from app.settings import Settings

    lazy_run = tmp_path / "lazy"  # the same run without the artifact: the page computes each section
    shutil.copytree(ablated_run, lazy_run)
    (lazy_run / HARVEST_DIR / ABLATIONS_FILE).unlink()
    precomputed, lazy = f"sqlite:///{tmp_path / 'pre.db'}", f"sqlite:///{tmp_path / 'lazy.db'}"
    sae_id = load_run(ablated_run, precomputed)
    load_run(lazy_run, lazy)
    with TestClient(create_app(Settings(database_url=precomputed))) as pre, \
         TestClient(create_app(Settings(database_url=lazy))) as computed:
        compared = 0
        for latent in range(0, 64, 7):
            feature = pre.get(f"/saes/{sae_id}/features/{latent}.json").json()
            mine = feature["ablation"]
            assert mine is not None and len(mine["contexts"]) == N
            page = pre.get(f"/saes/{sae_id}/features/{latent}")
            assert 'class="ablation" id="ablation"' in page.text and 'hx-trigger="revealed"' not in page.text
            assert pre.get(feature["ablation_url"] + ".json").json() == mine  # the kept one, not recomputed
            theirs = computed.get(f"/saes/{sae_id}/features/{latent}/ablation.json").json()  # first view: 5 contexts
            assert_same_section(mine, theirs)
            compared += 1
    assert compared == 10


def assert_same_section(mine: dict, theirs: dict) -> None:
    assert len(mine["contexts"]) == len(theirs["contexts"])
    for a, b in zip(mine["contexts"], theirs["contexts"]):
        assert a["context_id"] == b["context_id"] and a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["activations"], b["activations"], atol=TOL)
        np.testing.assert_allclose(a["delta_logprob"], b["delta_logprob"], atol=TOL)
    assert mine["scale"] == pytest.approx(theirs["scale"], abs=TOL)
    for name in ("raised", "lowered"):
        assert len(mine[name]) == len(theirs[name])
        np.testing.assert_allclose([t["change"] for t in mine[name]], [t["change"] for t in theirs[name]], atol=TOL)
        for a, b in zip(mine[name], theirs[name]):  # the same tokens, but for near ties whose order rounding may swap
            assert (a["token_id"], a["token"]) == (b["token_id"], b["token"]) or abs(a["change"] - b["change"]) < TOL


def test_an_artifact_of_the_old_ranking_is_left_to_the_pages(ablated_run, tmp_path, caplog):
    """ablations.safetensors from before the tokens were ranked by probability (`*_values`): not
    read, so its sections are computed on first view instead of shown with another meaning."""
    from safetensors.torch import load_file

    run = tmp_path / "old"
    shutil.copytree(ablated_run, run)
    path = run / HARVEST_DIR / ABLATIONS_FILE
    tensors = load_file(str(path))
    for side in ("raised", "lowered"):
        tensors[f"ablation_{side}_values"] = tensors.pop(f"ablation_{side}_change")
    write_tensors(path, tensors)
    cfg, _ = load_sae(run)
    with caplog.at_level("WARNING"):
        assert load_harvest(run, cfg).ablations is None
    assert "the old way" in caplog.text


@pytest.mark.parametrize("bad", ["-1", "21", "two"])
def test_a_bad_number_of_examples_is_a_clear_error_that_changes_nothing(tiny_run, bad, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(SystemExit) if bad == "two" else nullcontext():
        code = main(["harvest", str(run), "--ablation-examples", bad])
        assert code == 2
    err = capsys.readouterr().err
    assert "--ablation-examples" in err
    if bad != "two":
        assert "between 0 (none) and --top-k (20)" in err
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.slow  # the harvest with its ablation stage (shared with the tests above)
def test_a_bad_artifact_is_named_when_the_harvest_is_read(ablated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ablated_run, run)
    path = run / HARVEST_DIR / ABLATIONS_FILE
    found = load_harvest(run).ablations
    write_tensors(path, {**found, "ablation_delta_logprob": found["ablation_delta_logprob"][:, :, :5]})
    with pytest.raises(RunFolderError, match="ablations.safetensors: ablation_delta_logprob has shape"):
        load_harvest(run)


@pytest.mark.slow  # three harvests with their ablation stage
def test_a_killed_harvest_resumes_to_the_same_artifact(ablated_run, tmp_path, monkeypatch):
    monkeypatch.setattr(ablation_harvest, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every chunk of contexts
    args = ["--ablation-examples", "2", "--batch-contexts", "8"]
    clean, ablate = Ablator.clean, Ablator.ablate
    cleaned = []
    monkeypatch.setattr(Ablator, "clean", lambda self, *a, **k: cleaned.append(1) or clean(self, *a, **k))
    whole = tmp_path / "whole"
    shutil.copytree(ablated_run, whole)
    assert main(["harvest", str(whole), *args]) == 0
    n_chunks, cleaned[:] = len(cleaned), []

    killed = tmp_path / "killed"
    shutil.copytree(ablated_run, killed)
    before = load_harvest(killed).ablations  # the harvest that was there stays whole
    calls = []

    def dies_on_the_fifth(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the kill, between two checkpoints
        return ablate(self, *a, **k)

    monkeypatch.setattr(Ablator, "ablate", dies_on_the_fifth)
    assert main(["harvest", str(killed), *args]) == 130
    assert (killed / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    assert all(torch.equal(before[k], v) for k, v in load_harvest(killed).ablations.items())

    monkeypatch.setattr(Ablator, "ablate", ablate)
    cleaned[:] = []
    assert main(["harvest", str(killed), *args]) == 0
    assert 0 < len(cleaned) < n_chunks  # the finished chunks were not run again
    resumed, expected = load_harvest(killed).ablations, load_harvest(whole).ablations
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    assert not (killed / CHECKPOINT_DIR).exists()


@pytest.mark.slow  # the harvest with its ablation stage (shared with the tests above)
@pytest.mark.postgresql
def test_postgresql_stores_the_same_sections(ablated_run, tmp_path):
    from fastapi.testclient import TestClient

    from app.loader import load_run
    from app.main import create_app
    from app.settings import Settings
    from tests.app.databases import postgres_schema

    sqlite = f"sqlite:///{tmp_path / 'ablation.db'}"
    sae_id = load_run(ablated_run, sqlite)
    with postgres_schema() as postgres:
        load_run(ablated_run, postgres)
        with TestClient(create_app(Settings(database_url=sqlite))) as lite, \
             TestClient(create_app(Settings(database_url=postgres))) as pg:
            for latent in (1, 30, 63):
                ours = pg.get(f"/saes/{sae_id}/features/{latent}.json").json()["ablation"]
                assert ours is not None and ours == lite.get(f"/saes/{sae_id}/features/{latent}.json").json()["ablation"]
