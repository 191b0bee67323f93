"""The run folder: one self-describing artifact, written and read by matching functions.

    RUN/
      cfg.json               everything needed to rebuild the SAE and its inputs
      sae.safetensors        W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] (SAELens names)
      metrics.json           evaluation on held-out tokens (fvu, l0, dead_fraction, ...)
      harvest/
        harvest.json         how the harvest was made (tokens seen, top_k, context_length, ...)
        latents.safetensors  density [n], max_activation [n], mean_activation [n]
        examples.safetensors top_context [n, K] (row of contexts, -1 = empty slot),
                             top_activations [n, K, T] (fp16, this latent on every token),
                             top_max [n, K] (the example's max activation)
        contexts.safetensors token_ids [C, T] (each context stored once)
        vocab.json           token id -> readable token string

Every reader raises `RunFolderError` with a one-line message naming the file at fault.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CFG_FILE = "cfg.json"
SAE_FILE = "sae.safetensors"
METRICS_FILE = "metrics.json"
HARVEST_DIR = "harvest"
SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


class RunFolderError(ValueError):
    """A run folder is missing a file, or its files disagree."""


# ---------------------------------------------------------------- writing


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, then rename: a killed process leaves
    either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_cfg(run_dir: Path, cfg: dict) -> None:
    write_json(Path(run_dir) / CFG_FILE, cfg)


def save_sae_weights(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    write_tensors(Path(run_dir) / SAE_FILE, {name: weights[name] for name in SAE_TENSORS})


def save_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge `metrics` into metrics.json (training and evaluation each add their part)."""
    path = Path(run_dir) / METRICS_FILE
    merged = read_json(path) if path.exists() else {}
    merged.update(metrics)
    write_json(path, merged)


@dataclass
class Harvest:
    """Per-latent statistics and top-activating contexts of one SAE."""

    density: torch.Tensor  # (n,) share of harvest tokens where the latent fires
    max_activation: torch.Tensor  # (n,)
    mean_activation: torch.Tensor  # (n,) mean over the tokens where it fires
    top_context: torch.Tensor  # (n, K) int64 row into token_ids, -1 = empty
    top_activations: torch.Tensor  # (n, K, T) the latent's activation on every token
    top_max: torch.Tensor  # (n, K)
    token_ids: torch.Tensor  # (C, T) int32, each context once
    vocab: list[str]  # token id -> readable string
    info: dict  # n_tokens, top_k, context_length, ...

    @property
    def n_latents(self) -> int:
        return self.density.shape[0]


def save_harvest(run_dir: Path, harvest: Harvest) -> None:
    out = Path(run_dir) / HARVEST_DIR
    write_tensors(out / "contexts.safetensors", {"token_ids": harvest.token_ids.to(torch.int32)})
    write_json(out / "vocab.json", harvest.vocab)
    write_tensors(
        out / "latents.safetensors",
        {
            "density": harvest.density.float(),
            "max_activation": harvest.max_activation.float(),
            "mean_activation": harvest.mean_activation.float(),
        },
    )
    write_tensors(
        out / "examples.safetensors",
        {
            "top_context": harvest.top_context.long(),
            "top_activations": harvest.top_activations.half(),
            "top_max": harvest.top_max.float(),
        },
    )
    # harvest.json last: its presence says the harvest is complete.
    write_json(out / "harvest.json", harvest.info)


# ---------------------------------------------------------------- reading


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None


def read_tensors(path: Path, required: tuple[str, ...]) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunFolderError(f"{path}: not a readable safetensors file ({e})") from None
    missing = [name for name in required if name not in tensors]
    if missing:
        raise RunFolderError(f"{path}: missing tensor(s) {', '.join(missing)}")
    return tensors


def load_cfg(run_dir: Path) -> dict:
    cfg = read_json(Path(run_dir) / CFG_FILE)
    missing = [key for key in ("model", "layer", "d_in", "n_latents", "k") if key not in cfg]
    if missing:
        raise RunFolderError(f"{Path(run_dir) / CFG_FILE}: missing key(s) {', '.join(missing)}")
    return cfg


def load_sae_weights(run_dir: Path, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """The SAE's tensors, checked against cfg.json's shapes."""
    cfg = cfg or load_cfg(run_dir)
    path = Path(run_dir) / SAE_FILE
    weights = read_tensors(path, SAE_TENSORS)
    d, n = cfg["d_in"], cfg["n_latents"]
    expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise RunFolderError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, cfg.json says {shape}"
            )
    return {name: weights[name].float() for name in SAE_TENSORS}


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    return read_json(path) if path.exists() else {}


def load_harvest(run_dir: Path, cfg: dict | None = None) -> Harvest:
    """The harvest, with every shape checked against cfg.json and against each other."""
    cfg = cfg or load_cfg(run_dir)
    folder = Path(run_dir) / HARVEST_DIR
    info = read_json(folder / "harvest.json")
    latents = read_tensors(folder / "latents.safetensors", ("density", "max_activation", "mean_activation"))
    examples = read_tensors(folder / "examples.safetensors", ("top_context", "top_activations", "top_max"))
    token_ids = read_tensors(folder / "contexts.safetensors", ("token_ids",))["token_ids"]
    vocab = read_json(folder / "vocab.json")
    n = cfg["n_latents"]
    for name, tensor in latents.items():
        if tuple(tensor.shape) != (n,):
            raise RunFolderError(
                f"{folder / 'latents.safetensors'}: {name} has {tuple(tensor.shape)} values, cfg.json says {n} latents"
            )
    top_context, top_activations = examples["top_context"], examples["top_activations"]
    if top_context.ndim != 2 or top_context.shape[0] != n:
        raise RunFolderError(
            f"{folder / 'examples.safetensors'}: top_context has shape {tuple(top_context.shape)}, expected ({n}, K)"
        )
    if top_activations.shape[:2] != top_context.shape or top_activations.shape[2] != token_ids.shape[1]:
        raise RunFolderError(
            f"{folder / 'examples.safetensors'}: top_activations has shape {tuple(top_activations.shape)}, "
            f"expected {tuple(top_context.shape) + (token_ids.shape[1],)}"
        )
    if top_context.numel() and int(top_context.max()) >= token_ids.shape[0]:
        raise RunFolderError(f"{folder / 'examples.safetensors'}: top_context points past the {token_ids.shape[0]} contexts")
    if token_ids.numel() and int(token_ids.max()) >= len(vocab):
        raise RunFolderError(f"{folder / 'vocab.json'}: {len(vocab)} tokens, but contexts use id {int(token_ids.max())}")
    return Harvest(
        density=latents["density"],
        max_activation=latents["max_activation"],
        mean_activation=latents["mean_activation"],
        top_context=top_context.long(),
        top_activations=top_activations.float(),
        top_max=examples["top_max"].float(),
        token_ids=token_ids.long(),
        vocab=vocab,
        info=info,
    )


def sae_slug(cfg: dict) -> str:
    """A readable URL id: model, layer, size, k (e.g. smollm2-135m-instruct-l6-4096-k32)."""
    model = str(cfg.get("model_name") or cfg["model"]).rstrip("/").split("/")[-1].lower()
    model = "".join(c if c.isalnum() or c in ".-" else "-" for c in model).strip("-.") or "model"
    return f"{model}-l{cfg['layer']}-{cfg['n_latents']}-k{cfg['k']}"
