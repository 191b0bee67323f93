"""Readers for SAE folders written by other tools, into our run-folder representation.

    read_sae_folder(folder, model=None, layer=None) -> (cfg, weights)
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
  in the last bits. normalize_activations other than "none", hook_z reshaping and head-indexed
  hooks change the input itself and are refused.
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
                source_cfg: dict, source_dtype: str, where: Path) -> RunConfig:
    try:
        return RunConfig(model=str(model), layer=int(layer), d_in=int(d_in), n_latents=int(n), k=int(k),
                         input_scale=1.0,  # neither tool rescales its inputs in the cases we accept
                         recorded_hookpoint=hookpoint,
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
    if normalize != "none":
        shown = "expected_average_only_in" if normalize is True else normalize
        raise RunFolderError(
            f"{cfg_path}: normalize_activations={shown!r} is not supported (its input scaling is not in the "
            f"folder); only 'none' reproduces SAELens exactly"
        )
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise RunFolderError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    hook = get("hook_name") or get("hook_point")
    if get("hook_head_index") is not None or get("hook_point_head_index") is not None:
        raise RunFolderError(f"{cfg_path}: SAEs on a single attention head are not supported")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))

    if model is None:
        model = get("model_name")
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
    )
    return out, weights


# ---------------------------------------------------------------- sparsify


def _sparsify_model(folder: Path) -> str | None:
    """Best effort: sparsify writes its run config (with "model") to <run>/config.json."""
    path = folder.parent / "config.json"
    try:
        run_cfg = read_json(path) if path.is_file() else None
    except RunFolderError:
        return None
    model = run_cfg.get("model") if isinstance(run_cfg, dict) else None
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


# ---------------------------------------------------------------- entry points

_READERS = {"saescope": read_saescope_folder, "saelens": read_saelens_folder, "sparsify": read_sparsify_folder}


def read_sae_folder(folder, model: str | None = None, layer: int | None = None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """Any supported SAE folder -> (its RunConfig, our fp32 weights). `model` and `layer` override
    what the folder says (sparsify folders record neither)."""
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
    """Write a saescope run folder (cfg.json + sae.safetensors) for the SAE in `src_folder`.
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
