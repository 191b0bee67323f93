"""Harvest: everything the dashboards show about each latent, from one streaming pass.

The pass encodes every harvest token once and keeps only what TopK produces: each token's k
(latent, activation) pairs, the *firings* (k/n of the dense activations; 9.6M of them for the
reference task, about 110 MB). Because a TopK latent is exactly zero outside its token's top k,
the firings hold all of the SAE's activations, and everything else is exact arithmetic on them:

    density, mean and max             per latent, over the counted tokens
    histogram                         of the non-zero activations, H bins over (0, max]
    top contexts                      the K contexts with the highest max activation
    quantile examples                 exact quantiles of the non-zero activations, Q bins, S
                                      contexts sampled per bin (seeded, never repeating a context)
    each example's activations        rebuilt from the firings, no second pass over the model
    token search                      per token, the latents with the highest mean activation on it
    explanations                      trainer.explain: token patterns scored on held-out contexts

and from the decoder alone (trainer.directions): logit effects and nearest latents.

Excluded from all statistics by default: the first position of each context (an attention sink
that fires huge activations) and the tokenizer's special tokens (BOS/EOS/document separators).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import explain, runfolder
from trainer.config import HarvestConfig
from trainer.directions import logit_effects, nearest_latents
from trainer.errors import ConfigError, RunFolderError
from trainer.formats import CFG_FILE
from trainer.grouping import group_codes, rank_within, sort_within, spread_within
from trainer.model import LanguageModel
from trainer.progress import progress
from trainer.runconfig import RunConfig
from trainer.sae import InputNorm, TopKSAE, default_device, fast_matmul_dtype
from trainer.store import ActivationStore, Positions, complete_heldout, open_store_for_sae, prepare_store, token_vocab
from trainer.tokens import vocab_bytes

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the inputs


@dataclass
class HarvestInput:
    """The contexts to harvest and where their activations come from (a store or the model)."""

    tokens: np.ndarray  # (C, T) token ids
    n_heldout: int  # the last contexts: explanations are scored on them, never found on them
    store: ActivationStore | None = None
    lm: LanguageModel | None = None

    @property
    def n_contexts(self) -> int:
        return self.tokens.shape[0]

    @property
    def context_length(self) -> int:
        return self.tokens.shape[1]

    def batches(self, batch_contexts: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first context, activations (B, T, d)) in context order."""
        for first in range(0, self.n_contexts, batch_contexts):
            last = min(first + batch_contexts, self.n_contexts)
            if self.store is not None:
                x = self.store.rows(first, last).view(last - first, self.context_length, -1)
                self.store.release(first, last)  # read once: its pages need not stay in this process
                yield first, x
            else:
                yield first, self.lm.residual(torch.from_numpy(self.tokens[first:last]).long())


# ---------------------------------------------------------------- the firings


