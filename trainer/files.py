"""Files written whole or not at all, and read with a one-line error naming the file."""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import RunFolderError


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, then rename: a killed process leaves
    either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    # The umask's permissions, as a plain open gives: mkstemp's 0600 (and safetensors', which
    # makes the file anew) would leave run folders unreadable to a server run as another user.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """NumPy arrays as one .npz file (strings as unicode arrays: no pickles)."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)
    _atomic_write(Path(path), write)


def read_arrays(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as found:
            arrays = {name: found[name] for name in found.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RunFolderError(f"{path}: not a readable .npz file ({e})") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise RunFolderError(f"{path}: missing array(s) {', '.join(missing)}")
    return arrays


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (cfg.json, metrics.json, harvest.json)."""
    found = read_json(path)
    if not isinstance(found, dict):
        raise RunFolderError(f"{path}: expected a JSON object, found {type(found).__name__}")
    return found


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
