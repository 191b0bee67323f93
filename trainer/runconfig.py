"""The run's contract: `RunConfig` is the only reader and writer of a run folder's cfg.json.

cfg.json says what the SAE reads and how to rebuild it: the language model and the hookpoint
(the residual stream after block `layer`), the SAE's sizes (d_in, n_latents, k), the fixed input
scale applied before encoding, the activation store it was trained or harvested on, and how it
was made: the training options (`train`, a TrainConfig) or, for an SAE imported from SAELens or
sparsify, its source. The file stays one flat JSON object, as other tools and older saescope
versions write and read it; RunConfig validates it once, where it is built (from training, from
an import, or from the file), and every stage takes the RunConfig instead of a dict.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from trainer.config import TrainConfig, model_name, run_slug
from trainer.errors import ConfigError, RunFolderError
from trainer.files import read_json_object, write_json
from trainer.formats import CFG_FILE, TOOL_NAMES, detect_format
from trainer.model import LanguageModel, load_language_model, local_model_shape
from trainer.sae import NORMALIZATIONS, InputNorm, check_size
from trainer.store import Positions

CHECKPOINT_FILE = "checkpoint.pt"  # a run still training, or killed before it finished (trainer.train)
REQUIRED = ("model", "layer", "d_in", "n_latents", "k")


@dataclass(frozen=True)
class StoreRecord:
    """Where a run's activation store is: its absolute path, and its path from the run folder,
    which still leads to it when the two are moved together (a demo or sweep folder, a run
    trained into its own folder)."""

    path: str
    relative: str | None = None

    @classmethod
    def of(cls, store_dir: Path, run_dir: Path) -> "StoreRecord":
        store = Path(store_dir).resolve()
        return cls(str(store), os.path.relpath(store, Path(run_dir).resolve()))

    @classmethod
    def from_json(cls, saved: dict) -> "StoreRecord | None":
        """The record in cfg.json or a checkpoint (keys store, store_relative); None when none."""
        return cls(str(saved["store"]), saved.get("store_relative")) if saved.get("store") else None

    def to_json(self) -> dict:
        return {"store": self.path, **({"store_relative": self.relative} if self.relative else {})}

    def locate(self, run_dir: Path) -> Path:
        """Where it was, or where its relative path now leads when the run folder was moved."""
        path = Path(self.path)
        if path.exists() or not self.relative:
            return path
        moved = Path(run_dir) / self.relative
        return moved if moved.exists() else path


@dataclass(frozen=True)
class ImportSource:
    """An SAE made by another tool: which, from where, in what precision, and its own config."""

    format: str  # "saelens", "sparsify", or "saescope" (a run folder imported as it is)
    path: str | None = None
    dtype: str | None = None
    cfg: dict | None = None

    def to_json(self) -> dict:
        found = {"source_format": self.format, "source_path": self.path, "source_dtype": self.dtype, "source_cfg": self.cfg}
        return {key: value for key, value in found.items() if value is not None}


@dataclass(frozen=True)
class RunConfig:
    model: str  # the bundled alias, a Hugging Face name or a local folder: what loads the language model
    layer: int  # the hookpoint: the residual stream after block `layer` (the output of model.layers[layer])
    d_in: int
    n_latents: int
    k: int
    input_scale: float = 1.0  # x is multiplied by it before encoding ("scale" normalization), at every stage
    normalization: str = "scale"  # or "token": each token's mean and deviation (InputNorm)
    recorded_hookpoint: str | None = None  # the model's own name of the hookpoint module, when it was recorded
    architecture: str = "topk"
    train: TrainConfig | None = None  # how it was trained; None for an SAE imported from another tool
    store: StoreRecord | None = None
    source: ImportSource | None = None
    extra: dict = field(default_factory=dict)  # keys this saescope does not read, written back as found

    def __post_init__(self):
        sizes = {"layer": self.layer, "d_in": self.d_in, "n_latents": self.n_latents, "k": self.k}
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in sizes.values()):
            raise RunFolderError(f"layer, d_in, n_latents and k must be whole numbers, found {sizes}")
        if self.layer < 0 or self.d_in < 1:
            raise RunFolderError(f"needs layer >= 0 and d_in >= 1, found {sizes}")
        try:
            check_size(self.n_latents, self.k)
        except ConfigError as e:
            raise RunFolderError(str(e)) from None
        scale = self.input_scale
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
            raise RunFolderError(f"input_scale must be a finite number > 0, found {scale!r}")
        if not isinstance(self.model, str) or not self.model:
            raise RunFolderError(f"model must name a language model, found {self.model!r}")
        if self.normalization not in NORMALIZATIONS or (self.train and self.train.normalization != self.normalization):
            raise RunFolderError(f"normalization must be one of {', '.join(NORMALIZATIONS)} (the training's), found {self.normalization!r}")

    # ------------------------------------------------------------ derived names

    @property
    def model_name(self) -> str:
        """The model's last path part, as pages show it (HuggingFaceTB/SmolLM2-135M -> SmolLM2-135M)."""
        return model_name(self.model)

    @property
    def slug(self) -> str:
        """A readable URL id: model, layer, size, k (e.g. smollm2-135m-instruct-l6-4096-k32)."""
        return run_slug(self.model, self.layer, self.n_latents, self.k)

    @property
    def hookpoint(self) -> str:
        """The module whose output the SAE reads, e.g. model.layers.6 (layers.L when not recorded)."""
        return self.recorded_hookpoint or f"layers.{self.layer}"

    @property
    def fast_matmul(self) -> bool:
        """bf16 matmuls where the hardware has them, in the model's forward and in choosing the top
        k; a run trained all-fp32 is also harvested and probed so."""
        return self.train.fast_matmul if self.train else True

    @property
    def norm(self) -> InputNorm:
        """How inputs are normalised before encoding and reconstructions mapped back."""
        return InputNorm(self.normalization, self.input_scale)

    @property
    def positions(self) -> Positions:
        """The positions every stage counts: the training's, or the defaults for an imported SAE."""
        return self.train.positions if self.train else Positions()

    @property
    def imported(self) -> bool:
        """An SAE made by another tool (not trained by saescope)."""
        return self.train is None

    # ------------------------------------------------------------ what it reads

    def store_dir(self, run_dir: Path) -> Path | None:
        return self.store.locate(run_dir) if self.store else None

    def with_store(self, store_dir: Path, run_dir: Path) -> "RunConfig":
        return replace(self, store=StoreRecord.of(store_dir, run_dir))

    def language_model(self, device: str | torch.device | None = None, fast: bool | None = None) -> LanguageModel:
        """The run's language model, seen through its hookpoint: `residual` runs blocks 0..layer
        only, and the whole model (`loaded.causal_lm`) gives logits. Loaded once per process,
        device and precision; `fast` (default: the run's own) picks bf16 matmuls where the
        hardware has them."""
        return load_language_model(self.model, self.layer, device, fast=self.fast_matmul if fast is None else fast)

    def check_model(self, where: Path) -> None:
        """The layer and width against the model's config, when this machine has the model (no
        weights loaded, no network): a mismatch is found before minutes of forward passes."""
        shape = local_model_shape(self.model)
        if shape is None:
            return
        n_layers, width = shape
        if not 0 <= self.layer < n_layers:
            raise RunFolderError(f"{where}: layer {self.layer} is out of range: '{self.model}' has blocks 0..{n_layers - 1} (--layer)")
        if width is not None and width != self.d_in:
            raise RunFolderError(f"{where}: the SAE reads {self.d_in}-wide activations, '{self.model}' has d_model {width} (--model)")

    # ------------------------------------------------------------ building

    @classmethod
    def from_training(cls, train: TrainConfig, d_in: int, input_scale: float, hookpoint: str | None,
                      store: StoreRecord) -> "RunConfig":
        return cls(model=train.model, layer=train.layer, d_in=d_in, n_latents=train.n_latents, k=train.k,
                   input_scale=input_scale, normalization=train.normalization, recorded_hookpoint=hookpoint,
                   train=train, store=store)

    # ------------------------------------------------------------ cfg.json

    def to_json(self) -> dict:
        """cfg.json's object: the training options flat, as they have always been, then the run's own keys."""
        trained = {**self.train.to_dict(), "lr_effective": self.train.effective_lr,
                   "dead_tokens_effective": self.train.effective_dead_tokens} if self.train else {}
        return {
            **trained,
            "model": self.model,
            "model_name": self.model_name,  # for other readers of cfg.json; derived from model here
            "layer": self.layer,
            "hookpoint": self.hookpoint,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "input_scale": self.input_scale,
            "normalization": self.normalization,
            **(self.store.to_json() if self.store else {}),
            "architecture": self.architecture,
            **(self.source.to_json() if self.source else {}),
            **self.extra,
        }

    @classmethod
    def from_json(cls, saved: dict) -> "RunConfig":
        """A cfg.json object as written by this or an earlier saescope (booleans saved as 0/1,
        options added since then: TrainConfig.from_saved)."""
        if missing := [key for key in REQUIRED if key not in saved]:
            raise RunFolderError(f"missing key(s) {', '.join(missing)}")
        source = ImportSource(saved["source_format"], saved.get("source_path"), saved.get("source_dtype"),
                              saved.get("source_cfg")) if saved.get("source_format") else None
        trained = (source is None or source.format == "saescope") and "tokens" in saved
        try:
            train = TrainConfig.from_saved(saved) if trained else None
        except (ConfigError, TypeError) as e:
            raise RunFolderError(f"the training options are not valid ({e})") from None
        known = {*(f.name for f in fields(TrainConfig)), *REQUIRED, "model_name", "hookpoint", "input_scale", "architecture",
                 "normalization",
                 "lr_effective", "dead_tokens_effective", "store", "store_relative",
                 "source_format", "source_path", "source_dtype", "source_cfg"}
        return cls(model=saved["model"], layer=saved["layer"], d_in=saved["d_in"], n_latents=saved["n_latents"],
                   k=saved["k"], input_scale=saved.get("input_scale", 1.0), normalization=saved.get("normalization", "scale"),
                   recorded_hookpoint=saved.get("hookpoint") if saved.get("hookpoint") != f"layers.{saved['layer']}" else None,
                   architecture=saved.get("architecture", "topk"), train=train, store=StoreRecord.from_json(saved),
                   source=source, extra={key: value for key, value in saved.items() if key not in known})

    @classmethod
    def load(cls, run_dir: Path) -> "RunConfig":
        """RUN/cfg.json; a missing, damaged or foreign one is a RunFolderError saying what to do."""
        run_dir = Path(run_dir)
        path = run_dir / CFG_FILE
        if run_dir.is_dir() and not path.exists():
            if (run_dir / CHECKPOINT_FILE).exists():  # a run killed mid-way
                raise RunFolderError(f"{run_dir}: a run killed before it finished (it has a checkpoint, no {CFG_FILE} yet): "
                                     f"finish it with `saescope train --resume {run_dir}`")
            raise RunFolderError(f"{run_dir}: not a run folder (it has no {CFG_FILE}): train one with `saescope train --out`, "
                                 "or make one of a SAELens or sparsify SAE with `saescope import`")
        saved = read_json_object(path)
        if not all(key in saved for key in REQUIRED) and (foreign := _foreign_format(run_dir)):
            raise RunFolderError(f"{run_dir}: an SAE saved by {foreign}, not a saescope run folder; "
                                 f"turn it into one with `saescope import {run_dir} --out RUN`")
        try:
            return cls.from_json(saved)
        except RunFolderError as e:
            raise RunFolderError(f"{path}: {e}") from None

    def save(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / CFG_FILE, self.to_json())


def _foreign_format(folder: Path) -> str | None:
    """"SAELens" or "sparsify" when `folder` holds an SAE in that tool's layout, else None."""
    try:
        found = detect_format(folder)
    except RunFolderError:
        return None
    return TOOL_NAMES[found] if found != "saescope" else None
