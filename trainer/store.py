"""The activation store: the residual stream at one hookpoint over a tokenized corpus, computed
once by the model (blocks 0..L) and kept on disk for every run that reads the same activations.

    STORE/
      meta.json          model, layer, context_length, n_contexts, n_heldout, d_model, complete,
                         heldout_complete, forward_seconds (the model's time over the training rows)
      tokens.npy         (C, T) int32 token ids, row c is context c
      activations.npy    (C * T, d) float16, memory-mapped; rows c*T .. c*T+T-1 are context c
      ce_ablated.json    the first eval's CE with block L zero-ablated, which later evals reuse
                         (trainer/evaluate.py)
      probe_labels.npz   the first eval's probe-task labels of the held-out tokens, reused the
                         same way (trainer/probing.py)

Contexts are stored in a seeded random order with the held-out ones last, so training reads the
first rows in big sequential chunks and still sees text from all over the corpus. A store is
reused by any run with the same model, layer and corpus settings (`StoreConfig.meta`).

Training needs only the training rows, so `train` runs the model over those alone ("complete");
the held-out rows are filled by the first evaluation or harvest that reads them
("heldout_complete", `complete_heldout`), once per store, and every later run reuses them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer import corpus
from trainer.errors import ConfigError, RunFolderError
from trainer.files import write_json
from trainer.model import (
    LanguageModel, check_layer, load_language_model, load_tokenizer, max_positions, shared_model, special_token_ids,
)
from trainer.progress import progress
from trainer.sae import fast_matmul_dtype

if TYPE_CHECKING:  # the run's contract reads stores; annotations only, no import at run time
    from trainer.runconfig import RunConfig

log = logging.getLogger(__name__)

META_FILE = "meta.json"  # written atomically: readers see the old one or the new one


class StoreError(RuntimeError):
    """A store that is missing, damaged or of another configuration (printed as one line)."""


@dataclass(frozen=True)
class StoreConfig:
    """What a store holds: the model and hookpoint, the corpus and how it is cut into contexts,
    the split, and the forward's precision. Runs (and imported SAEs' harvests) that agree on
    `meta()` share one store."""

    model: str
    layer: int
    corpus: str
    context_length: int
    tokens: int  # training tokens, rounded down to whole contexts
    heldout_tokens: int  # held-out tokens, whole contexts
    seed: int = 0  # of the split and the contexts' order
    device: str = ""  # where the model runs ("": cuda when available, else cpu)
    fast_matmul: bool = True  # bf16 matmuls where the hardware has them (fast_matmul_dtype)
    text_column: str = corpus.TEXT_COLUMN  # of a Parquet or `datasets` corpus

    def __post_init__(self):
        if not self.text_column:
            raise ConfigError("--text-column must name a column")
        if self.layer < 0:
            raise ConfigError(f"--layer must be >= 0, got {self.layer}")
        if self.context_length < 2:
            raise ConfigError(f"--context-length must be at least 2, got {self.context_length}")
        if self.tokens < self.context_length:
            raise ConfigError(f"--tokens ({self.tokens}) must hold at least one context of {self.context_length}")
        if self.heldout_tokens < self.context_length:
            raise ConfigError(f"--heldout-tokens ({self.heldout_tokens}) must hold at least one context of {self.context_length}")

    @property
    def n_train_contexts(self) -> int:
        return self.tokens // self.context_length

    @property
    def n_heldout_contexts(self) -> int:
        return self.heldout_tokens // self.context_length

    @property
    def forward_dtype(self) -> torch.dtype:
        return fast_matmul_dtype(self.device or None, self.fast_matmul)

    def meta(self) -> dict:
        """What identifies a store: runs that agree on these can share it (meta.json holds them)."""
        return {
            "model": self.model,
            "layer": self.layer,
            "corpus": self.corpus,
            "context_length": self.context_length,
            "n_heldout": self.n_heldout_contexts,
            "n_contexts": self.n_train_contexts + self.n_heldout_contexts,
            "seed": self.seed,
            # A store made in bf16 is not reused by an fp32 run, nor the reverse.
            "forward_dtype": str(self.forward_dtype).removeprefix("torch."),
            # Only another column than the default: every store made before the option matches as it did.
            **({"text_column": self.text_column} if self.text_column != corpus.TEXT_COLUMN else {}),
        }


@dataclass(frozen=True)
class Positions:
    """Which positions of the store's contexts count, in training, evaluation, the harvest and
    the probe alike: all but the first `exclude_first` of each context (the first token is an
    attention sink: at SmolLM2's layer 6 about 7x the others' norm and 29 % of the variance, and
    no page shows it) and, with `exclude_special_tokens`, the tokenizer's special tokens (the
    end-of-text separators between documents)."""

    exclude_first: int = 1
    exclude_special_tokens: bool = True

    def mask(self, tokens: np.ndarray, special_token_ids: list[int]) -> np.ndarray:
        """(C, T) token ids -> (C, T) bool: the positions that count."""
        counted = ~np.isin(tokens, special_token_ids) if self.exclude_special_tokens else np.ones(tokens.shape, bool)
        counted[:, : self.exclude_first] = False
        return counted

    @property
    def everywhere(self) -> bool:
        return self.exclude_first == 0 and not self.exclude_special_tokens

    def describe(self) -> str:
        """For pages and logs: "every position", "all but the first position and special tokens", ..."""
        if self.everywhere:
            return "every position"
        parts = ["the first position" if self.exclude_first == 1 else f"the first {self.exclude_first} positions"] * bool(self.exclude_first)
        parts += ["special tokens"] * self.exclude_special_tokens
        return "all but " + " and ".join(parts)


def prepare_store(cfg: StoreConfig, store_dir: Path) -> "ActivationStore":
    """Reuse a matching complete store, or tokenize the corpus and run the model through block L."""
    meta = cfg.meta()
    if store_matches(store_dir, meta):
        log.info("reusing activations in %s", store_dir)
        return ActivationStore.open(store_dir)
    # Cheap checks first: a bad corpus or layer fails before the model loads.
    check_layer(cfg.model, cfg.layer)
    positions = max_positions(cfg.model)
    if positions and cfg.context_length > positions:  # beyond them: out-of-distribution activations, or a failure
        raise ConfigError(f"--context-length {cfg.context_length} is longer than {cfg.model} takes ({positions} positions)")
    corpus.check_has_text(cfg.corpus, cfg.text_column)
    log.info("loading %s through block %d", cfg.model, cfg.layer)
    lm = load_language_model(cfg.model, cfg.layer, cfg.device or None, fast=cfg.fast_matmul)
    log.info("tokenizing %s into %d contexts of %d tokens", cfg.corpus, meta["n_contexts"], cfg.context_length)
    contexts = corpus.tokenize_contexts(
        lm.tokenizer, corpus.iter_documents(cfg.corpus, cfg.text_column), cfg.context_length, meta["n_contexts"]
    )
    train, heldout = corpus.split_contexts(contexts, cfg.n_heldout_contexts, cfg.seed)
    meta |= {"hookpoint": lm.hookpoint, "special_token_ids": lm.special_token_ids}
    return build_store(store_dir, lm, torch.cat([train, heldout]), meta)


def check_store_not_taken(store_dir: Path, cfg: StoreConfig) -> None:
    """A folder that may hold another configuration's activations (other SAEs may read them, and
    they may have cost hours) is not overwritten: refused before any compute."""
    if differences := store_differences(store_dir, cfg.meta()):
        raise ConfigError(f"{store_dir} holds the activations of another configuration ({'; '.join(differences)}), "
                          f"which this run would overwrite: train into another folder (or --store), or delete {store_dir} "
                          "to build the store there")


@dataclass
class ActivationStore:
    path: Path
    meta: dict
    tokens: np.ndarray  # (C, T) int32
    activations: np.ndarray  # (C * T, d) float16 memmap

    @property
    def context_length(self) -> int:
        return self.meta["context_length"]

    @property
    def n_contexts(self) -> int:
        return self.meta["n_contexts"]

    @property
    def n_train_contexts(self) -> int:
        return self.meta["n_contexts"] - self.meta["n_heldout"]

    @property
    def heldout_ready(self) -> bool:
        return self.meta.get("heldout_complete", True)  # stores made before the flag were built whole

    def check_ready(self, last_context: int) -> None:
        """Held-out rows are zeros until `complete_heldout` fills them: never hand those out."""
        if last_context > self.n_train_contexts and not self.heldout_ready:
            raise StoreError(f"{self.path}: the held-out activations are not computed yet (complete_heldout; `saescope eval` does it)")

    def rows(self, first_context: int, last_context: int) -> torch.Tensor:
        """Activations of contexts [first, last) as float32: ((last - first) * T, d)."""
        self.check_ready(last_context)
        T = self.context_length
        return torch.from_numpy(np.asarray(self.activations[first_context * T : last_context * T], dtype=np.float32))

    def token_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Activations of the token rows `positions` (any order) as stored (fp16): (len, d). Only
        the pages holding those rows are read (a data-parallel rank reads about its share of a
        chunk). One gather in the stored precision, widened by the caller on its device: 8x
        faster than a fancy-indexed read in ascending order cast while scattered into place."""
        return torch.from_numpy(np.take(self.activations, positions.numpy(), axis=0))

    def release(self, first_context: int, last_context: int) -> None:
        """Unmap the pages of contexts [first, last) from this process: a memory-mapped store read
        once from end to end would otherwise stay resident, all of it counted in its memory."""
        T = self.context_length
        release_rows(self.activations, first_context * T, last_context * T)

    def contexts(self, rows) -> torch.Tensor:
        """Activations of the contexts `rows` (any order) as float32: (b, T, d)."""
        self.check_ready(int(np.max(rows, initial=-1)) + 1)
        T, d = self.context_length, self.activations.shape[1]
        by_context = self.activations.reshape(-1, T, d)
        return torch.from_numpy(np.asarray(by_context[np.asarray(rows)], dtype=np.float32))

    def vocab(self) -> list[str]:
        return json.loads((self.path / "vocab.json").read_text())

    def special_token_ids(self) -> list[int]:
        """The tokenizer's special tokens, as meta.json records them (a store built before it did:
        read from the model's tokenizer, and recorded)."""
        if "special_token_ids" not in self.meta:
            found = special_token_ids(load_tokenizer(self.meta["model"]))
            self.meta = {**self.meta, "special_token_ids": found}
            try:
                write_json(self.path / META_FILE, {**json.loads((self.path / META_FILE).read_text()), "special_token_ids": found})
            except OSError:  # a read-only store: read again next time
                pass
        return list(self.meta["special_token_ids"])

    def counted(self, positions: "Positions", first_context: int = 0, last_context: int | None = None) -> np.ndarray:
        """(contexts, T) bool: the positions of contexts [first, last) that count."""
        special = self.special_token_ids() if positions.exclude_special_tokens else []
        return positions.mask(self.tokens[first_context:last_context], special)

    @classmethod
    def open(cls, path: Path) -> "ActivationStore":
        """The store at `path`; a missing, partial or damaged one is a StoreError naming it."""
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text())
            tokens = np.load(path / "tokens.npy")
            activations = np.load(path / "activations.npy", mmap_mode="r")
        except (OSError, ValueError) as e:  # missing files, truncated or garbled JSON / .npy
            raise StoreError(f"{path}: not a readable activation store ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or not {"context_length", "n_contexts", "n_heldout", "d_model"} <= meta.keys():
            raise StoreError(f"{path / META_FILE}: not an activation store's meta.json")
        return cls(path, meta, tokens, activations)


def release_rows(activations: np.ndarray, first: int, last: int, flush: bool = True) -> None:
    """Unmap the pages of rows [first, last) of a memory-mapped array from this process, with
    `flush` first writing them to the disk and waiting for it. Without it the data is not lost:
    unmapping a shared file mapping leaves the written pages in the OS page cache, dirty, and the
    kernel writes them back in the background; a later read faults them back in. Pages shared
    with neighbouring rows are unmapped too, which costs nothing."""
    mapping = getattr(activations, "_mmap", None)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row_bytes = activations.shape[1] * activations.itemsize
    # numpy maps the file from the allocation boundary below the array's offset.
    data = activations.offset % mmap.ALLOCATIONGRANULARITY
    start = data + first * row_bytes
    start -= start % mmap.PAGESIZE  # flush and madvise take whole pages
    end = min(data + last * row_bytes, len(mapping))
    if end > start:
        if flush and activations.flags.writeable:
            mapping.flush(start, end - start)
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def token_vocab(tokenizer) -> list[str]:
    """Readable text of every token id: leading spaces and newlines kept, not 'Ġ' and 'Ċ'."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def complete_meta(path: Path) -> dict | None:
    """The meta.json of a complete store at `path`; None when there is none (or only a killed
    build's leftovers, or a meta.json too damaged to say)."""
    meta_file = Path(path) / META_FILE
    try:
        found = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("complete", False) else None


def store_matches(path: Path, meta: dict) -> bool:
    found = complete_meta(path)
    return found is not None and all(found.get(key) == value for key, value in meta.items())


def store_differences(path: Path, meta: dict) -> list[str]:
    """How the complete store at `path` differs from `meta` ("layer 6, not 1"); empty when there is
    none (complete_meta) or it matches."""
    found = complete_meta(path)
    if found is None:
        return []
    return [f"{key} {found.get(key)!r}, not {value!r}" for key, value in meta.items() if found.get(key) != value]


def open_store_for_sae(path: Path, run: "RunConfig", run_dir: Path) -> ActivationStore:
    """The store at `path`, checked to hold what the SAE reads (its model and layer): eval or
    harvest on another store would write plausible-looking numbers about the wrong activations."""
    if not Path(path).exists():
        raise StoreError(f"{path}: no such activation store (moved or deleted?): give its place with --store")
    store = ActivationStore.open(path)
    found, wanted = (store.meta.get("model"), store.meta.get("layer")), (run.model, run.layer)
    if found != wanted:
        raise RunFolderError(
            f"{store.path} holds the activations of {found[0]} at layer {found[1]}, but the SAE in {run_dir} reads "
            f"{wanted[0]} at layer {wanted[1]}: give --store the store it was trained on"
        )
    return store


def build_store(
    path: Path, lm: LanguageModel, contexts: torch.Tensor, meta: dict, batch_size: int = 16
) -> ActivationStore:
    """Write the store's tokens (all contexts) and run the model through block L over the training
    contexts, the first C - meta["n_heldout"] (see the module docstring for the held-out ones).
    A killed build is never mistaken for a complete one: meta.json says complete only after
    every training row is flushed. meta.json's forward_seconds is the time the model took over the
    training contexts (metrics.json's forward_tokens_per_s)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    C, T = contexts.shape
    n_train = C - meta["n_heldout"]
    meta = {**meta, "n_contexts": C, "context_length": T, "d_model": lm.d_model, "complete": False,
            "heldout_complete": n_train == C}
    write_json(path / META_FILE, meta)
    np.save(path / "tokens.npy", contexts.numpy().astype(np.int32))
    (path / "vocab.json").write_text(json.dumps(token_vocab(lm.tokenizer)))
    activations = np.lib.format.open_memmap(
        path / "activations.npy", mode="w+", dtype=np.float16, shape=(C * T, lm.d_model)
    )
    began = time.perf_counter()
    run_model(lm, contexts, 0, n_train, activations, "activations", batch_size)
    forward_seconds = time.perf_counter() - began
    del activations
    write_json(path / META_FILE, {**meta, "complete": True, "forward_seconds": forward_seconds})
    return ActivationStore.open(path)


def complete_heldout(store: ActivationStore, lm: LanguageModel | None = None, batch_size: int = 16) -> ActivationStore:
    """The store with its held-out rows computed: the first caller runs the model over them (`lm`,
    or the store's model loaded here) in the precision the store was made in; a lock makes
    concurrent callers wait for it instead of repeating it. Killed mid-way, the flag stays unset
    and the next caller starts again."""
    if store.heldout_ready:
        return store
    with open(store.path / ".heldout.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = ActivationStore.open(store.path)  # another process may have filled it meanwhile
        if store.heldout_ready:
            return store
        meta = store.meta
        dtype = getattr(torch, meta.get("forward_dtype", "float32"))
        if lm is None or lm.forward_dtype != dtype:  # the same model and device, in the store's precision
            lm = LanguageModel(shared_model(meta["model"], lm.device if lm else None, dtype=dtype), meta["layer"])
        activations = np.load(store.path / "activations.npy", mmap_mode="r+")
        contexts = torch.from_numpy(store.tokens).long()
        run_model(lm, contexts, store.n_train_contexts, store.n_contexts, activations, "held-out activations", batch_size)
        del activations
        write_json(store.path / META_FILE, {**meta, "heldout_complete": True})
    return ActivationStore.open(store.path)


# Bytes written to a store between releases of its written pages (release_rows): without them, every
# page written stays in the writing process, and `train`'s peak memory held the whole store.
RELEASE_BYTES = 64 * 2**20


def run_model(lm: LanguageModel, contexts: torch.Tensor, first: int, last: int, activations: np.ndarray,
              desc: str, batch_size: int) -> None:
    """The residual stream of contexts [first, last) into their rows of `activations`, flushed at the end."""
    T = contexts.shape[1]
    row_bytes = activations.shape[1] * activations.itemsize
    released = first * T  # rows before this one are out of this process (in the file or the page cache)
    with progress(total=(last - first) * T, desc=desc, unit="tok", unit_scale=True) as bar:
        for start in range(first, last, batch_size):
            batch = contexts[start : min(start + batch_size, last)]
            resid = lm.residual(batch)  # (B, T, d)
            # Cast to fp16 in torch: NumPy's float16 conversion is ~15x slower (0.5 s of a store).
            rows = resid.reshape(-1, lm.d_model).to(torch.float16).cpu().numpy()
            written = (start + batch.shape[0]) * T
            activations[start * T : written] = rows
            if (written - released) * row_bytes >= RELEASE_BYTES:
                # No flush here: waiting for the disk every 64 MiB stalled the forward pass
                # (0.7 s of a 345 MB store here); the one flush below waits for what is left.
                release_rows(activations, released, written, flush=False)
                released = written
            bar.update(batch.numel())
    activations.flush()
    release_rows(activations, released, last * T)

