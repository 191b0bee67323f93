"""The run folder: one self-describing artifact, written and read by matching functions.

    RUN/
      cfg.json               everything needed to rebuild the SAE and its inputs
      sae.safetensors        W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] (SAELens names)
      metrics.json           evaluation on held-out tokens (fvu, l0, dead_fraction, ...)
      harvest/
        harvest.json         how the harvest was made (version, tokens seen, bins, seed, exclusions)
        latents.safetensors  per latent: density, max/mean activation, activation histogram,
                             quantile edges and shares, logit effects, nearest latents
        examples.safetensors top and quantile-sampled examples: a context row and the latent's
                             activation on every token of it (fp16)
        contexts.safetensors token_ids [C, T] (each context stored once)
        tokens.safetensors   for search: per token, the latents that fire most on it
        explanations.json    per latent: a token pattern and its held-out precision / recall
        vocab.json           token id -> readable token string
        token_bytes.json     token id -> its bytes in hex (byte-level BPE tokenizers only)
        ablations.safetensors  (harvest --ablation-examples N only) per latent, its feature
                             page's ablation section over its first N top contexts
      llm_explanations.jsonl explanations from a language model (`saescope explain`), appended per
                             latent; trainer/llm_explanations.py reads and writes it
      (HARVEST_TENSORS below lists every tensor with its shape.)

Every reader raises `RunFolderError` with a one-line message naming the file at fault.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import RunFolderError
from trainer.files import read_json, read_json_object, read_tensors, write_json, write_tensors
from trainer.formats import SAE_FILE
from trainer.llm_explanations import drop_llm_explanations
from trainer.runconfig import RunConfig
from trainer.sae import TopKSAE

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
HARVEST_DIR = "harvest"
TOKEN_BYTES_FILE = "token_bytes.json"  # in HARVEST_DIR, optional
SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


# ---------------------------------------------------------------- writing


def save_sae_weights(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    write_tensors(Path(run_dir) / SAE_FILE, {name: weights[name] for name in SAE_TENSORS})


def save_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge `metrics` into metrics.json (training and evaluation each add their part)."""
    path = Path(run_dir) / METRICS_FILE
    merged = read_json(path) if path.exists() else {}
    merged.update(metrics)
    write_json(path, merged)


HARVEST_VERSION = 2  # harvest.json "version": the loader refuses older harvests with a clear message

