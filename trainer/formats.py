"""Which tool wrote an SAE folder: saescope, SAELens or sparsify, told apart by their files and
tensor names (trainer/interop.py reads the other tools' folders)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from trainer.errors import RunFolderError

CFG_FILE = "cfg.json"  # all three tools name their config so
SAE_FILE = "sae.safetensors"  # saescope's weights, and sparsify's
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
FORMATS = ("saescope", "saelens", "sparsify")
TOOL_NAMES = {"saescope": "saescope", "saelens": "SAELens", "sparsify": "sparsify"}


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise RunFolderError(f"{path}: not a readable safetensors file ({e})") from None


def detect_format(folder) -> str:
    """"saescope", "saelens" or "sparsify", from the files in `folder` and the tensor names."""
    folder = Path(folder)
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
