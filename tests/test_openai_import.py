"""OpenAI's released SAEs (Gao et al. 2024's GPT-2 small ones): .pt files in exactly their layout,
read into our TopKSAE with the per-token normalisation, checked against a direct implementation
of their forward pass.

The reference below follows sparse_autoencoder/model.py as released: LN(x) = (x - mu) / (std +
1e-5) with mu = x.mean(-1) and std the unbiased x.std(-1) after subtracting mu; encode_pre_act =
linear(LN(x) - pre_bias, encoder.weight, latent_bias); TopK keeps the k largest (torch.topk) and
applies its postact_fn (ReLU) to them, zeros elsewhere; decode = decoder(latents) + pre_bias, then
* std + mu. The state dict is Autoencoder.state_dict(): its parameters and buffers, plus the plain
values `activation` (the class name) and `activation_state_dict` ({"k", "postact_fn"})."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from trainer import interop, runfolder
from trainer.errors import RunFolderError
from trainer.runconfig import RunConfig

D, N, K = 24, 96, 6
BATCHES = (1, 5, 37)  # awkward sizes


def openai_state_dict(seed: int, d: int = D, n: int = N, k: int = K, activation: str = "TopK",
                      postact_fn: str = "ReLU") -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    state["pre_bias"] = torch.randn(d, generator=g) * 0.1
    state["latent_bias"] = torch.randn(n, generator=g) * 0.1
    state["stats_last_nonzero"] = torch.randint(0, 1000, (n,), generator=g)
    state["latents_activation_frequency"] = torch.rand(n, generator=g)
    state["latents_mean_square"] = torch.rand(n, generator=g)
    state["encoder.weight"] = torch.randn(n, d, generator=g) / d**0.5
    state["decoder.weight"] = torch.nn.functional.normalize(torch.randn(d, n, generator=g), dim=0)
    state["activation"] = activation
    state["activation_state_dict"] = {"k": k, "postact_fn": postact_fn}
    return state


def write_openai(path: Path, state: dict) -> Path:
    """Where their release keeps it: <location>_v5_32k/autoencoders/<layer>.pt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def released(tmp_path: Path, location: str = "resid_post_mlp", layer: int = 6) -> Path:
    return tmp_path / f"{location}_v5_32k" / "autoencoders" / f"{layer}.pt"


# ---------------------------------------------------------------- their forward pass, literally


def openai_LN(x, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    x = x / (std + eps)
    return x, mu, std


def openai_encode(x, state):
    x, mu, std = openai_LN(x)  # preprocess: normalize is on because the activation is TopK
    pre = torch.nn.functional.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    topk = torch.topk(pre, k=state["activation_state_dict"]["k"], dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, topk.indices, torch.relu(topk.values))
    return latents, {"mu": mu, "std": std}


def openai_decode(latents, info, state):
    ret = torch.nn.functional.linear(latents, state["decoder.weight"]) + state["pre_bias"]
    return ret * info["std"] + info["mu"]


def activations(batch: int, seed: int, d: int = D) -> torch.Tensor:
    """Residual-stream-like rows: an offset and a scale per token, as LN then removes."""
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(batch, d, generator=g) * (1 + 4 * torch.rand(batch, 1, generator=g)) + 3 * torch.randn(batch, 1, generator=g)


def one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("d,n,k", [(D, N, K), (7, 33, 1), (13, 40, 39)], ids=["typical", "k1", "k=n-1"])
def test_encoding_matches_their_forward_pass(tmp_path, d, n, k):
    state = openai_state_dict(1, d, n, k)
    path = write_openai(released(tmp_path), state)
    assert interop.detect_format(path) == "openai"
    cfg, weights = interop.read_sae_folder(path)
    assert (cfg.model, cfg.layer, cfg.d_in, cfg.n_latents, cfg.k) == ("gpt2", 6, d, n, k)
    assert cfg.normalization == "token" and cfg.hookpoint == "blocks.6.hook_resid_post"
    assert cfg.source.format == "openai" and cfg.source.cfg["location"] == "resid_post_mlp"
    from trainer.sae import TopKSAE

    sae = TopKSAE.from_weights(weights, cfg.k).requires_grad_(False)
    for i, batch in enumerate(BATCHES):
        x = activations(batch, i, d)
        want, info = openai_encode(x, state)
        x_n, stats = cfg.norm.normalize(x)  # what eval, harvest and the probe apply before the SAE
        latents = sae.encode(x_n)
        got = torch.zeros(batch, n).scatter_(-1, latents.indices, latents.values)
        assert (want > 0).any()
        assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got > 0, want > 0)
        assert_close(cfg.norm.restore(sae.decode(latents), stats), openai_decode(want, info, state), rtol=1e-5, atol=1e-5)


