"""`saescope export`: folders SAELens and sparsify load as they are, encoding as we do.

Read back by our own import, an export gives the latents of the run it came from (the input scale
folded into the weights, the per-token normalisation as SAELens's layer_norm). The real packages
(sae-lens, eai-sparsify, in the dev extras) load the exports and encode a trained run's held-out
activations to the same top-k latents and FVU as saescope."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from trainer import interop, runfolder
from trainer.errors import RunFolderError
from trainer.export import export_run
from trainer.runconfig import RunConfig
from trainer.sae import TopKSAE

D, N, K = 16, 64, 5


def make_run(folder, normalization="scale", input_scale=0.37, seed=0, model="HuggingFaceTB/some-model", layer=3):
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D, N, generator=g) / D**0.5, "b_enc": torch.randn(N, generator=g) * 0.1,
               "W_dec": torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1),
               "b_dec": torch.randn(D, generator=g)}
    cfg = RunConfig(model=model, layer=layer, d_in=D, n_latents=N, k=K, normalization=normalization,
                    input_scale=input_scale if normalization == "scale" else 1.0, recorded_hookpoint=f"model.layers.{layer}")
    runfolder.save_sae_weights(folder, weights)
    cfg.save(folder)
    return folder


def activations(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, generator=g) * 3 + torch.randn(batch, 1, generator=g)


def encode(run_dir, x):
    """The run's latents (dense) and reconstruction in the model's units, through its normalisation."""
    cfg, sae = runfolder.load_sae(run_dir)
    x_n, stats = cfg.norm.normalize(x)
    latents = sae.encode(x_n)
    return torch.zeros(len(x), N).scatter_(-1, latents.indices, latents.values), cfg.norm.restore(sae.decode(latents), stats)


@pytest.mark.parametrize("to", ["saelens", "sparsify"])
@pytest.mark.parametrize("normalization", ["scale", "token"])
def test_export_read_back_by_our_import_gives_the_same_latents(tmp_path, to, normalization):
    run = make_run(tmp_path / "run", normalization)
    if to == "sparsify" and normalization == "token":
        with pytest.raises(RunFolderError, match="sparsify cannot express"):
            export_run(run, to, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    folder = export_run(run, to, tmp_path / "out")
    assert interop.detect_format(folder) == to
    back = interop.import_sae(folder, tmp_path / "back")
    cfg = RunConfig.load(back)
    assert (cfg.model, cfg.layer, cfg.d_in, cfg.n_latents, cfg.k, cfg.normalization) == (
        "HuggingFaceTB/some-model", 3, D, N, K, normalization)
    x = activations(41)
    want, want_hat = encode(run, x)
    got, got_hat = encode(back, x)
    assert torch.equal(got > 0, want > 0)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(got_hat, want_hat, rtol=1e-5, atol=1e-5)


def test_saelens_folder_layout(tmp_path):
    folder = export_run(make_run(tmp_path / "run"), "saelens", tmp_path / "out")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert {key: cfg[key] for key in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "normalize_activations")} == {
        "architecture": "topk", "d_in": D, "d_sae": N, "k": K, "apply_b_dec_to_input": True, "normalize_activations": "none"}
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["metadata"]["saescope_input_scale_folded"] == 0.37
    assert sorted(path.name for path in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no harvest: no sparsity


def test_sparsify_folder_layout(tmp_path):
    folder = export_run(make_run(tmp_path / "run"), "sparsify", tmp_path / "out")
    assert folder == tmp_path / "out" / "layers.3"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["num_latents"], cfg["k"], cfg["d_in"], cfg["normalize_decoder"]) == (N, K, D, False)  # 1/s-norm rows
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"] == "HuggingFaceTB/some-model"


def test_bundled_model_exports_under_its_hub_name_and_reads_back_as_itself(tmp_path):
    run = make_run(tmp_path / "run", model="smollm2-135m-instruct")
    folder = export_run(run, "saelens", tmp_path / "out")
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["saescope_model"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    assert interop.read_sae_folder(folder)[0].model == "smollm2-135m-instruct"
    sparsify = export_run(run, "sparsify", tmp_path / "sparsify")
    assert interop.read_sae_folder(sparsify)[0].model == "smollm2-135m-instruct"


def test_harvested_run_exports_its_sparsity(tmp_path):
    from safetensors.torch import load_file

    from tests.app.webrun import make_run as make_harvested_run

    run = make_harvested_run(tmp_path / "run")
    folder = export_run(run, "saelens", tmp_path / "out")
    density = runfolder.load_harvest(run).density
    assert_close(load_file(str(folder / "sparsity.safetensors"))["sparsity"], torch.log10(density + 1e-10))


def test_export_refuses_a_folder_that_holds_files_and_says_so_in_one_line(tmp_path, capsys):
    from saescope.cli import main

    run = make_run(tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.strip() == f"saescope export: error: {tmp_path / 'taken'}: already exists and is not an empty folder; export into a new folder"
    assert main(["export", str(run), "--to", "sparsify", "--out", str(tmp_path / "new")]) == 0
    assert "SparseCoder.load_from_disk" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nowhere"), "--to", "saelens", "--out", str(tmp_path / "n")]) == 2


# ---------------------------------------------------------------- the real packages


def heldout(run_dir):
    """The trained run's held-out activations, as its eval read them."""
    from trainer.store import ActivationStore

    cfg = RunConfig.load(run_dir)
    store = ActivationStore.open(cfg.store_dir(run_dir))
    return store, store.rows(store.n_train_contexts, store.n_contexts)