# Tensor shapes by file, in symbols: n latents, K top examples, T tokens per context, C stored
# contexts, H histogram bins, Q quantile bins, S samples per bin, L logit tokens, M neighbours,
# R (token, latent) search rows. load_harvest checks every tensor against these.
HARVEST_TENSORS = {
    "latents.safetensors": {
        "density": ("n",),  # share of harvest tokens where the latent fires
        "max_activation": ("n",),
        "mean_activation": ("n",),  # over the tokens where it fires
        "histogram": ("n", "H"),  # counts of non-zero activations in H equal bins over (0, max]
        "quantile_edges": ("n", "Q+1"),  # exact quantiles 0, 1/Q, .., 1 of the non-zero activations
        "quantile_share": ("n", "Q"),  # share of the latent's firings in each quantile bin
        "logit_top_ids": ("n", "L"),  # tokens whose logit the decoder direction raises most
        "logit_top_values": ("n", "L"),
        "logit_bottom_ids": ("n", "L"),  # ... and lowers most (most negative first)
        "logit_bottom_values": ("n", "L"),
        "logit_histogram": ("n", "H"),  # counts of all vocab logit effects in H bins over logit_range
        "logit_range": ("n", 2),  # (min, max) of the latent's logit effects
        "neighbour_index": ("n", "M"),  # nearest latents by decoder cosine, most similar first
        "neighbour_cosine": ("n", "M"),
    },
    "examples.safetensors": {
        "top_context": ("n", "K"),  # row into token_ids, -1 = empty slot
        "top_activations": ("n", "K", "T"),  # fp16, the latent on every token of the context
        "top_max": ("n", "K"),  # the context's max activation, descending
        "quantile_context": ("n", "Q", "S"),  # -1 = empty slot
        "quantile_activations": ("n", "Q", "S", "T"),
        "quantile_value": ("n", "Q", "S"),  # the sampled firing's activation (inside the bin)
        "quantile_position": ("n", "Q", "S"),  # the sampled firing's token position in the context
    },
    "contexts.safetensors": {"token_ids": ("C", "T")},  # each context once
    "tokens.safetensors": {  # search: for each token, the latents that fire most on it
        "token_id": ("R",),
        "token_latent": ("R",),
        "token_mean_activation": ("R",),  # the latent's mean activation over every occurrence of the token
        "token_fire_rate": ("R",),  # share of the token's occurrences where the latent fires
        "token_occurrences": ("R",),  # how often the token occurs in the harvest tokens
    },
}
# Optional (`saescope harvest --ablation-examples N`; trainer.ablation_harvest): each latent's
# feature-page ablation section, precomputed. N top contexts per latent (slot j is top_context[:, j];
# an empty slot is all zeros), A tokens raised and lowered (id -1 = fewer).
ABLATIONS_FILE = "ablations.safetensors"
ABLATION_TENSORS = {
    "ablation_activations": ("n", "N", "T"),  # the latent's activation where it was removed (0 elsewhere)
    "ablation_delta_logprob": ("n", "N", "T"),  # Δ log p of each actual token given the ones before it
    "ablation_raised_ids": ("n", "A"),  # next tokens whose probability the removal raised most
    "ablation_raised_change": ("n", "A"),  # ... their change, summed over the positions where it was removed
    "ablation_lowered_ids": ("n", "A"),  # ... and lowered most
    "ablation_lowered_change": ("n", "A"),
}
# A file from before the raised and lowered tokens were ranked by probability (by the mean change of
# log-probability, which rare tokens ruled) is not read: its sections are computed on first view.
OLD_ABLATION_TENSORS = ("ablation_raised_values", "ablation_lowered_values")

HARVEST_DTYPES = {  # everything else is float32
    "top_activations": torch.float16, "quantile_activations": torch.float16, "token_ids": torch.int32,
    **{name: torch.int64 for name in ("histogram", "logit_top_ids", "logit_bottom_ids", "logit_histogram",
                                       "neighbour_index", "top_context", "quantile_context", "quantile_position",
                                       "token_id", "token_latent", "token_occurrences",
                                       "ablation_raised_ids", "ablation_lowered_ids")},
}


@dataclass
class Harvest:
    """Per-latent statistics, examples, logit effects, neighbours and explanations of one SAE.

    `tensors` holds every tensor of HARVEST_TENSORS by name (shapes documented there);
    `explanations` one dict per latent:
        {"text": "socket.⟦AF⟧ | ⟦AF_⟧", "patterns": [[id, ...], ...] (last id = the activating
         token), "precision": float | None, "recall": float | None, "f1": float | None,
         "matches": int, "firings": int}   (scores on held-out contexts; None when unscored)
    `info` (harvest.json): version, n_tokens, n_contexts, context_length, top_k, quantile_bins,
    samples_per_bin, seed, excluded_positions, excluded_token_ids, explanation method, ...
    """

    tensors: dict[str, torch.Tensor]
    explanations: list[dict]
    vocab: list[str]  # token id -> readable string
    info: dict
    # token id -> its bytes in hex, for byte-level BPE tokenizers (None for others, and for
    # harvests made before it): a context's characters split over several tokens are put back
    # together when it is loaded (trainer/tokens.py), instead of showing each part as U+FFFD.
    token_bytes: list[str] | None = None
    # ABLATION_TENSORS by name, when the harvest precomputed the ablation sections (else None:
    # the feature page computes each on its first view)
    ablations: dict[str, torch.Tensor] | None = None

    def __getattr__(self, name):  # harvest.density etc.
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @property
    def n_latents(self) -> int:
        return self.tensors["density"].shape[0]


