"""SAE folders written in SAELens's and sparsify's layouts, read into our TopKSAE, checked against
small reference encoders that follow each tool's own arithmetic literally."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.testing import assert_close

from trainer import interop, runfolder
from trainer.errors import RunFolderError
from trainer.runconfig import ImportSource, RunConfig
from trainer.sae import TopKSAE

D, N, K = 13, 50, 5
BATCHES = (1, 7, 33)  # awkward sizes


def random_tensors(seed: int, d=D, n=N, enc_bias=0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, n, generator=g) / d**0.5,
        "b_enc": torch.randn(n, generator=g) * 0.1 + enc_bias,
        "W_dec": torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g)),  # not unit norm
        "b_dec": torch.randn(d, generator=g),
    }


def inputs(batch: int, seed: int, d=D) -> torch.Tensor:
    return torch.randn(batch, d, generator=torch.Generator().manual_seed(1000 + seed)) * 2


def dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n).scatter_(-1, indices, values)


def ours(folder, **overrides):
    cfg, weights = interop.read_sae_folder(folder, **overrides)
    for name, shape in {"W_enc": (cfg.d_in, cfg.n_latents), "b_enc": (cfg.n_latents,),
                        "W_dec": (cfg.n_latents, cfg.d_in), "b_dec": (cfg.d_in,)}.items():  # fmt: skip
        assert weights[name].dtype == torch.float32 and tuple(weights[name].shape) == shape
    return cfg, TopKSAE.from_weights(weights, cfg.k).requires_grad_(False)


def one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ---------------------------------------------------------------- SAELens


def write_saelens(folder, tensors, **cfg_fields):
    folder.mkdir(parents=True, exist_ok=True)
    d, n = tensors["W_enc"].shape
    cfg = {
        "d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "architecture": "topk", "k": K,
        "rescale_acts_by_decoder_norm": False,
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post", "hook_head_index": None,
                     "context_size": 128, "prepend_bos": True, "sae_lens_version": "6.5.1"},
        **cfg_fields,
    }  # fmt: skip
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def saelens_encode(x, t, cfg):
    """SAELens TopKSAE.encode: process_sae_in, linear, optional decoder-norm rescale, TopK (topk, then ReLU)."""
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    hidden_pre = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * t["W_dec"].norm(dim=-1)
    k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
    values, indices = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
    return dense(values.relu(), indices, hidden_pre.shape[-1])


def saelens_decode(z, t, cfg):
    if "scaling_factor" in t:  # pre-6.0 finetuning_scaling_factor
        z = z * t["scaling_factor"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        z = z * (1 / t["W_dec"].norm(dim=-1))
    return z @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize(
    "fields",
    [
        {"apply_b_dec_to_input": True},
        {"apply_b_dec_to_input": False},
        {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True},
    ],
    ids=["b_dec-applied", "b_dec-not-applied", "rescaled-by-decoder-norm"],
)
def test_saelens_topk_matches_saelens_arithmetic(tmp_path, fields):
    tensors = random_tensors(1)
    cfg = write_saelens(tmp_path / "sae", tensors, **fields)
    assert interop.detect_format(tmp_path / "sae") == "saelens"
    our_cfg, sae = ours(tmp_path / "sae")
    assert (our_cfg.model, our_cfg.layer, our_cfg.d_in, our_cfg.n_latents, our_cfg.k) == ("gpt2", 6, D, N, K)
    assert our_cfg.source.format == "saelens" and our_cfg.input_scale == 1.0
    folded = fields != {"apply_b_dec_to_input": True}
    for i, batch in enumerate(BATCHES):
        x = inputs(batch, i)
        want = saelens_encode(x, tensors, cfg)
        got = sae.encode_dense(x)
        assert (want > 0).sum(-1).min() > 0  # the test exercises real activations
        # Same arithmetic up to fp32 rounding (our W_enc is stored transposed, so even the unfolded
        # case may differ from SAELens's matmul in the last bit).
        assert_close(got, want, **({"rtol": 1e-5, "atol": 1e-5} if folded else {}))
        assert torch.equal(got > 0, want > 0)
        assert_close(sae.decode(sae.encode(x)), saelens_decode(want, tensors, cfg), rtol=1e-5, atol=1e-5)


def test_saelens_layer_norm_is_our_per_token_normalisation(tmp_path):
    """normalize_activations "layer_norm": SAELens subtracts each token's mean, divides by its
    unbiased std + 1e-5 before encoding, and undoes it after decoding: InputNorm("token")."""
    tensors = random_tensors(6)
    cfg = write_saelens(tmp_path / "sae", tensors, normalize_activations="layer_norm")
    our_cfg, sae = ours(tmp_path / "sae")
    assert our_cfg.normalization == "token"
    x = inputs(21, 6) * 3 + 5
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    x_ln = (x - mu) / (std + 1e-5)
    want = saelens_encode(x_ln, tensors, cfg)
    x_n, stats = our_cfg.norm.normalize(x)
    assert_close(sae.encode_dense(x_n), want)
    assert_close(our_cfg.norm.restore(sae.decode(sae.encode(x_n)), stats), saelens_decode(want, tensors, cfg) * std + mu,
                 rtol=1e-5, atol=1e-5)


def test_saelens_pre_6_config(tmp_path):
    """Before 6.0: top-level model and hook names, k in activation_fn_kwargs, TopK as the 'standard'
    architecture with activation_fn_str 'topk', normalize_activations a bool, and a scaling_factor
    tensor that scales the latents before decoding."""
    tensors = random_tensors(2)
    tensors["scaling_factor"] = 0.5 + torch.rand(N)
    cfg = write_saelens(
        tmp_path / "old", tensors, architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 7},
        k=None, metadata=None, model_name="pythia-70m-deduped", hook_point="blocks.3.hook_resid_pre",
        hook_point_layer=3, normalize_activations=False, finetuning_scaling_factor=True,
    )  # fmt: skip
    our_cfg, sae = ours(tmp_path / "old")
    assert our_cfg.model == "pythia-70m-deduped"
    assert our_cfg.layer == 2  # the input of block 3 is the output of block 2
    assert our_cfg.k == 7 and our_cfg.hookpoint == "blocks.3.hook_resid_pre"
    x = inputs(9, 5)
    want = saelens_encode(x, tensors, cfg)
    assert_close(sae.encode_dense(x), want)
    assert_close(sae.decode(sae.encode(x)), saelens_decode(want, tensors, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hook,layer",
    [("blocks.6.hook_resid_post", 6), ("model.layers.11", 11), ("blocks.1.hook_resid_pre", 0), ("transformer.h.4", 4)],
)
def test_saelens_layer_from_hook_name(tmp_path, hook, layer):
    write_saelens(tmp_path, random_tensors(3), metadata={"model_name": "m", "hook_name": hook})
    cfg, _ = interop.read_sae_folder(tmp_path)
    assert cfg.layer == layer and cfg.hookpoint == hook


@pytest.mark.parametrize("hook", ["blocks.6.hook_mlp_out", "blocks.6.hook_resid_mid", "blocks.0.hook_resid_pre", "hook_embed"])
def test_saelens_other_hooks_need_an_explicit_layer(tmp_path, hook):
    write_saelens(tmp_path, random_tensors(3), metadata={"model_name": "m", "hook_name": hook})
    with pytest.raises(RunFolderError, match="only if it is in fact block L's output, give --layer L") as e:
        interop.read_sae_folder(tmp_path)
    one_line_naming(e, tmp_path / "cfg.json")
    embeddings = "the input of block 0 is the embeddings" in str(e.value)
    assert embeddings == (hook == "blocks.0.hook_resid_pre")
    cfg, _ = interop.read_sae_folder(tmp_path, layer=5, model="other/model")
    assert (cfg.layer, cfg.model, cfg.model_name) == (5, "other/model", "model")


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"architecture": "jumprelu"}, "jumprelu"),
        ({"architecture": "gated"}, "gated"),
        ({"architecture": "standard"}, "standard"),
        ({"normalize_activations": "expected_average_only_in"}, "expected_average_only_in"),
        ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
        ({"reshape_activations": "hook_z"}, "hook_z"),
        ({"k": None}, "without k"),
        ({"k": N}, "k must be between"),
        ({"d_sae": N + 1}, "W_enc has shape"),
    ],
)
def test_saelens_refused(tmp_path, fields, named):
    write_saelens(tmp_path, random_tensors(4), **fields)
    with pytest.raises(RunFolderError, match=named) as e:
        interop.read_sae_folder(tmp_path)
    one_line_naming(e, tmp_path)


def test_saelens_missing_tensor(tmp_path):
    tensors = random_tensors(5)
    del tensors["b_dec"]
    write_saelens(tmp_path, tensors)
    with pytest.raises(RunFolderError, match="missing tensor.*b_dec") as e:
        interop.read_sae_folder(tmp_path)
    one_line_naming(e, tmp_path / "sae_weights.safetensors")


# ---------------------------------------------------------------- sparsify


def sparsify_tensors(seed: int, d=D, n=N, enc_bias=0.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    t = random_tensors(seed, d, n, enc_bias)
    return {
        "encoder.weight": t["W_enc"].T.contiguous().to(dtype),
        "encoder.bias": t["b_enc"].to(dtype),
        "W_dec": t["W_dec"].to(dtype),
        "b_dec": t["b_dec"].to(dtype),
    }


def write_sparsify(folder, tensors, **cfg_fields):
    folder.mkdir(parents=True, exist_ok=True)
    n, d = tensors["encoder.weight"].shape
    cfg = {
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": K,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d, **cfg_fields,
    }  # fmt: skip
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def sparsify_encode(x, t, cfg):
    """sparsify SparseCoder.encode: x - b_dec, then fused_encoder: relu(linear), then topk."""
    preacts = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    values, indices = torch.topk(preacts, cfg["k"], dim=-1, sorted=False)
    return values, indices


def sparsify_decode(values, indices, t):
    return F.embedding_bag(indices, t["W_dec"], per_sample_weights=values, mode="sum") + t["b_dec"]


@pytest.mark.parametrize("enc_bias", [0.0, -1.5], ids=["typical", "few-positive"])
def test_sparsify_matches_sparsify_arithmetic(tmp_path, enc_bias):
    run = tmp_path / "run"
    tensors = sparsify_tensors(6, enc_bias=enc_bias)
    cfg = write_sparsify(run / "layers.6", tensors)
    write_sparsify(run / "layers.7", sparsify_tensors(7))
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m", "hookpoints": ["layers.6", "layers.7"]}))
    assert interop.detect_format(run / "layers.6") == "sparsify"
    our_cfg, sae = ours(run / "layers.6")
    assert (our_cfg.model, our_cfg.model_name, our_cfg.layer) == ("EleutherAI/pythia-160m", "pythia-160m", 6)
    assert (our_cfg.hookpoint, our_cfg.n_latents, our_cfg.k, our_cfg.source.format) == ("layers.6", N, K, "sparsify")
    fewer_than_k = 0
    for i, batch in enumerate(BATCHES):
        x = inputs(batch, i)
        values, indices = sparsify_encode(x, tensors, cfg)
        fewer_than_k += int(((values > 0).sum(-1) < K).sum())
        # Same dense latents; the indices may differ only where the value is 0.
        assert_close(sae.encode_dense(x), dense(values, indices, N))
        assert_close(sae.decode(sae.encode(x)), sparsify_decode(values, indices, tensors))
    if enc_bias < 0:
        assert fewer_than_k > 0  # the zero-padding case really happened


def test_sparsify_bf16_weights_are_read_as_fp32(tmp_path):
    tensors = sparsify_tensors(8, dtype=torch.bfloat16)
    cfg = write_sparsify(tmp_path / "layers.2", tensors)
    our_cfg, sae = ours(tmp_path / "layers.2", model="m")
    assert our_cfg.source.dtype == "bfloat16"
    upcast = {name: t.float() for name, t in tensors.items()}
    x = inputs(5, 0)
    assert_close(sae.encode_dense(x), dense(*sparsify_encode(x, upcast, cfg), N))


def test_sparsify_num_latents_from_expansion_factor(tmp_path):
    tensors = sparsify_tensors(9, d=4, n=8)
    write_sparsify(tmp_path / "model.layers.0", tensors, num_latents=0, expansion_factor=2, k=3)
    cfg, _ = interop.read_sae_folder(tmp_path / "model.layers.0", model="m")
    assert (cfg.n_latents, cfg.layer) == (8, 0)


@pytest.mark.parametrize("folder_name", ["layers.6.mlp", "embed_tokens", "sae"])
def test_sparsify_without_layer(tmp_path, folder_name):
    folder = tmp_path / folder_name
    write_sparsify(folder, sparsify_tensors(10))
    with pytest.raises(RunFolderError, match="--layer") as e:
        interop.read_sae_folder(folder, model="m")
    one_line_naming(e, folder / "cfg.json")
    assert interop.read_sae_folder(folder, model="m", layer=3)[0].layer == 3


def test_sparsify_without_model(tmp_path):
    write_sparsify(tmp_path / "layers.1", sparsify_tensors(11))
    with pytest.raises(RunFolderError, match="--model") as e:
        interop.read_sae_folder(tmp_path / "layers.1")
    one_line_naming(e, tmp_path / "layers.1" / "cfg.json")


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"transcode": True}, "transcode"),
        ({"skip_connection": True}, "skip_connection"),
        ({"activation": "groupmax"}, "groupmax"),
        ({"num_latents": N * 2}, "encoder.weight has shape"),
    ],
)
def test_sparsify_refused(tmp_path, fields, named):
    write_sparsify(tmp_path / "layers.1", sparsify_tensors(12), **fields)
    with pytest.raises(RunFolderError, match=named) as e:
        interop.read_sae_folder(tmp_path / "layers.1", model="m")
    one_line_naming(e, tmp_path / "layers.1")


def test_sparsify_w_skip_refused_even_if_cfg_forgets(tmp_path):
    tensors = sparsify_tensors(13)
    tensors["W_skip"] = torch.zeros(D, D)
    write_sparsify(tmp_path / "layers.1", tensors)
    with pytest.raises(RunFolderError, match="W_skip") as e:
        interop.read_sae_folder(tmp_path / "layers.1", model="m")
    one_line_naming(e, tmp_path / "layers.1" / "sae.safetensors")


def test_sparsify_missing_tensor(tmp_path):
    tensors = sparsify_tensors(14)
    del tensors["encoder.bias"]
    write_sparsify(tmp_path / "layers.1", tensors)
    with pytest.raises(RunFolderError, match="missing tensor.*encoder.bias") as e:
        interop.read_sae_folder(tmp_path / "layers.1", model="m")
    one_line_naming(e, tmp_path / "layers.1" / "sae.safetensors")


def test_run_folder_with_several_hookpoints_names_them(tmp_path):
    write_sparsify(tmp_path / "layers.0", sparsify_tensors(15))
    write_sparsify(tmp_path / "layers.1", sparsify_tensors(16))
    with pytest.raises(RunFolderError, match=r"layers\.0, layers\.1") as e:
        interop.read_sae_folder(tmp_path)
    one_line_naming(e, tmp_path / "cfg.json")


def test_unknown_folders(tmp_path):
    with pytest.raises(RunFolderError, match="folder not found"):
        interop.detect_format(tmp_path / "nowhere")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(RunFolderError, match="sae_weights.safetensors") as e:
        interop.detect_format(tmp_path)
    one_line_naming(e, tmp_path)
    save_file({"something": torch.zeros(2)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(RunFolderError, match="something") as e:
        interop.detect_format(tmp_path)
    one_line_naming(e, tmp_path / "sae.safetensors")
    (tmp_path / "sae.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunFolderError, match="not a readable safetensors") as e:
        interop.detect_format(tmp_path)


# ---------------------------------------------------------------- our format and import


def test_saescope_folder_reads_as_itself(tmp_path):
    weights = random_tensors(17)
    cfg = RunConfig(model="tiny", layer=1, d_in=D, n_latents=N, k=K, input_scale=0.5)
    cfg.save(tmp_path)
    runfolder.save_sae_weights(tmp_path, weights)
    assert interop.detect_format(tmp_path) == "saescope"
    got_cfg, got = interop.read_sae_folder(tmp_path)
    assert got_cfg == replace(cfg, source=ImportSource("saescope"))
    for name in runfolder.SAE_TENSORS:
        assert torch.equal(got[name], weights[name])


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_import_round_trip(tmp_path, fmt):
    if fmt == "saelens":
        src = tmp_path / "src"
        tensors = random_tensors(18)
        src_cfg = write_saelens(src, tensors, apply_b_dec_to_input=False)
        reference = lambda x: saelens_encode(x, tensors, src_cfg)  # noqa: E731
    else:
        src = tmp_path / "src" / "layers.4"
        tensors = sparsify_tensors(19)
        src_cfg = write_sparsify(src, tensors)
        reference = lambda x: dense(*sparsify_encode(x, tensors, src_cfg), N)  # noqa: E731
    out = interop.import_sae(src, tmp_path / "run", model="the/model")
    cfg = RunConfig.load(out)
    assert cfg.model == "the/model" and cfg.source.format == fmt and cfg.input_scale == 1.0
    assert cfg.source.cfg == src_cfg
    weights = runfolder.load_sae_weights(out, cfg)
    _, direct = interop.read_sae_folder(src, model="the/model")
    for name in runfolder.SAE_TENSORS:
        assert torch.equal(weights[name], direct[name])
    loaded_cfg, sae = runfolder.load_sae(out)
    assert loaded_cfg.slug == f"model-l{cfg.layer}-{N}-k{K}"
    x = inputs(11, 3)
    assert_close(sae.encode_dense(x), reference(x), rtol=1e-5, atol=1e-5)
    # The imported run reads back as our own format, and import refuses to overwrite it.
    assert interop.detect_format(out) == "saescope"
    with pytest.raises(RunFolderError, match="already exists") as e:
        interop.import_sae(src, out, model="the/model")
    one_line_naming(e, out)


def test_bad_layer_override(tmp_path):
    write_saelens(tmp_path, random_tensors(20))
    with pytest.raises(RunFolderError, match="layer must be"):
        interop.read_sae_folder(tmp_path, layer=-1)


def test_import_command_writes_a_run_folder(tmp_path):
    """`saescope import` on a sparsify folder: a run folder our own loader reads."""
    from saescope.cli import main
    n, d, k = 24, 8, 3
    source = tmp_path / "sparsify-run" / "layers.2"
    source.mkdir(parents=True)
    (source / "cfg.json").write_text(json.dumps(
        {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": n, "k": k,
         "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}))
    save_file({"encoder.weight": torch.randn(n, d), "encoder.bias": torch.randn(n),
               "W_dec": torch.randn(n, d), "b_dec": torch.randn(d)}, str(source / "sae.safetensors"))
    assert main(["import", str(source), "--out", str(tmp_path / "run"), "--model", "some/model"]) == 0
    cfg, sae = runfolder.load_sae(tmp_path / "run")
    assert (cfg.layer, cfg.k, cfg.n_latents, cfg.model) == (2, k, n, "some/model")
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2")]) == 2
    assert main(["import", str(source), "--out", str(tmp_path / "run3"), "--model", str(tmp_path / "no-such-model")]) == 2
    assert not (tmp_path / "run3").exists()
    # another SAE's metrics or harvest left in --out would be loaded as this one's
    for leftover in ("metrics.json", "harvest"):
        stale = tmp_path / f"stale-{leftover}"
        shutil.copytree(tmp_path / "run", stale)
        (stale / "cfg.json").unlink(), (stale / "sae.safetensors").unlink()
        (stale / "harvest").mkdir() if leftover == "harvest" else (stale / leftover).write_text("{}")
        assert main(["import", str(source), "--out", str(stale)]) == 2
        assert sorted(path.name for path in stale.iterdir()) == [leftover]


def test_import_checks_the_layer_and_width_against_a_model_this_machine_has(tiny_model_dir, tmp_path, caplog):
    """The tiny model has 3 blocks of width 32: a layer past them or an SAE of another width is
    refused with one line and nothing written; a model not on this machine is noted, not refused."""
    src = tmp_path / "src" / "layers.1"
    write_sparsify(src, sparsify_tensors(21, d=32))
    with pytest.raises(RunFolderError, match=r"layer 7 is out of range: .* has blocks 0\.\.2") as e:
        interop.import_sae(src, tmp_path / "run", model=str(tiny_model_dir), layer=7)
    one_line_naming(e, src)
    narrow = tmp_path / "narrow" / "layers.1"
    write_sparsify(narrow, sparsify_tensors(22))
    with pytest.raises(RunFolderError, match=f"reads {D}-wide activations, .* has d_model 32") as e:
        interop.import_sae(narrow, tmp_path / "run", model=str(tiny_model_dir))
    one_line_naming(e, narrow)
    assert not (tmp_path / "run").exists()

    assert RunConfig.load(interop.import_sae(src, tmp_path / "run", model=str(tiny_model_dir))).layer == 1
    with caplog.at_level("WARNING", logger="trainer.interop"):
        interop.import_sae(src, tmp_path / "elsewhere", model="not-on/this-machine")
    assert "model 'not-on/this-machine' is not on this machine" in caplog.text


def test_imported_sparsify_sae_goes_through_harvest_eval_and_load(tiny_model_dir, tmp_path):
    """An SAE trained elsewhere on the tiny model: import, harvest (building an activation store
    for its model and layer), evaluate, load, and read its feature page."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from saescope.cli import main

    n, d, k = 48, 32, 4
    torch.manual_seed(1)
    source = tmp_path / "elsewhere" / "layers.1"
    source.mkdir(parents=True)
    (source / "cfg.json").write_text(json.dumps(
        {"activation": "topk", "expansion_factor": 1.5, "normalize_decoder": True, "num_latents": n, "k": k,
         "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}))
    W_dec = F.normalize(torch.randn(n, d), dim=-1)
    save_file({"encoder.weight": W_dec.clone(), "encoder.bias": torch.zeros(n), "W_dec": W_dec,
               "b_dec": torch.zeros(d)}, str(source / "sae.safetensors"))
    run = tmp_path / "run"
    assert main(["import", str(source), "--out", str(run), "--model", str(tiny_model_dir)]) == 0
    imported = sorted(path.name for path in run.iterdir()), RunConfig.load(run)
    # a harvest that fails its checks builds no store and records none
    assert main(["harvest", str(run), "--tokens", "4096", "--context-length", "1"]) == 2
    assert (sorted(path.name for path in run.iterdir()), RunConfig.load(run)) == imported
    assert main(["harvest", str(run), "--tokens", "4096", "--context-length", "32", "--heldout-tokens", "2048"]) == 0
    assert json.loads((run / "activations" / "meta.json").read_text())["n_heldout"] == 2048 // 32
    assert main(["eval", str(run), "--downstream-contexts", "4"]) == 0
    from trainer.train import TrainingError, resume

    with pytest.raises(TrainingError, match=r"no checkpoint to resume \(an imported SAE: it was not trained here\)"):
        resume(run)
    # another import of it harvested from that store with --store: recorded, so eval finds it
    again = tmp_path / "again"
    assert main(["import", str(source), "--out", str(again), "--model", str(tiny_model_dir)]) == 0
    assert main(["harvest", str(again), "--store", str(run / "activations")]) == 0
    assert RunConfig.load(again).store.path == str((run / "activations").resolve())
    assert main(["eval", str(again), "--downstream-contexts", "4"]) == 0
    assert runfolder.load_metrics(again)["fvu"] == runfolder.load_metrics(run)["fvu"]
    metrics = runfolder.load_metrics(run)
    assert 0 < metrics["fvu"] and metrics["l0"] <= k
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["load", str(run), "--db", url]) == 0
    sae_id = RunConfig.load(run).slug
    with TestClient(create_app(Settings(database_url=url))) as client:
        feature = client.get(f"/saes/{sae_id}/features/0.json")
        assert feature.status_code == 200 and feature.json()["density"] > 0


@pytest.mark.parametrize("layout", ["saelens", "sparsify"])
@pytest.mark.parametrize("command", ["harvest", "load", "eval"])
def test_a_foreign_folder_given_to_harvest_or_load_says_to_import_it(tmp_path, layout, command, capsys):
    """SAELens's and sparsify's cfg.json lack our keys: the error names `saescope import`, in one
    line, instead of listing the missing keys."""
    from saescope.cli import main

    folder = tmp_path / "layers.6"
    if layout == "saelens":
        write_saelens(folder, random_tensors(20))
    else:
        write_sparsify(folder, sparsify_tensors(21))
    with pytest.raises(RunFolderError) as error:
        RunConfig.load(folder)
    message = one_line_naming(error, folder)
    assert f"saescope import {folder} --out RUN" in message
    assert ("SAELens" if layout == "saelens" else "sparsify") in message and "missing key" not in message

    extra = ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}"] if command == "load" else []
    assert main([command, str(folder), *extra]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr == f"saescope {command}: error: {message}"
    assert not (folder / "harvest").exists() and not (folder / "activations").exists()


def test_a_cfg_missing_our_keys_in_no_foreign_layout_still_lists_them(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"model": "m", "layer": 1}))
    with pytest.raises(RunFolderError, match="missing key\\(s\\) d_in, n_latents, k$"):
        RunConfig.load(tmp_path)