def test_import_writes_a_run_folder_without_the_model(tmp_path, caplog):
    """GPT-2 small is not on this machine: the import still writes the run (weights-only use),
    notes that the model is unchecked, and the run loads with its normalisation."""
    from saescope.cli import main

    state = openai_state_dict(2)
    path = write_openai(released(tmp_path, layer=8), state)
    with caplog.at_level("WARNING", logger="trainer.interop"):
        assert main(["import", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "model 'gpt2' is not on this machine" in caplog.text
    cfg, sae = runfolder.load_sae(tmp_path / "run")
    assert (cfg.model, cfg.layer, cfg.normalization, cfg.input_scale) == ("gpt2", 8, "token", 1.0)
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["source_format"] == "openai"
    x = activations(9, 4)
    want, _ = openai_encode(x, state)
    latents = sae.encode(cfg.norm.normalize(x)[0])
    assert_close(torch.zeros(9, N).scatter_(-1, latents.indices, latents.values), want, rtol=1e-5, atol=1e-5)


def test_a_plain_dict_saved_by_hand_reads_too(tmp_path):
    state = dict(openai_state_dict(3))
    del state["latents_activation_frequency"], state["latents_mean_square"]  # only what the release lists
    cfg, _ = interop.read_sae_folder(write_openai(released(tmp_path), state))
    assert cfg.k == K


def test_a_pickle_that_needs_more_than_tensors_is_refused(tmp_path):
    state = openai_state_dict(4)
    state["activation"] = torch.nn.ReLU()  # a module: unpickling it would import and build classes
    path = write_openai(released(tmp_path), state)
    with pytest.raises(RunFolderError, match="refused: unpickling it needs more than tensors and plain values") as e:
        interop.read_sae_folder(path)
    one_line_naming(e, path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(RunFolderError, match="not a readable torch file") as e:
        interop.read_sae_folder(tmp_path / "junk.pt")
    one_line_naming(e, tmp_path / "junk.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(RunFolderError, match="holds a list, not the state dict"):
        interop.read_sae_folder(tmp_path / "list.pt")


@pytest.mark.parametrize("location,hook", [("resid_post_attn", "blocks.6.hook_resid_mid"),
                                           ("resid_delta_mlp", "blocks.6.hook_mlp_out"),
                                           ("resid_delta_attn", "blocks.6.hook_attn_out")])
def test_locations_that_are_not_a_blocks_output_need_an_explicit_layer(tmp_path, location, hook):
    path = write_openai(released(tmp_path, location), openai_state_dict(5))
    with pytest.raises(RunFolderError, match=rf"location {location} \({hook}\) is not the residual stream after a block") as e:
        interop.read_sae_folder(path)
    assert "only if it is in fact block L's output, give --layer L" in one_line_naming(e, path)
    assert interop.read_sae_folder(path, layer=6)[0].layer == 6


def test_a_path_without_the_location_needs_the_layer(tmp_path):
    path = write_openai(tmp_path / "my-sae.pt", openai_state_dict(6))
    with pytest.raises(RunFolderError, match="record neither their layer nor their location") as e:
        interop.read_sae_folder(path)
    one_line_naming(e, path)
    cfg, _ = interop.read_sae_folder(path, layer=3, model="some/gpt2-copy")
    assert (cfg.layer, cfg.model, cfg.hookpoint) == (3, "some/gpt2-copy", "layers.3")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.update(activation="ReLU"), "only OpenAI's TopK autoencoders"),
        (lambda s: s.pop("activation"), "activation 'ReLU'"),  # their from_state_dict's default
        (lambda s: s.update(activation_state_dict={"k": K, "postact_fn": "Identity"}), "postact_fn 'Identity'"),
        (lambda s: s.update(activation_state_dict={}), r"without activation_state_dict\['k'\]"),
        (lambda s: s.pop("decoder.weight"), "missing decoder.weight"),
        (lambda s: s.update({"decoder.weight": torch.zeros(N, D)}), r"decoder.weight has shape \(96, 24\)"),
        (lambda s: s.update(stats_last_nonzero=torch.zeros(3)), r"stats_last_nonzero must be a tensor of shape \(96,\)"),
        (lambda s: s.update(activation_state_dict={"k": N, "postact_fn": "ReLU"}), "k must be between"),
    ],
)
def test_refused_with_one_line(tmp_path, change, message):
    state = openai_state_dict(7)
    change(state)
    path = write_openai(released(tmp_path), state)
    with pytest.raises(RunFolderError, match=message) as e:
        interop.read_sae_folder(path)
    one_line_naming(e, path)


def test_model_folder_checks_layer_and_width(tiny_model_dir, tmp_path):
    """--model names a local folder (GPT-2 small cannot be downloaded here): its config checks the
    layer and the width before anything is written."""
    path = write_openai(released(tmp_path, layer=1), openai_state_dict(8, d=32))
    run = interop.import_sae(path, tmp_path / "run", model=str(tiny_model_dir))
    assert RunConfig.load(run).model == str(tiny_model_dir)
    wide = write_openai(released(tmp_path / "w", layer=1), openai_state_dict(8))
    with pytest.raises(RunFolderError, match=f"reads {D}-wide activations"):
        interop.import_sae(wide, tmp_path / "run2", model=str(tiny_model_dir))