def save_harvest(run_dir: Path, harvest: Harvest) -> None:
    """Write RUN/harvest in a folder beside it, then swap the two in one step (renameat2's exchange;
    two renames where the system lacks it): a process killed at any point leaves the previous
    harvest whole, and a reader never finds the folder missing or half written."""
    run_dir = Path(run_dir)
    out = run_dir / HARVEST_DIR
    recover_harvest(run_dir)
    for leftover in _leftovers(run_dir):  # of harvests killed before their swap
        shutil.rmtree(leftover, ignore_errors=True)
    new = run_dir / f".{HARVEST_DIR}.new-{os.getpid()}"
    new.mkdir()  # not mkdtemp: its 0700 would keep the harvest from other users
    try:
        for file, names in HARVEST_TENSORS.items():
            write_tensors(new / file, {name: harvest.tensors[name].to(HARVEST_DTYPES.get(name, torch.float32)) for name in names})
        write_json(new / "explanations.json", harvest.explanations)
        write_json(new / "vocab.json", harvest.vocab)
        if harvest.token_bytes is not None:
            write_json(new / TOKEN_BYTES_FILE, harvest.token_bytes)
        if harvest.ablations is not None:
            write_tensors(new / ABLATIONS_FILE, {name: harvest.ablations[name].to(HARVEST_DTYPES.get(name, torch.float32))
                                                 for name in ABLATION_TENSORS})
        # harvest.json last: its presence says the harvest is complete.
        write_json(new / "harvest.json", {**harvest.info, "version": HARVEST_VERSION})
        if not out.exists():
            os.replace(new, out)
        elif not _exchange(new, out):  # a kill between these two renames is undone by recover_harvest
            os.replace(out, run_dir / f".{HARVEST_DIR}.old-{os.getpid()}")
            os.replace(new, out)
            new = run_dir / f".{HARVEST_DIR}.old-{os.getpid()}"
    finally:
        shutil.rmtree(new, ignore_errors=True)  # the old harvest after a swap, the unfinished new one after an error


def drop_harvest(run_dir: Path) -> None:
    """Remove RUN/harvest and any harvest left beside it, and the LLM explanations (new weights make
    them all stale): the harvest moved aside first, so that a kill mid-way leaves no half folder
    under its name."""
    run_dir = Path(run_dir)
    if (run_dir / HARVEST_DIR).exists():
        os.replace(run_dir / HARVEST_DIR, run_dir / f".{HARVEST_DIR}.drop-{os.getpid()}")
    for folder in run_dir.glob(f".{HARVEST_DIR}.*"):
        shutil.rmtree(folder, ignore_errors=True)
    drop_llm_explanations(run_dir)  # explanations of the old weights' latents


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    system or the file system cannot, for the caller to fall back on."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE from <fcntl.h> and <stdio.h>
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def _owner_alive(folder: Path) -> bool:
    """Whether the process whose id ends the folder's name (.harvest.new-PID) still runs."""
    try:
        pid = int(folder.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _leftovers(run_dir: Path) -> list[Path]:
    """Folders beside RUN/harvest that no running process is writing."""
    return [folder for folder in Path(run_dir).glob(f".{HARVEST_DIR}.*") if not _owner_alive(folder)]


# ---------------------------------------------------------------- reading


def load_sae_weights(run_dir: Path, cfg: RunConfig | None = None) -> dict[str, torch.Tensor]:
    """The SAE's tensors, checked against cfg.json's shapes."""
    cfg = cfg or RunConfig.load(run_dir)
    path = Path(run_dir) / SAE_FILE
    weights = read_tensors(path, SAE_TENSORS)
    d, n = cfg.d_in, cfg.n_latents
    expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise RunFolderError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, cfg.json says {shape}"
            )
    if bad := [name for name in SAE_TENSORS if not torch.isfinite(weights[name]).all()]:
        raise RunFolderError(f"{path}: {', '.join(bad)} hold NaN or infinite values")
    return {name: weights[name].float() for name in SAE_TENSORS}


