"""Readers for SAE folders written by other tools, into our run-folder representation.

    read_sae_folder(folder, model=None, layer=None) -> (cfg, weights)   (a folder, or OpenAI's .pt file)
    import_sae(src_folder, out_run_dir, model=None, layer=None) -> out_run_dir

`cfg` is the SAE's RunConfig (model, layer, hookpoint, sizes, and its source); `weights` has
W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] in fp32, such that our
TopKSAE.encode(x) = ReLU(TopK((x - b_dec) @ W_enc + b_enc)) gives the latents the original tool
computes on the same x, and TopKSAE.decode gives its reconstruction.

Formats (trainer/formats.py tells them apart):

- "saescope": our own run folder (cfg.json + sae.safetensors with W_enc, b_enc, W_dec, b_dec).
- "saelens": SAELens, cfg.json + sae_weights.safetensors. Only TopK SAEs: architecture "topk"
  (k top-level or, before 6.0, in activation_fn_kwargs), or the pre-6.0 form architecture
  "standard" with activation_fn(_str) "topk". SAELens encodes
  TopK((x - apply_b_dec_to_input * b_dec) @ W_enc + b_enc), then ReLU on the chosen k. Folded
  exactly into our form:
    apply_b_dec_to_input = False       b_enc += b_dec @ W_enc (our module always subtracts b_dec)
    rescale_acts_by_decoder_norm       pre-activations are multiplied by |W_dec row| before TopK and
                                       divided again before decoding: W_enc, b_enc *= |row|,
                                       W_dec /= |row| (what SAELens itself does when it saves)
    scaling_factor tensor (pre-6.0     multiplies the latents before decoding only: W_dec rows *= it
    finetuning_scaling_factor)
  These folds are exact in real arithmetic; in fp32 the pre-activations can differ from SAELens's
  in the last bits. normalize_activations "layer_norm" (each token's mean subtracted, divided by
  its unbiased standard deviation + 1e-5, undone after decoding) is our per-token normalisation,
  InputNorm("token"), exactly; the other normalisations, hook_z reshaping and head-indexed hooks
  change the input in ways the folder does not record, and are refused.
  The layer comes from the hook name: blocks.L.hook_resid_post and HF-style module names
  (model.layers.L) are the output of block L, our layer L; blocks.L.hook_resid_pre is the input of
  block L, our layer L - 1. Other hooks (mlp_out, attn, resid_mid) are not our hookpoint: they
  need an explicit `layer`.
- "sparsify": EleutherAI sparsify, <run>/<hookpoint>/cfg.json + sae.safetensors with
  encoder.weight [n, d_in], encoder.bias [n], W_dec, b_dec. sparsify encodes
  TopK(ReLU(encoder(x - b_dec))); we take W_enc = encoder.weight.T and compute
  ReLU(TopK(...)). Both give the same dense latents: the positive values among the top k are the
  same set either way. They differ only in which indices fill the slots whose value is 0 (when fewer
  than k pre-activations are positive, sparsify picks among tied zeros, we pick the largest
  negatives), which decode and every dense view ignore. skip_connection (W_skip), transcode and
  the "groupmax" activation are refused. Its cfg.json names neither the model nor the layer: the
  layer comes from the hookpoint folder name (layers.6, model.layers.6, h.6) unless given, the
  model from the run's config.json ("model") unless given.
- "openai": OpenAI's sparse_autoencoder (Gao et al. 2024's released GPT-2 small SAEs), a .pt file
  holding its Autoencoder's state_dict: encoder.weight [n, d], decoder.weight [d, n], pre_bias [d],
  latent_bias [n], stats_last_nonzero [n] (and latents_activation_frequency, latents_mean_square),
  plus the plain values activation ("TopK") and activation_state_dict ({"k": k, "postact_fn":
  "ReLU"}). Their model.py encodes latents = TopK(encoder(LN(x) - pre_bias) + latent_bias), the
  ReLU on the k values TopK keeps, and decodes (decoder(latents) + pre_bias) * std + mu, where
  LN(x) = (x - mu) / (std + 1e-5) with mu and the unbiased std over d of each token, and the
  normalisation is on exactly when the activation is TopK. That is our TopKSAE with W_enc =
  encoder.weight.T, b_enc = latent_bias, W_dec = decoder.weight.T, b_dec = pre_bias, and
  InputNorm("token") (the same LN and decode). Read with torch.load(weights_only=True): a file
  that needs more than tensors and plain values to unpickle is refused. ReLU autoencoders (their
  v1 and v4) and a TopK without its ReLU are refused. The file records neither the model nor the
  layer: the model is GPT-2 small ("gpt2") unless given; the layer and location come from the
  release's path, <location>_v5_32k/autoencoders/<layer>.pt, where resid_post_mlp is the
  residual stream after block L (TransformerLens blocks.L.hook_resid_post, our layer L) and the
  other locations (resid_post_attn, resid_delta_attn, resid_delta_mlp, mlp_post_act) are not a
  block's output and are refused unless a layer is given.

Every error is a one-line RunFolderError naming the file at fault.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import torch

from trainer import runfolder
from trainer.errors import RunFolderError
from trainer.files import read_json, read_tensors
from trainer.formats import CFG_FILE, SAE_FILE, SAELENS_WEIGHTS_FILE, detect_format
from trainer.model import check_folder, local_model_shape
from trainer.runconfig import ImportSource, RunConfig
from trainer.runfolder import SAE_TENSORS

SPARSIFY_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

# A block's output: model.layers.6, gpt_neox.layers.6, transformer.h.6, layers.6, blocks.6.
_BLOCK_OUTPUT = re.compile(r"(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)")
_TL_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
_TL_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- helpers


def _require(cfg: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if cfg.get(key) is None]
    if missing:
        raise RunFolderError(f"{path}: missing key(s) {', '.join(missing)}")


def _as_int(value, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise RunFolderError(f"{path}: {key} must be an integer, got {value!r}")
    return int(value)


def _check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], path: Path, says: str) -> None:
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise RunFolderError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, {says} {shape}")


def _check_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    for name in SAE_TENSORS:
        if not torch.isfinite(weights[name]).all():
            raise RunFolderError(f"{path}: {name} has NaN or infinite values")


def _layer_from_hook(hook: str | None) -> int | None:
    """Our layer L (the output of block L) for a hook name, or None if the hook is not one."""
    if not hook:
        return None
    if m := _TL_RESID_POST.fullmatch(hook):
        return int(m.group(1))
    if m := _TL_RESID_PRE.fullmatch(hook):
        layer = int(m.group(1)) - 1  # the input of block L is the output of block L - 1
        return layer if layer >= 0 else None  # blocks.0.hook_resid_pre is the embeddings
    if m := _BLOCK_OUTPUT.fullmatch(hook):
        return int(m.group(1))
    return None


def _finish_cfg(*, fmt: str, model, layer: int, hookpoint: str | None, d_in: int, n: int, k: int, src: Path,
                source_cfg: dict, source_dtype: str, where: Path, normalization: str = "scale") -> RunConfig:
    try:
        return RunConfig(model=str(model), layer=int(layer), d_in=int(d_in), n_latents=int(n), k=int(k),
                         input_scale=1.0,  # no tool rescales its inputs by one number in the cases we accept
                         normalization=normalization, recorded_hookpoint=hookpoint,
                         source=ImportSource(fmt, str(src.resolve()), source_dtype, source_cfg))
    except RunFolderError as e:
        raise RunFolderError(f"{where}: {e}") from None


# ---------------------------------------------------------------- saescope


def read_saescope_folder(folder, model=None, layer=None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg = RunConfig.load(folder)
    weights = runfolder.load_sae_weights(folder, cfg)
    overrides = {"model": str(model)} if model is not None else {}
    overrides |= {"layer": int(layer)} if layer is not None else {}
    train = replace(cfg.train, **overrides) if cfg.train and overrides else cfg.train  # cfg.json holds them once
    cfg = replace(cfg, **overrides, train=train, source=ImportSource("saescope"))
    _check_weights(weights, folder / SAE_FILE)
    return cfg, weights


# ---------------------------------------------------------------- SAELens


def _saelens_k(cfg: dict, path: Path) -> int:
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    is_topk = architecture == "topk" or (architecture == "standard" and activation == "topk")
    if not is_topk:
        shown = architecture if architecture != "standard" else f"standard (activation {activation or 'relu'})"
        raise RunFolderError(f"{path}: SAELens architecture {shown} is not supported; only TopK SAEs can be read")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k") if cfg.get("k") is not None else kwargs.get("k") if isinstance(kwargs, dict) else None
    if k is None:
        raise RunFolderError(f"{path}: TopK SAE without k (neither k nor activation_fn_kwargs.k)")
    return _as_int(k, "k", path)


def _read_cfg_object(path: Path) -> dict:
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return cfg


def read_saelens_folder(folder, model=None, layer=None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / SAELENS_WEIGHTS_FILE
    cfg = _read_cfg_object(cfg_path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    get = lambda key: meta.get(key) if meta.get(key) is not None else cfg.get(key)  # noqa: E731 (6.x, then older)

    k = _saelens_k(cfg, cfg_path)
    _require(cfg, ("d_in", "d_sae"), cfg_path)
    d, n = _as_int(cfg["d_in"], "d_in", cfg_path), _as_int(cfg["d_sae"], "d_sae", cfg_path)

    normalize = cfg.get("normalize_activations", "none")
    if normalize is False or normalize is None:  # before 5.x: a bool
        normalize = "none"
    if normalize not in ("none", "layer_norm"):
        shown = "expected_average_only_in" if normalize is True else normalize
        raise RunFolderError(
            f"{cfg_path}: normalize_activations={shown!r} is not supported (its input scaling is not in the "
            f"folder); only 'none' and 'layer_norm' reproduce SAELens exactly"
        )
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise RunFolderError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    hook = get("hook_name") or get("hook_point")
    if get("hook_head_index") is not None or get("hook_point_head_index") is not None:
        raise RunFolderError(f"{cfg_path}: SAEs on a single attention head are not supported")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))

    if model is None:
        model = get("saescope_model") or get("model_name")  # a saescope export records the model it ran
        if not model:
            raise RunFolderError(f"{cfg_path}: no model_name; give the model (--model)")
    if layer is None:
        layer = _layer_from_hook(hook)
        if layer is None and not hook:
            hook_layer = get("hook_layer") if get("hook_layer") is not None else get("hook_point_layer")
            layer = _as_int(hook_layer, "hook_layer", cfg_path) if hook_layer is not None else None
        if layer is None:
            raise RunFolderError(
                f"{cfg_path}: hook {hook!r} is not the residual stream after a block (our hookpoint; "
                f"{'the input of block 0 is the embeddings' if hook == 'blocks.0.hook_resid_pre' else 'an MLP or attention output is not'}"
                "); only if it is in fact block L's output, give --layer L"
                if hook
                else f"{cfg_path}: no hook_name; give the layer (--layer)"
            )

    tensors = read_tensors(weights_path, SAE_TENSORS)
    _check_shapes(tensors, {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}, weights_path, "cfg.json says")
    W_enc, b_enc, W_dec, b_dec = (tensors[name].float() for name in SAE_TENSORS)

    scaling = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scaling is not None:
        _check_shapes({"scaling_factor": scaling}, {"scaling_factor": (n,)}, weights_path, "expected")
        W_dec = W_dec * scaling.float()[:, None]  # latents * s @ W_dec == latents @ (s * W_dec)
    if rescale:
        norm = W_dec.norm(dim=-1)  # SAELens multiplies pre-activations by this, then divides before decoding
        W_enc, b_enc = W_enc * norm[None, :], b_enc * norm
        W_dec = W_dec / norm.clamp(min=1e-8)[:, None]
    if not apply_b_dec:
        b_enc = b_enc + b_dec @ W_enc  # our (x - b_dec) @ W_enc + b_enc' == x @ W_enc + b_enc

    weights = {"W_enc": W_enc.contiguous(), "b_enc": b_enc, "W_dec": W_dec.contiguous(), "b_dec": b_dec}
    _check_weights(weights, weights_path)
    out = _finish_cfg(
        fmt="saelens",
        model=model,
        layer=layer,
        hookpoint=hook,
        d_in=d,
        n=n,
        k=k,
        src=folder,
        source_cfg=cfg,
        source_dtype=str(cfg.get("dtype", "float32")),
        where=cfg_path,
        normalization="token" if normalize == "layer_norm" else "scale",
    )
    return out, weights


# ---------------------------------------------------------------- sparsify


def _sparsify_model(folder: Path) -> str | None:
    """Best effort: sparsify writes its run config (with "model") to <run>/config.json (a saescope
    export adds the model it ran as "saescope_model")."""
    path = folder.parent / "config.json"
    try:
        run_cfg = read_json(path) if path.is_file() else None
    except RunFolderError:
        return None
    model = (run_cfg.get("saescope_model") or run_cfg.get("model")) if isinstance(run_cfg, dict) else None
    return model if isinstance(model, str) and model else None


def read_sparsify_folder(folder, model=None, layer=None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / SAE_FILE
    cfg = _read_cfg_object(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise RunFolderError(f"{cfg_path}: sparsify activation {activation!r} is not supported; only topk")
    if cfg.get("transcode"):
        raise RunFolderError(f"{cfg_path}: sparsify transcoders (transcode=true) are not supported")
    if cfg.get("skip_connection"):
        raise RunFolderError(f"{cfg_path}: sparsify skip connections (skip_connection=true, W_skip) are not supported")
    _require(cfg, ("d_in", "k"), cfg_path)
    d, k = _as_int(cfg["d_in"], "d_in", cfg_path), _as_int(cfg["k"], "k", cfg_path)
    n = _as_int(cfg.get("num_latents") or 0, "num_latents", cfg_path)
    if n == 0:  # sparsify: num_latents or d_in * expansion_factor
        _require(cfg, ("expansion_factor",), cfg_path)
        n = d * _as_int(cfg["expansion_factor"], "expansion_factor", cfg_path)

    hookpoint = folder.resolve().name
    if layer is None:
        match = _BLOCK_OUTPUT.fullmatch(hookpoint)
        if match is None:
            raise RunFolderError(
                f"{cfg_path}: sparsify does not record the layer and the folder name {hookpoint!r} is not a "
                f"block's output (like layers.6; an MLP or attention output is not): only if it is in fact block "
                f"L's output, give --layer L"
            )
        layer = int(match.group(1))
    if model is None:
        model = _sparsify_model(folder)
        if model is None:
            raise RunFolderError(
                f"{cfg_path}: sparsify does not record the model (and {folder.parent / 'config.json'} names none); "
                f"give the model (--model)"
            )

    tensors = read_tensors(weights_path, SPARSIFY_TENSORS)
    if "W_skip" in tensors:
        raise RunFolderError(f"{weights_path}: has W_skip (a skip connection), which is not supported")
    _check_shapes(
        tensors,
        {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)},
        weights_path,
        "cfg.json says",
    )
    weights = {
        "W_enc": tensors["encoder.weight"].float().T.contiguous(),
        "b_enc": tensors["encoder.bias"].float(),
        "W_dec": tensors["W_dec"].float().contiguous(),
        "b_dec": tensors["b_dec"].float(),
    }
    _check_weights(weights, weights_path)
    out = _finish_cfg(
        fmt="sparsify",
        model=model,
        layer=layer,
        hookpoint=hookpoint,
        d_in=d,
        n=n,
        k=k,
        src=folder,
        source_cfg=cfg,
        source_dtype=str(tensors["encoder.weight"].dtype).removeprefix("torch."),
        where=cfg_path,
    )
    return out, weights


# ---------------------------------------------------------------- OpenAI


OPENAI_MODEL = "gpt2"  # GPT-2 small, which all of OpenAI's released SAEs read
OPENAI_TENSORS = ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias")
# Their locations (sparse_autoencoder/paths.py) and the TransformerLens hook each reads; only
# resid_post_mlp is a block's output, our hookpoint.
OPENAI_LOCATIONS = {
    "resid_post_mlp": "blocks.{L}.hook_resid_post",
    "resid_post_attn": "blocks.{L}.hook_resid_mid",
    "resid_delta_attn": "blocks.{L}.hook_attn_out",
    "resid_delta_mlp": "blocks.{L}.hook_mlp_out",
    "mlp_post_act": "blocks.{L}.mlp.hook_post",
}
_OPENAI_LOCATION = re.compile("|".join(sorted(OPENAI_LOCATIONS, key=len, reverse=True)))
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _load_state_dict(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain values, nothing that runs code."""
    import pickle

    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if needed := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            raise RunFolderError(f"{path}: refused: unpickling it needs more than tensors and plain values "
                                 f"({needed.group(1)}; torch.load(weights_only=True) loads no code)") from None
        after = text.split("WeightsUnpickler error:", 1)[-1]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), type(e).__name__)
        raise RunFolderError(f"{path}: not a readable torch file ({reason})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise RunFolderError(f"{path}: not a readable torch file ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    if not isinstance(found, dict):
        raise RunFolderError(f"{path}: holds a {type(found).__name__}, not the state dict of OpenAI's Autoencoder")
    return found


def _openai_location(path: Path) -> tuple[str | None, int | None]:
    """The location and layer their release's path names (<location>_v5_32k/autoencoders/<L>.pt)."""
    found = _OPENAI_LOCATION.findall(path.resolve().as_posix())
    number = _TRAILING_NUMBER.search(path.stem)
    return (found[-1] if found else None), (int(number.group(1)) if number else None)


def read_openai_file(path, model=None, layer=None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    state = _load_state_dict(path)
    missing = [key for key in OPENAI_TENSORS if key not in state]
    if missing:
        raise RunFolderError(f"{path}: missing {', '.join(missing)}: not the state dict of OpenAI's Autoencoder "
                             f"(it has {', '.join(sorted(map(str, state))[:8]) or 'nothing'})")
    tensors = {key: state[key] for key in OPENAI_TENSORS}
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors.values()):
        raise RunFolderError(f"{path}: {', '.join(OPENAI_TENSORS)} must be floating-point tensors")
    activation = state.get("activation", "ReLU")  # their from_state_dict's default
    if activation != "TopK":
        raise RunFolderError(f"{path}: activation {activation!r}: only OpenAI's TopK autoencoders (v5_32k, v5_128k) are "
                             "TopK SAEs; the ReLU ones (v1, v4) cannot be read")
    settings = state.get("activation_state_dict")
    k = settings.get("k") if isinstance(settings, dict) else None
    if k is None:
        raise RunFolderError(f"{path}: a TopK autoencoder without activation_state_dict['k']")
    k = _as_int(k, "activation_state_dict['k']", path)
    postact = settings.get("postact_fn", "ReLU")
    if postact != "ReLU":
        raise RunFolderError(f"{path}: TopK with postact_fn {postact!r}: only ReLU on the kept values is our TopK")

    n, d = tensors["encoder.weight"].shape if tensors["encoder.weight"].dim() == 2 else (0, 0)
    _check_shapes(tensors, {"encoder.weight": (n, d), "decoder.weight": (d, n), "pre_bias": (d,), "latent_bias": (n,)},
                  path, "encoder.weight [n, d] says")
    for extra in ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"):
        found = state.get(extra)
        if found is not None and (not isinstance(found, torch.Tensor) or tuple(found.shape) != (n,)):
            raise RunFolderError(f"{path}: {extra} must be a tensor of shape ({n},)")

    location, named_layer = _openai_location(path)
    if layer is None:
        if location is None or named_layer is None:
            raise RunFolderError(
                f"{path}: OpenAI's files record neither their layer nor their location, and the path does not name "
                "them (their release's layout: resid_post_mlp_v5_32k/autoencoders/6.pt); if it reads the residual "
                "stream after block L (resid_post_mlp), give --layer L")
        if location != "resid_post_mlp":
            hook = OPENAI_LOCATIONS[location].format(L=named_layer)
            raise RunFolderError(
                f"{path}: location {location} ({hook}) is not the residual stream after a block (our hookpoint, "
                f"resid_post_mlp); only if it is in fact block L's output, give --layer L")
        layer = named_layer
    hook = OPENAI_LOCATIONS[location].format(L=layer) if location else None

    weights = {
        "W_enc": tensors["encoder.weight"].float().T.contiguous(),
        "b_enc": tensors["latent_bias"].float(),
        "W_dec": tensors["decoder.weight"].float().T.contiguous(),
        "b_dec": tensors["pre_bias"].float(),
    }
    _check_weights(weights, path)
    source_cfg = {"activation": activation, "k": k, "postact_fn": postact, "location": location,
                  "normalize": "LN: (x - mean) / (std + 1e-5), decode * std + mean"}
    out = _finish_cfg(fmt="openai", model=model or OPENAI_MODEL, layer=layer, hookpoint=hook, d_in=d, n=n, k=k, src=path,
                      source_cfg=source_cfg, source_dtype=str(tensors["encoder.weight"].dtype).removeprefix("torch."),
                      where=path, normalization="token")
    return out, weights


# ---------------------------------------------------------------- entry points

_READERS = {"saescope": read_saescope_folder, "saelens": read_saelens_folder, "sparsify": read_sparsify_folder,
            "openai": read_openai_file}


def read_sae_folder(folder, model: str | None = None, layer: int | None = None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """Any supported SAE folder (or OpenAI's .pt file) -> (its RunConfig, our fp32 weights).
    `model` and `layer` override what the source says (sparsify and OpenAI record neither)."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise RunFolderError(f"{folder}: layer must be a non-negative integer, got {layer!r}")
    return _READERS[detect_format(folder)](folder, model=model, layer=layer)


def check_model_fits(cfg: RunConfig, src: Path) -> None:
    """The SAE's layer and width against its model's config, when this machine has the model;
    otherwise a note (it may be a hub name for a machine with the network, or a TransformerLens
    name: the run is still written, and eval, harvest and the probe will say what is missing)."""
    if local_model_shape(cfg.model) is None:
        log.warning("note: model '%s' is not on this machine (no such folder, not in the Hugging Face cache): "
                    "its layer and width are unchecked (harvest, eval and the probe load it by this name: "
                    "import again with --model naming a local copy or a hub model if it is wrong)", cfg.model)
    cfg.check_model(src)


def import_sae(src_folder, out_run_dir, model: str | None = None, layer: int | None = None) -> Path:
    """Write a saescope run folder (cfg.json + sae.safetensors) for the SAE in `src_folder` (or
    OpenAI's .pt file).
    Harvest and eval then need an activation store (--store): an imported run has none."""
    src, out = Path(src_folder), Path(out_run_dir)
    if model:
        check_folder(model)  # typed here, so checked as train checks it
    cfg, weights = read_sae_folder(src, model=model, layer=layer)
    check_model_fits(cfg, src)
    if out.exists() and out.resolve() == src.resolve():
        raise RunFolderError(f"{out}: the output folder is the source folder")
    # A harvest or metrics there describe other weights, and load would show them as this SAE's.
    for name in (CFG_FILE, SAE_FILE, runfolder.METRICS_FILE, runfolder.HARVEST_DIR):
        if (out / name).exists():
            raise RunFolderError(f"{out / name}: already exists; import into a new folder")
    runfolder.save_sae_weights(out, weights)
    cfg.save(out)  # last, as in training: a cfg.json means the run folder is complete
    return out