@dataclass
class Firings:
    """Every non-zero activation of the harvest, sorted by latent, then by token position."""

    latent: torch.Tensor  # (F,) int64
    position: torch.Tensor  # (F,) int64: context * T + t
    value: torch.Tensor  # (F,) float32, > 0
    counts: torch.Tensor  # (n,) firings per latent
    offsets: torch.Tensor  # (n + 1,) latent l's firings are [offsets[l], offsets[l + 1])

    @classmethod
    def from_unsorted(cls, latent, position, value, n_latents: int) -> "Firings":
        return cls.from_runs([sort_run(latent, position, value)], n_latents)

    @classmethod
    def from_runs(cls, runs: list[tuple[torch.Tensor, ...]], n_latents: int) -> "Firings":
        """Merge runs of firings, each sorted by latent (see sort_run), the runs in position
        order. Each run's piece of each latent goes to its place in one scatter whose writes come
        in contiguous pieces: about 3x faster here than permuting all firings at random."""
        per_run = torch.stack([torch.bincount(run[0], minlength=n_latents) for run in runs])  # (R, n)
        counts = per_run.sum(0)
        offsets = torch.zeros(n_latents + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        # Latent l's piece of run r starts at offsets[l] + (its firings in earlier runs) in the
        # output, and at (firings of smaller latents in run r) within the run.
        shift = (offsets[:-1] + per_run.cumsum(0) - per_run) - (per_run.cumsum(1) - per_run)  # (R, n)
        latent = torch.cat([run[0] for run in runs]).long()
        sizes = torch.tensor([len(run[0]) for run in runs])
        which = torch.arange(len(runs)).repeat_interleave(sizes)
        dest = shift.flatten()[which * n_latents + latent] + torch.arange(len(latent)) - (sizes.cumsum(0) - sizes)[which]

        def place(column: int) -> torch.Tensor:
            values = torch.cat([run[column] for run in runs])
            placed = torch.empty_like(values)
            placed[dest] = values
            return placed

        return cls(torch.arange(n_latents).repeat_interleave(counts), place(1), place(2), counts, offsets)


def sort_run(latent: torch.Tensor, position: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Firings sorted by latent, keeping their order within a latent: a stable radix sort of int32
    (PyTorch's default CPU sort is pathological on top-k indices, see trainer/sae.py)."""
    latent, order = torch.sort(latent.int(), stable=True)
    return latent, position[order], value[order]


@dataclass
class ByValue:
    """The firings ordered by latent, then by ascending value: the order, and the sorted codes
    (latent << 31 | the value's bits), from which the values in that order are read for free."""

    order: torch.Tensor  # (F,) firing ids
    codes: torch.Tensor  # (F,) int64, ascending

    @classmethod
    def of(cls, firings: "Firings") -> "ByValue":
        codes, order = torch.sort(group_codes(firings.latent, firings.value), stable=True)
        return cls(order, codes)

    @property
    def values(self) -> torch.Tensor:
        return (self.codes & (2**31 - 1)).int().view(torch.float32)


# Rows encoded at once: their (rows, n) bf16 pre-activations (16 MiB at n = 4,096) stay in cache
# from the matmul to the top-k; 15 % faster here than 4,096 rows.
ENCODE_ROWS = 2048


@torch.no_grad()
def collect_firings(sae: TopKSAE, data: HarvestInput, norm: InputNorm, counted: np.ndarray,
                    batch_contexts: int) -> Firings:
    """The streaming pass: each token's top k (latent, value), kept where positive and counted,
    sorted by latent in runs of a few hundred thousand firings (cheap while they are in cache)."""
    T, k = data.context_length, sae.k
    device = sae.W_dec.device
    dtype = fast_matmul_dtype(device)
    counted_rows = torch.from_numpy(counted.reshape(-1, 1))
    run_size = max(2**18, 16 * sae.n_latents)  # (runs x latents) stays a small table
    runs, pending, pending_firings = [], [], 0

    def close_run():
        nonlocal pending_firings
        runs.append(sort_run(*(torch.cat(column) for column in zip(*pending))))
        pending.clear()
        pending_firings = 0

    with progress(total=data.n_contexts * T, desc="harvest", unit="tok", unit_scale=True) as bar:
        for first, x in data.batches(batch_contexts):
            x, _ = norm.normalize(x.to(device).flatten(0, 1))  # (N, d), normalised as in training
            for offset in range(0, x.shape[0], ENCODE_ROWS):
                chosen = sae.encode_selected(x[offset : offset + ENCODE_ROWS], dtype)  # (rows, k)
                row = first * T + offset
                values, latents = chosen.values.cpu(), chosen.indices.cpu()
                keep = ((values > 0) & counted_rows[row : row + len(values)]).view(-1).nonzero().squeeze(1)
                pending.append((latents.view(-1)[keep], row + keep // k, values.view(-1)[keep]))
                pending_firings += len(keep)
                if pending_firings >= run_size:
                    close_run()
            bar.update(x.shape[0])
    if pending:
        close_run()
    return Firings.from_runs(runs, sae.n_latents)


# ---------------------------------------------------------------- per-latent statistics


def latent_statistics(firings: Firings, n_tokens: int, bins: int) -> dict[str, torch.Tensor]:
    n = len(firings.counts)
    sums = torch.zeros(n).index_add_(0, firings.latent, firings.value)
    max_activation = torch.zeros(n).scatter_reduce_(0, firings.latent, firings.value, "amax")
    # Bin b of latent l covers [b, b + 1) * max_l / H; the max itself goes into the last bin.
    which = (firings.value / max_activation[firings.latent] * bins).long().clamp_(max=bins - 1)
    histogram = torch.bincount(firings.latent * bins + which, minlength=n * bins).view(n, bins)
    return {
        "density": firings.counts / n_tokens,
        "max_activation": max_activation,
        "mean_activation": sums / firings.counts.clamp_min(1),
        "histogram": histogram,
    }


@dataclass
class Pairs:
    """(latent, context) pairs where the latent fires, in the order of the firings."""

    latent: torch.Tensor  # (P,)
    context: torch.Tensor  # (P,)
    max: torch.Tensor  # (P,) the latent's max activation in the context
    start: torch.Tensor  # (P,) first firing of the pair
    length: torch.Tensor  # (P,) number of firings
    of_firing: torch.Tensor  # (F,) each firing's pair


def latent_context_pairs(firings: Firings, T: int) -> Pairs:
    context = firings.position // T
    new = torch.ones(len(context), dtype=torch.bool)
    new[1:] = (context[1:] != context[:-1]) | (firings.latent[1:] != firings.latent[:-1])
    of_firing = new.cumsum(0) - 1
    start = new.nonzero().squeeze(1)
    length = torch.diff(start, append=torch.tensor([len(context)]))
    pair_max = torch.zeros(len(start)).scatter_reduce_(0, of_firing, firings.value, "amax")
    return Pairs(firings.latent[start], context[start], pair_max, start, length, of_firing)


def slots(groups: torch.Tensor, items: torch.Tensor, n_groups: int, per_group: int) -> torch.Tensor:
    """(n_groups, per_group) table of `items` (already ordered within groups), -1 where empty."""
    rank = rank_within(groups, n_groups)
    keep = rank < per_group
    table = torch.full((n_groups, per_group), -1, dtype=torch.long)
    table[groups[keep], rank[keep]] = items[keep]
    return table


def top_pairs(pairs: Pairs, n: int, K: int) -> torch.Tensor:
    """(n, K) pair ids of each latent's top contexts by max activation, -1 = empty."""
    order = sort_within(pairs.latent, pairs.max, descending=True)
    return slots(pairs.latent[order], order, n, K)


def quantile_edges(firings: Firings, Q: int, by_value: ByValue | None = None) -> torch.Tensor:
    """(n, Q + 1) exact quantiles j/Q of each latent's non-zero activations, with linear
    interpolation between order statistics (numpy's default method); zeros for a dead latent."""
    ordered = (by_value or ByValue.of(firings)).values  # each latent's values, ascending
    counts, offsets = firings.counts, firings.offsets[:-1]
    where = torch.linspace(0, 1, Q + 1)[None, :] * (counts[:, None] - 1).clamp_min(0)  # (n, Q + 1)
    low, fraction = where.floor().long(), where - where.floor()
    high = (low + 1).minimum((counts[:, None] - 1).clamp_min(0))
    if len(ordered) == 0:
        return torch.zeros(len(counts), Q + 1)
    at = lambda i: ordered[(offsets[:, None] + i).clamp_max(len(ordered) - 1)]  # noqa: E731
    edges = at(low) + fraction * (at(high) - at(low))
    return torch.where(counts[:, None] > 0, edges, torch.zeros(()))


def quantile_bins(firings: Firings, edges: torch.Tensor, by_value: ByValue | None = None) -> torch.Tensor:
    """(F,) the bin of each firing: bin j holds values in [edge_j, edge_j+1), the last also the max.
    In value order each latent's bins only step up: one binary search per interior edge (in the
    sorted codes) finds where, and a running sum of +1 there and -1 at the end of the latent's
    firings numbers them."""
    by_value = by_value or ByValue.of(firings)
    n, Q = edges.shape[0], edges.shape[1] - 1
    latents = torch.arange(n).repeat_interleave(Q - 1)
    starts = torch.searchsorted(by_value.codes, group_codes(latents, edges[:, 1:-1].clamp_min(0).flatten()))
    steps = torch.zeros(len(by_value.codes) + 1, dtype=torch.long)
    steps.index_add_(0, starts, torch.ones_like(starts))
    steps.index_add_(0, firings.offsets[1:][latents], -torch.ones_like(starts))
    bins = torch.empty(len(by_value.codes), dtype=torch.long)
    bins[by_value.order] = steps.cumsum(0)[:-1]
    return bins


def quantile_samples(firings: Firings, pairs: Pairs, top: torch.Tensor, bins: torch.Tensor, Q: int, S: int,
                     seed: int) -> torch.Tensor:
    """(n, Q, S) firing ids: for each latent and bin, S firings in distinct contexts, none of them
    a top context. Each context not in the top K takes part with one firing drawn uniformly from
    its firings, in that firing's bin; then S of those per bin, spread evenly over the bin's
    contexts from a random offset."""
    n = len(firings.counts)
    generator = torch.Generator().manual_seed(seed)
    is_top = torch.zeros(len(pairs.latent), dtype=torch.bool)
    is_top[top[top >= 0]] = True
    other = (~is_top).nonzero().squeeze(1)  # pair ids; a pair's firings are contiguous
    draw = (torch.rand(len(other), generator=generator, dtype=torch.float64) * pairs.length[other]).long()
    chosen = pairs.start[other] + draw.minimum(pairs.length[other] - 1)  # one firing per (latent, context)
    group = firings.latent[chosen] * Q + bins[chosen]
    chosen = chosen[torch.sort(group.int(), stable=True).indices]  # by bin, contexts in order
    picks, which, rank = spread_within(torch.bincount(group, minlength=n * Q), S, generator)
    table = torch.full((n * Q, S), -1, dtype=torch.long)
    table[which, rank] = chosen[picks]
    return table.view(n, Q, S)


def example_activations(firings: Firings, pairs: Pairs, pair_ids: torch.Tensor, T: int) -> torch.Tensor:
    """(E, T) the latent's activation on every token of each example's context, rebuilt from the
    firings (exact: a TopK latent is zero wherever it is not among the token's top k). An empty
    slot (-1) stays all zeros."""
    lengths = torch.where(pair_ids >= 0, pairs.length[pair_ids.clamp_min(0)], 0)
    pair_ids = pair_ids.clamp_min(0)
    example = torch.arange(len(pair_ids)).repeat_interleave(lengths)
    ends = lengths.cumsum(0)
    within = torch.arange(int(ends[-1]) if len(ends) else 0) - (ends - lengths).repeat_interleave(lengths)
    firing = pairs.start[pair_ids].repeat_interleave(lengths) + within
    out = torch.zeros(len(pair_ids), T)
    out[example, firings.position[firing] % T] = firings.value[firing]
    return out


def token_search(firings: Firings, tokens: np.ndarray, counted: np.ndarray, vocab_size: int,
                 per_token: int) -> dict[str, torch.Tensor]:
    """For each token that occurs, the `per_token` latents with the highest mean activation over
    all its (counted) occurrences: "which latents fire most on ` def`"."""
    n = len(firings.counts)
    flat = torch.from_numpy(tokens.reshape(-1)).long()
    occurrences = torch.bincount(flat[torch.from_numpy(counted.reshape(-1))], minlength=vocab_size)
    key = flat[firings.position] * n + firings.latent
    unique, inverse, fires = torch.unique(key, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(unique)).index_add_(0, inverse, firings.value)
    token, latent = unique // n, unique % n
    mean = sums / occurrences[token]
    order = sort_within(token, mean, descending=True)
    keep = order[rank_within(token[order], vocab_size) < per_token]
    return {
        "token_id": token[keep], "token_latent": latent[keep], "token_mean_activation": mean[keep],
        "token_fire_rate": fires[keep] / occurrences[token[keep]], "token_occurrences": occurrences[token[keep]],
    }


# ---------------------------------------------------------------- the whole harvest


class Stopwatch:
    """Seconds of a stage, recorded in harvest.json (bench/harvest.py reports them)."""

    def __init__(self, laps: dict, name: str):
        self.laps, self.name = laps, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.laps[self.name] = round(time.perf_counter() - self.start, 3)


def harvest_vocab(data: HarvestInput, lm: LanguageModel) -> list[str]:
    vocab = data.store.vocab() if data.store is not None else token_vocab(lm.tokenizer)  # the same strings
    return vocab + [f"<{i}>" for i in range(len(vocab), lm.unembed.weight.shape[0])]  # rows with no token (padding)


def harvest_token_bytes(vocab: list[str], lm: LanguageModel) -> list[str] | None:
    """Every vocab id's bytes in hex (tokens.vocab_bytes), the padding rows' names as their own."""
    raw = vocab_bytes(lm.tokenizer, len(lm.tokenizer))
    return None if raw is None else raw + [text.encode().hex() for text in vocab[len(raw):]]


def statistics_and_examples(firings: Firings, by_value: ByValue, data: HarvestInput, counted: np.ndarray,
                            n_tokens: int, vocab_size: int, cfg: HarvestConfig) -> dict[str, torch.Tensor]:
    T, n, Q, S, K = data.context_length, len(firings.counts), cfg.quantile_bins, cfg.samples_per_bin, cfg.top_k
    tensors = latent_statistics(firings, n_tokens, cfg.histogram_bins)
    pairs = latent_context_pairs(firings, T)
    top = top_pairs(pairs, n, K)  # (n, K)
    edges = quantile_edges(firings, Q, by_value)
    bins = quantile_bins(firings, edges, by_value)
    share = torch.bincount(firings.latent * Q + bins, minlength=n * Q).view(n, Q) / firings.counts.clamp_min(1)[:, None]
    sampled = quantile_samples(firings, pairs, top, bins, Q, S, cfg.seed)  # (n, Q, S) firing ids
    sampled_pairs = torch.where(sampled >= 0, pairs.of_firing[sampled.clamp_min(0)], -1)

    # Store each context once: renumber the contexts that some example shows.
    example_pairs = torch.cat([top.flatten(), sampled_pairs.flatten()])
    used = pairs.context[example_pairs[example_pairs >= 0]].unique()
    remap = torch.full((data.n_contexts,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))

    def context_of(pair_ids):
        return torch.where(pair_ids >= 0, remap[pairs.context[pair_ids.clamp_min(0)]], -1)

    activations = example_activations(firings, pairs, example_pairs, T)  # (n K + n Q S, T)
    tensors.update(
        top_context=context_of(top),
        top_activations=activations[: n * K].view(n, K, T),
        top_max=torch.where(top >= 0, pairs.max[top.clamp_min(0)], torch.zeros(())),
        quantile_edges=edges,
        quantile_share=share,
        quantile_context=context_of(sampled_pairs),
        quantile_activations=activations[n * K :].view(n, Q, S, T),
        quantile_value=torch.where(sampled >= 0, firings.value[sampled.clamp_min(0)], torch.zeros(())),
        quantile_position=torch.where(sampled >= 0, firings.position[sampled.clamp_min(0)] % T, -1),
        token_ids=torch.from_numpy(data.tokens[used.numpy()]).int(),
    )
    tensors.update(token_search(firings, data.tokens, counted, vocab_size, cfg.token_latents))
    return tensors


def decoder_directions(sae: TopKSAE, lm: LanguageModel, cfg: HarvestConfig) -> dict[str, torch.Tensor]:
    W_dec = sae.W_dec.detach()
    tensors = logit_effects(W_dec, lm.final_norm or torch.nn.Identity(), lm.unembed, cfg.logit_tokens,
                            cfg.histogram_bins, dtype=fast_matmul_dtype(W_dec.device))
    tensors["neighbour_index"], tensors["neighbour_cosine"] = nearest_latents(W_dec, cfg.neighbours)
    return tensors


def timed(laps: dict, name: str, fn, *args, **kwargs):
    with Stopwatch(laps, name):
        return fn(*args, **kwargs)


def harvest_sae(sae: TopKSAE, data: HarvestInput, norm: InputNorm | float, cfg: HarvestConfig, lm: LanguageModel,
                positions: Positions = Positions()) -> runfolder.Harvest:
    T, n = data.context_length, sae.n_latents
    excluded_ids = lm.special_token_ids if positions.exclude_special_tokens else []
    counted = positions.mask(data.tokens, excluded_ids)
    n_tokens = int(counted.sum())
    seconds: dict[str, float] = {}
    norm = norm if isinstance(norm, InputNorm) else InputNorm("scale", norm)
    firings = timed(seconds, "pass", collect_firings, sae, data, norm, counted, cfg.batch_contexts)

    log.info("statistics, examples, logit effects and explanations over %s firings", f"{len(firings.value):,}")
    with Stopwatch(seconds, "after the pass (the three stages below, at once)"):
        by_value = ByValue.of(firings)  # shared by the quantiles and the explanations
        vocab = harvest_vocab(data, lm)
        token_bytes = harvest_token_bytes(vocab, lm)
        heldout = np.zeros(data.n_contexts, dtype=bool)
        heldout[data.n_contexts - data.n_heldout :] = True
        # Three independent stages in threads: the sorts and gathers of the statistics, the numpy
        # of the explanations and the matmuls of the logit effects each keep about one core busy.
        with ThreadPoolExecutor(max_workers=2) as pool:
            directions = pool.submit(timed, seconds, "logit effects and neighbours", decoder_directions, sae, lm, cfg)
            explanations = pool.submit(
                timed, seconds, "explanations", explain.explain_latents, data.tokens, counted, heldout,
                firings.latent.numpy(), firings.position.numpy(), firings.value.numpy(), n, vocab,
                n_examples=cfg.explanation_examples, seed=cfg.seed, by_value=by_value.order.numpy(),
                token_bytes=token_bytes,
            )
            tensors = timed(seconds, "statistics and examples", statistics_and_examples, firings, by_value, data,
                            counted, n_tokens, len(vocab), cfg)
            tensors.update(directions.result())
            explanations = explanations.result()
    info = {
        "n_tokens": n_tokens,
        "n_contexts": data.n_contexts,
        "context_length": T,
        "top_k": cfg.top_k,
        "quantile_bins": cfg.quantile_bins,
        "samples_per_bin": cfg.samples_per_bin,
        "histogram_bins": cfg.histogram_bins,
        "seed": cfg.seed,
        "n_firings": len(firings.value),
        "excluded_positions": list(range(positions.exclude_first)),
        "excluded_token_ids": excluded_ids,
        "excluded_tokens": [vocab[i] for i in excluded_ids if i < len(vocab)],
        "explanation": explain.METHOD | {"heldout_contexts": data.n_heldout},
        "seconds": seconds,
    }
    return runfolder.Harvest(tensors=tensors, explanations=explanations, vocab=vocab, info=info,
                             token_bytes=token_bytes)


def store_for_run(run_dir: Path, run_cfg: RunConfig, cfg: HarvestConfig, store_dir: Path | None) -> tuple[RunConfig, ActivationStore]:
    """The run's activation store; an imported SAE has none, so build one for its model and
    layer, or take --store's. Either is recorded in cfg.json (eval finds it there), but only once
    every check has passed: a harvest that fails leaves the run as it was."""
    if store_dir := store_dir or run_cfg.store_dir(run_dir):
        store = open_store_for_sae(store_dir, run_cfg, run_dir)
        check_exclude_first(run_cfg.positions.exclude_first, store.context_length)
        if run_cfg.store is None:
            run_cfg = run_cfg.with_store(store.path, run_dir)
            run_cfg.save(run_dir)
        return run_cfg, store
    check_exclude_first(run_cfg.positions.exclude_first, cfg.context_length)
    where = Path(run_dir) / CFG_FILE
    run_cfg.check_model(where)  # the layer and width, before minutes of forward passes
    store = prepare_store(cfg.store_config(run_cfg.model, run_cfg.layer), Path(run_dir) / "activations")
    if store.meta["d_model"] != run_cfg.d_in:  # a model whose config was not here before
        raise RunFolderError(f"{where}: the SAE reads {run_cfg.d_in}-wide activations, '{run_cfg.model}' has "
                             f"d_model {store.meta['d_model']}")
    run_cfg = run_cfg.with_store(store.path, run_dir)
    run_cfg.save(run_dir)
    return run_cfg, store


def check_exclude_first(exclude_first: int, context_length: int) -> None:
    if exclude_first >= context_length:
        raise ConfigError(f"the run's --exclude-first {exclude_first} leaves out every position of the store's "
                          f"{context_length}-token contexts")


def harvest_run(run_dir: Path, cfg: HarvestConfig | None = None, store_dir: Path | None = None,
                from_model: bool = False) -> runfolder.Harvest:
    """Harvest a run folder into RUN/harvest. The activations come from the run's store, or, with
    `from_model`, from the model over the store's contexts (nothing read from disk but tokens)."""
    cfg = cfg or HarvestConfig()
    device = default_device()
    run_cfg, sae = runfolder.load_sae(run_dir, device)
    run_cfg, store = store_for_run(run_dir, run_cfg, cfg, store_dir)
    lm = run_cfg.language_model(device)
    if not from_model:
        store = complete_heldout(store, lm)
    data = HarvestInput(tokens=store.tokens, n_heldout=int(store.meta.get("n_heldout", 0)),
                        store=None if from_model else store, lm=lm)
    harvest = harvest_sae(sae, data, run_cfg.norm, cfg, lm, run_cfg.positions)
    if cfg.ablation_examples:
        add_ablation_sections(Path(run_dir), harvest, sae, lm, run_cfg, cfg)
    runfolder.save_harvest(run_dir, harvest)
    return harvest


def add_ablation_sections(run_dir: Path, harvest: runfolder.Harvest, sae: TopKSAE, lm: LanguageModel,
                          run_cfg: RunConfig, cfg: HarvestConfig) -> None:
    """Every latent's feature-page ablation section over its first `cfg.ablation_examples` top
    contexts (trainer.ablation_harvest), computed as the page computes it: the same model
    precision, SAE selection and left-out first positions."""
    from trainer.ablation_harvest import CHECKPOINT_DIR, ablation_sections
    from trainer.interventions import LatentReader

    log.info("ablation sections over each latent's first %d top examples", cfg.ablation_examples)
    began = time.perf_counter()
    reader = LatentReader(sae, run_cfg.norm, run_cfg.fast_matmul)
    harvest.ablations = ablation_sections(lm, reader, harvest.token_ids.numpy(), harvest.top_context.numpy(),
                                          cfg.ablation_examples, run_cfg.positions.exclude_first, cfg.batch_contexts,
                                          checkpoint=run_dir / CHECKPOINT_DIR)
    harvest.info["ablation_examples"] = cfg.ablation_examples
    harvest.info["seconds"]["ablation sections"] = round(time.perf_counter() - began, 3)