def load_sae(run_dir: Path, device: str | torch.device = "cpu") -> tuple[RunConfig, TopKSAE]:
    """The run's config and its SAE, ready for inference."""
    cfg = RunConfig.load(run_dir)
    sae = TopKSAE.from_weights(load_sae_weights(run_dir, cfg), cfg.k)
    return cfg, sae.to(device).eval().requires_grad_(False)


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    return read_json_object(path) if path.exists() else {}


def recover_harvest(run_dir: Path) -> None:
    """Put back a harvest that save_harvest, without renameat2, had moved aside when it was killed
    between its two renames. Only writers call it: a reader putting it back while the writer is
    alive between them would make the writer's second rename fail."""
    out = Path(run_dir) / HARVEST_DIR
    if out.exists():
        return
    for old in Path(run_dir).glob(f".{HARVEST_DIR}.old-*"):
        if (old / "harvest.json").is_file() and not _owner_alive(old):
            os.replace(old, out)
            return


def harvest_is_current(run_dir: Path) -> bool:
    """A complete harvest in this saescope's format (an older one is made again)."""
    path = Path(run_dir) / HARVEST_DIR / "harvest.json"
    try:
        return path.is_file() and read_json_object(path).get("version") == HARVEST_VERSION
    except RunFolderError:
        return False


HARVEST_READ_TRIES = 3


def load_harvest(run_dir: Path, cfg: RunConfig | None = None) -> Harvest:
    """The harvest, with every tensor's shape checked against cfg.json and against each other.

    All of it from one harvest: a harvest swapped in while this reads (save_harvest, from another
    process) would give files of both, so harvest.json's identity is taken before and after the
    read (each save writes a new file), and a read it changed under is done again."""
    cfg = cfg or RunConfig.load(run_dir)
    stamp = Path(run_dir) / HARVEST_DIR / "harvest.json"
    for attempt in range(HARVEST_READ_TRIES):
        before = _file_identity(stamp)
        try:
            harvest = _read_harvest(Path(run_dir), cfg)
        except (RunFolderError, OSError):
            if _file_identity(stamp) == before or attempt == HARVEST_READ_TRIES - 1:
                raise
            continue  # the harvest changed under the read: its error may be the mix
        if _file_identity(stamp) == before:
            return harvest
    raise RunFolderError(f"{stamp.parent}: rewritten {HARVEST_READ_TRIES} times while it was read; try again")


def _file_identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _read_harvest(run_dir: Path, cfg: RunConfig) -> Harvest:
    folder = run_dir / HARVEST_DIR
    if not (folder / "harvest.json").exists():
        raise RunFolderError(f"{run_dir}: not harvested yet (no {HARVEST_DIR}/harvest.json): run `saescope harvest {run_dir}` first")
    info = read_json_object(folder / "harvest.json")
    if info.get("version") != HARVEST_VERSION:
        raise RunFolderError(
            f"{folder / 'harvest.json'}: made by an older saescope (harvest version {info.get('version', 1)}, "
            f"this one reads {HARVEST_VERSION}); run `saescope harvest {run_dir}` again"
        )
    sizes = {"n": cfg.n_latents}
    tensors = {}
    for file, shapes in HARVEST_TENSORS.items():
        found = read_tensors(folder / file, tuple(shapes))
        for name, symbols in shapes.items():
            tensors[name] = found[name]
            _check_shape(folder / file, name, tuple(found[name].shape), symbols, sizes)
    vocab = read_json(folder / "vocab.json")
    explanations = read_json(folder / "explanations.json")
    if not isinstance(explanations, list) or len(explanations) != sizes["n"]:
        raise RunFolderError(f"{folder / 'explanations.json'}: expected a list of {sizes['n']} explanations")
    for name in ("top_context", "quantile_context"):
        if tensors[name].numel() and int(tensors[name].max()) >= sizes["C"]:
            raise RunFolderError(f"{folder / 'examples.safetensors'}: {name} points past the {sizes['C']} contexts")
    for name, file in (("token_ids", "contexts.safetensors"), ("token_id", "tokens.safetensors")):
        if tensors[name].numel() and int(tensors[name].max()) >= len(vocab):
            raise RunFolderError(f"{folder / file}: {name} uses id {int(tensors[name].max())}, vocab.json has {len(vocab)} tokens")
    tensors = {name: t.long() if HARVEST_DTYPES.get(name) in (torch.int64, torch.int32) else t.float()
               for name, t in tensors.items()}
    return Harvest(tensors=tensors, explanations=explanations, vocab=vocab, info=info,
                   token_bytes=_token_bytes(folder, len(vocab)), ablations=_ablations(folder, sizes, len(vocab)))


