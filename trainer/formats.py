"""Which tool wrote an SAE: saescope, SAELens or sparsify (a folder each, told apart by their
files and tensor names), or OpenAI's sparse_autoencoder (a .pt file of its Autoencoder's state
dict). trainer/interop.py reads the other tools' SAEs; trainer/export.py writes SAELens and
sparsify folders."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from trainer.errors import RunFolderError

CFG_FILE = "cfg.json"  # all three tools name their config so
SAE_FILE = "sae.safetensors"  # saescope's weights, and sparsify's
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
OPENAI_SUFFIX = ".pt"  # OpenAI's released SAEs: torch.save of Autoencoder.state_dict()
FORMATS = ("saescope", "saelens", "sparsify", "openai")
TOOL_NAMES = {"saescope": "saescope", "saelens": "SAELens", "sparsify": "sparsify", "openai": "OpenAI's sparse_autoencoder"}


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise RunFolderError(f"{path}: not a readable safetensors file ({e})") from None


def detect_format(folder) -> str:
    """"saescope", "saelens" or "sparsify", from the files in `folder` and the tensor names;
    "openai" for a .pt file."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == OPENAI_SUFFIX:
        return "openai"
    if folder.is_file():
        raise RunFolderError(f"{folder}: a file, not an SAE folder (of the files, only OpenAI's {OPENAI_SUFFIX} state dicts are read)")
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: folder not found")
    if not (folder / CFG_FILE).is_file():
        hookpoints = sorted(p.name for p in folder.iterdir() if (p / CFG_FILE).is_file())
        if hookpoints:
            shown = ", ".join(hookpoints[:8]) + (", ..." if len(hookpoints) > 8 else "")
            raise RunFolderError(
                f"{folder / CFG_FILE}: file not found; this looks like a run with one SAE per hookpoint "
                f"({shown}): give one of those folders"
            )
        raise RunFolderError(f"{folder / CFG_FILE}: file not found (not an SAE folder)")
    if (folder / SAELENS_WEIGHTS_FILE).is_file():
        return "saelens"
    if (folder / SAE_FILE).is_file():
        names = set(_tensor_names(folder / SAE_FILE))
        if "encoder.weight" in names:
            return "sparsify"
        if "W_enc" in names:
            return "saescope"
        raise RunFolderError(
            f"{folder / SAE_FILE}: neither our tensors (W_enc, ...) nor sparsify's (encoder.weight, ...); "
            f"found {', '.join(sorted(names)) or 'none'}"
        )
    raise RunFolderError(
        f"{folder}: no {SAE_FILE} (saescope, sparsify) or {SAELENS_WEIGHTS_FILE} (SAELens) next to {CFG_FILE}"
    )