def positive_sets(values, indices):
    return [frozenset(i for v, i in zip(vs, ix) if v > 0) for vs, ix in zip(values.tolist(), indices.tolist())]


@pytest.fixture(scope="module")
def scaled_run(tiny_run, tiny_model_dir, hostile_corpus, tmp_path_factory):
    """The tiny run trained again with one scale (sparsify cannot express per-token normalisation),
    on the same store."""
    from saescope.cli import main
    from tests.conftest import TINY_TRAIN_ARGS

    run = tmp_path_factory.mktemp("scaled") / "run"
    args = ["--model", str(tiny_model_dir), "--corpus", str(hostile_corpus), *TINY_TRAIN_ARGS, "--normalization", "scale"]
    assert main(["train", "--out", str(run), "--store", str(RunConfig.load(tiny_run).store.path), *args]) == 0
    return run


@pytest.mark.slow  # ~15 s: imports sparsify (datasets, its trainer), plus the tiny run's training
def test_sparsify_loads_the_export_and_encodes_heldout_activations_as_we_do(scaled_run, tmp_path):
    from sparsify import SparseCoder

    from trainer.evaluate import evaluate_sae
    from trainer.store import Positions

    folder = export_run(scaled_run, "sparsify", tmp_path / "out")
    coder = SparseCoder.load_from_disk(folder)
    cfg, sae = runfolder.load_sae(scaled_run)
    store, x = heldout(scaled_run)
    ours = sae.encode(cfg.norm.normalize(x)[0])
    with torch.no_grad():
        theirs = coder(x)  # raw activations: the input scale is in the weights
    assert positive_sets(theirs.latent_acts, theirs.latent_indices) == positive_sets(ours.values, ours.indices)
    ours_fvu = evaluate_sae(sae, store, cfg.norm, Positions(0, False))["fvu_all_positions"]
    assert float(theirs.fvu) == pytest.approx(ours_fvu, rel=1e-4)


@pytest.mark.slow  # ~20 s: imports sae_lens (TransformerLens), plus the tiny run's training
@pytest.mark.multiprocess  # importing sae_lens runs `git rev-parse`
def test_saelens_loads_the_export_and_encodes_heldout_activations_as_we_do(tiny_run, tmp_path):
    from sae_lens import SAE

    folder = export_run(tiny_run, "saelens", tmp_path / "out")
    sae_lens = SAE.load_from_disk(str(folder))
    assert sae_lens.cfg.metadata.hook_name == f"blocks.{RunConfig.load(tiny_run).layer}.hook_resid_post"
    cfg, sae = runfolder.load_sae(tiny_run)
    _, x = heldout(tiny_run)
    x_n, stats = cfg.norm.normalize(x)
    ours = sae.encode(x_n)
    with torch.no_grad():
        z = sae_lens.encode(x)
        x_hat = sae_lens.decode(z)
    assert_close(z, torch.zeros(len(x), cfg.n_latents).scatter_(-1, ours.indices, ours.values), rtol=1e-4, atol=1e-4)
    fvu = lambda x_hat: float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())  # noqa: E731
    assert fvu(x_hat) == pytest.approx(fvu(cfg.norm.restore(sae.decode(ours), stats)), rel=1e-4)


@pytest.mark.slow  # ~12 s: imports sae_lens
@pytest.mark.multiprocess  # importing sae_lens runs `git rev-parse`
def test_openai_sae_exported_to_saelens_encodes_as_their_forward_pass(tmp_path):
    """OpenAI's layout -> import -> export: SAELens's layer_norm then reproduces their LN."""
    from sae_lens import SAE

    from tests.test_openai_import import openai_decode, openai_encode, openai_state_dict, released, write_openai

    state = openai_state_dict(11, d=D, n=N, k=K)
    run = interop.import_sae(write_openai(released(tmp_path), state), tmp_path / "run")
    sae_lens = SAE.load_from_disk(str(export_run(run, "saelens", tmp_path / "out")))
    x = activations(23)
    want, info = openai_encode(x, state)
    with torch.no_grad():
        z = sae_lens.encode(x)
        assert_close(z, want, rtol=1e-5, atol=1e-5)
        assert_close(sae_lens.decode(z), openai_decode(want, info, state), rtol=1e-5, atol=1e-5)