def _ablations(folder: Path, sizes: dict, n_tokens: int) -> dict[str, torch.Tensor] | None:
    """ablations.safetensors when it is there (it is optional), checked against the harvest's
    latents, context length, top examples and vocabulary."""
    path = folder / ABLATIONS_FILE
    if not path.exists():
        return None
    if _holds_old_ablations(path):
        log.warning("%s ranks raised and lowered tokens the old way: not read (the feature pages compute their "
                    "sections on first view; `saescope harvest --ablation-examples N` makes it anew)", path)
        return None
    found = read_tensors(path, tuple(ABLATION_TENSORS))
    for name, symbols in ABLATION_TENSORS.items():
        _check_shape(path, name, tuple(found[name].shape), symbols, sizes)
    if sizes["N"] > sizes["K"]:
        raise RunFolderError(f"{path}: {sizes['N']} ablated contexts per latent, more than its {sizes['K']} top examples")
    for name in ("ablation_raised_ids", "ablation_lowered_ids"):
        ids = found[name]
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n_tokens):
            raise RunFolderError(f"{path}: {name} holds ids outside -1..{n_tokens - 1}")
    return {name: t.long() if HARVEST_DTYPES.get(name) == torch.int64 else t.float() for name, t in found.items()}


def _holds_old_ablations(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
    except Exception:  # noqa: BLE001: unreadable: read_tensors says so in its own words
        return False
    return bool(names & set(OLD_ABLATION_TENSORS)) and not names & {"ablation_raised_change"}


def _token_bytes(folder: Path, n_tokens: int) -> list[str] | None:
    """token_bytes.json when it is there and matches vocab.json (it is optional)."""
    path = folder / TOKEN_BYTES_FILE
    if not path.exists():
        return None
    found = read_json(path)
    if not isinstance(found, list) or len(found) != n_tokens:
        raise RunFolderError(f"{path}: expected a list of {n_tokens} hex strings, one per vocab.json token")
    return found


def _check_shape(path: Path, name: str, shape: tuple, symbols: tuple, sizes: dict) -> None:
    """Match `shape` against symbols like ("n", "Q+1"); the first tensor to use a symbol fixes it."""
    expected = []
    for axis, symbol in zip(shape, symbols):
        if isinstance(symbol, int):
            expected.append(symbol)
            continue
        base, _, plus = symbol.partition("+")
        sizes.setdefault(base, axis - int(plus or 0))
        expected.append(sizes[base] + int(plus or 0))
    if len(shape) != len(symbols) or tuple(expected) != shape:
        raise RunFolderError(
            f"{path}: {name} has shape {shape}, expected ({', '.join(map(str, symbols))}) = {tuple(expected)}"
            + (f" (cfg.json says {sizes['n']} latents)" if symbols[0] == "n" else "")
        )
