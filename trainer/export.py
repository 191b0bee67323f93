"""Write a run's SAE as a folder another tool loads as it is: SAELens or EleutherAI sparsify.

    export_run(run_dir, "saelens" | "sparsify", out_dir) -> the folder to load

What each tool computes from the folder is our encoding exactly (the latents' values, not only
their order), in that tool's own arithmetic:

- The "scale" normalisation (x * input_scale before encoding, / input_scale after decoding) is
  folded into the weights, as SAELens's own fold_activation_norm_scaling_factor does:
  W_enc * s, W_dec / s, b_dec / s. Then (x - b_dec/s) @ (s W_enc) + b_enc = (s x - b_dec) @ W_enc
  + b_enc, our pre-activations, and z @ (W_dec/s) + b_dec/s = our reconstruction / s, in the
  model's units. Neither tool can express the scale itself; the fold is exact in real arithmetic
  (in fp32 the pre-activations can differ in the last bits). The decoder rows then have norm 1/s,
  so sparsify's cfg says normalize_decoder false (its training would re-normalise them).
- The "token" normalisation (each token's mean subtracted and its unbiased deviation + 1e-5
  divided out, undone after decoding; OpenAI's LN) is SAELens's normalize_activations
  "layer_norm", the same formula. sparsify has no input normalisation at all: exporting such an
  SAE to it is refused.
- SAELens: cfg.json (6.x layout: architecture "topk", apply_b_dec_to_input true, metadata with
  the model, the TransformerLens hook blocks.L.hook_resid_post, which is our hookpoint, the
  context size) and sae_weights.safetensors (W_enc [d, n], b_enc, W_dec [n, d], b_dec, fp32); with
  a harvest, sparsity.safetensors (log10 of each latent's density, SAELens's "sparsity"). SAELens
  encodes TopK((x - b_dec) @ W_enc + b_enc) with the ReLU on the kept values, as we do.
- sparsify: DIR/<hookpoint>/cfg.json and sae.safetensors (encoder.weight = W_enc.T [n, d],
  encoder.bias, W_dec, b_dec), and DIR/config.json naming the model as sparsify's run config
  does. sparsify encodes TopK(ReLU(encoder(x - b_dec))): the same positive latents; where fewer
  than k pre-activations are positive, its remaining slots hold zeros at other indices, which
  decode ignores.

The model: the bundled alias is written as the Hugging Face name of the model it is
(HuggingFaceTB/SmolLM2-135M-Instruct; its bundled weights are the Q4_1 GGUF's, so activations on
the hub's weights differ slightly), and saescope's own name is kept beside it ("saescope_model"),
which `saescope import` reads back.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer import runfolder
from trainer.errors import RunFolderError
from trainer.files import write_json, write_tensors
from trainer.formats import CFG_FILE, SAE_FILE, SAELENS_WEIGHTS_FILE
from trainer.model import BUNDLED_MODEL
from trainer.runconfig import RunConfig

TARGETS = ("saelens", "sparsify")
HUB_NAMES = {BUNDLED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written (SAELens reads older layouts through a converter)
SPARSITY_FILE = "sparsity.safetensors"
# A block's module path, as sparsify names hookpoints below the base model: layers.6, h.6.
_BLOCK = re.compile(r"(?:.*\.)?((?:layers|layer|h)\.\d+)")


def folded_weights(cfg: RunConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights that read raw activations as ours read normalised ones: the "scale"
    normalisation folded in (the module's docstring); "token" is left to the tool."""
    s = cfg.input_scale if cfg.normalization == "scale" else 1.0
    return {"W_enc": weights["W_enc"] * s, "b_enc": weights["b_enc"].clone(), "W_dec": weights["W_dec"] / s,
            "b_dec": weights["b_dec"] / s}


def export_run(run_dir, to: str, out_dir) -> Path:
    """Write the run's SAE for `to` ("saelens" or "sparsify") under `out_dir`; returns the folder
    that tool loads (for sparsify, out_dir/<hookpoint>). Refuses an out_dir that holds files."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if to not in TARGETS:
        raise RunFolderError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    cfg = RunConfig.load(run_dir)
    if cfg.architecture != "topk":
        raise RunFolderError(f"{run_dir / CFG_FILE}: architecture {cfg.architecture!r}; only TopK SAEs are exported")
    if to == "sparsify" and cfg.normalization == "token":
        raise RunFolderError(
            f"{run_dir}: normalises each token's activations (normalization 'token', as OpenAI's SAEs do), which "
            "sparsify cannot express (it encodes its input as given); export --to saelens instead "
            "(normalize_activations 'layer_norm', the same formula)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunFolderError(f"{out_dir}: already exists and is not an empty folder; export into a new folder")
    if out_dir.resolve() == run_dir.resolve():
        raise RunFolderError(f"{out_dir}: the output folder is the run folder")
    weights = folded_weights(cfg, runfolder.load_sae_weights(run_dir, cfg))
    if to == "saelens":
        return _write_saelens(run_dir, cfg, weights, out_dir)
    return _write_sparsify(cfg, weights, out_dir)


def hub_name(model: str) -> str:
    return HUB_NAMES.get(model, model)


def _context_size(cfg: RunConfig) -> int | None:
    if cfg.train:
        return cfg.train.context_length
    return None


def _write_saelens(run_dir: Path, cfg: RunConfig, weights: dict[str, torch.Tensor], out: Path) -> Path:
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": hub_name(cfg.model),
        "hook_name": f"blocks.{cfg.layer}.hook_resid_post",  # the residual stream after block L: our hookpoint
        "hook_head_index": None,
        "context_size": _context_size(cfg),
        "prepend_bos": False,  # contexts are cut from one token stream, documents separated by end-of-text
        "dataset_path": cfg.train.corpus if cfg.train else None,
        "model_from_pretrained_kwargs": {},
        "exported_by": "saescope",
        "saescope_model": cfg.model,
        "saescope_hookpoint": cfg.hookpoint,
        "saescope_input_scale_folded": cfg.input_scale if cfg.normalization == "scale" else None,
    }
    sae_cfg = {
        "architecture": "topk",
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "k": cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.normalization == "token" else "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": metadata,
    }
    write_tensors(out / SAELENS_WEIGHTS_FILE, {name: weights[name].contiguous() for name in runfolder.SAE_TENSORS})
    density = _density(run_dir, cfg)
    if density is not None:  # what SAELens's training saves: log10 of each latent's firing rate
        write_tensors(out / SPARSITY_FILE, {"sparsity": torch.log10(density + 1e-10)})
    write_json(out / CFG_FILE, sae_cfg)  # last: a cfg.json means the folder is complete
    return out


def _density(run_dir: Path, cfg: RunConfig) -> torch.Tensor | None:
    if not runfolder.harvest_is_current(run_dir):
        return None
    return runfolder.load_harvest(run_dir, cfg).density.float()


def sparsify_hookpoint(cfg: RunConfig) -> str:
    """The folder sparsify names a hookpoint by: the block's module path below the base model
    (layers.6 for model.layers.6, h.6 for transformer.h.6)."""
    match = _BLOCK.fullmatch(cfg.hookpoint)
    return match.group(1) if match and match.group(1).endswith(f".{cfg.layer}") else f"layers.{cfg.layer}"


def _write_sparsify(cfg: RunConfig, weights: dict[str, torch.Tensor], out: Path) -> Path:
    hookpoint = sparsify_hookpoint(cfg)
    unit = bool(torch.allclose(weights["W_dec"].norm(dim=-1), torch.ones(cfg.n_latents), atol=1e-4))
    sae_cfg = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_latents // cfg.d_in),
        "normalize_decoder": unit,  # false where the input scale was folded into the decoder
        "num_latents": cfg.n_latents,  # wins over expansion_factor
        "k": cfg.k,
        "multi_topk": bool(cfg.train.multi_topk) if cfg.train else False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }
    folder = out / hookpoint
    write_tensors(folder / SAE_FILE, {"encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
                                      "W_dec": weights["W_dec"].contiguous(), "b_dec": weights["b_dec"]})
    write_json(folder / CFG_FILE, sae_cfg)
    write_json(out / "config.json", {"model": hub_name(cfg.model), "hookpoints": [hookpoint], "exported_by": "saescope",
                                     "saescope_model": cfg.model,
                                     "saescope_input_scale_folded": cfg.input_scale})
    return folder
