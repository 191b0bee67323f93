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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import explain, runfolder
from trainer.activations import ActivationStore, token_vocab
from trainer.config import HarvestConfig
from trainer.directions import logit_effects, nearest_latents
from trainer.grouping import random_keys, rank_within, sort_within
from trainer.model import LanguageModel, load_language_model
from trainer.sae import TopKSAE, default_device, fast_matmul_dtype

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


def counted_positions(tokens: np.ndarray, exclude_first: int, excluded_ids: list[int]) -> np.ndarray:
    """(C, T) bool: the positions that count in the statistics."""
    counted = ~np.isin(tokens, excluded_ids)
    counted[:, :exclude_first] = False
    return counted


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
        # A stable radix sort of int32 keeps token order within each latent (and PyTorch's default
        # CPU sort is pathological on top-k indices, see trainer/sae.py).
        order = torch.sort(latent.int(), stable=True).indices
        counts = torch.bincount(latent, minlength=n_latents)
        offsets = torch.zeros(n_latents + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        return cls(latent[order], position[order], value[order], counts, offsets)


@torch.no_grad()
def collect_firings(sae: TopKSAE, data: HarvestInput, scale: float, counted: np.ndarray,
                    batch_contexts: int) -> Firings:
    """The streaming pass: each batch's top-k latents, kept where the position counts."""
    T, k = data.context_length, sae.k
    device = sae.W_dec.device
    dtype = fast_matmul_dtype(device)
    counted_flat = torch.from_numpy(counted.reshape(-1))
    latents, positions, values = [], [], []
    with tqdm(total=data.n_contexts * T, desc="harvest", unit="tok", unit_scale=True) as bar:
        for first, x in data.batches(batch_contexts):
            x = x.to(device).flatten(0, 1) * scale  # (N, d), normalised as in training
            chosen = sae.encode_selected(x, dtype)  # (N, k)
            position = torch.arange(first * T, first * T + x.shape[0]).repeat_interleave(k)  # (N k,)
            keep = (chosen.values.flatten().cpu() > 0) & counted_flat[position]
            latents.append(chosen.indices.flatten().cpu()[keep])
            positions.append(position[keep])
            values.append(chosen.values.flatten().cpu()[keep])
            bar.update(x.shape[0])
    return Firings.from_unsorted(torch.cat(latents), torch.cat(positions), torch.cat(values), sae.n_latents)


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


def quantile_edges(firings: Firings, Q: int) -> torch.Tensor:
    """(n, Q + 1) exact quantiles j/Q of each latent's non-zero activations, with linear
    interpolation between order statistics (numpy's default method); zeros for a dead latent."""
    order = sort_within(firings.latent, firings.value)
    ordered = firings.value[order]  # each latent's values, ascending
    counts, offsets = firings.counts, firings.offsets[:-1]
    where = torch.linspace(0, 1, Q + 1)[None, :] * (counts[:, None] - 1).clamp_min(0)  # (n, Q + 1)
    low, fraction = where.floor().long(), where - where.floor()
    high = (low + 1).minimum((counts[:, None] - 1).clamp_min(0))
    if len(ordered) == 0:
        return torch.zeros(len(counts), Q + 1)
    at = lambda i: ordered[(offsets[:, None] + i).clamp_max(len(ordered) - 1)]  # noqa: E731
    edges = at(low) + fraction * (at(high) - at(low))
    return torch.where(counts[:, None] > 0, edges, torch.zeros(()))


def quantile_bins(firings: Firings, edges: torch.Tensor) -> torch.Tensor:
    """(F,) the bin of each firing: bin j holds values in [edge_j, edge_j+1), the last also the max."""
    interior = edges[:, 1:-1]  # (n, Q - 1)
    bins = torch.empty(len(firings.value), dtype=torch.long)
    for start in range(0, len(bins), 1 << 20):  # chunks: (chunk, Q - 1) comparisons at a time
        part = slice(start, start + (1 << 20))
        bins[part] = (firings.value[part, None] >= interior[firings.latent[part]]).sum(1)
    return bins


def quantile_samples(firings: Firings, pairs: Pairs, top: torch.Tensor, bins: torch.Tensor, Q: int, S: int,
                     seed: int) -> torch.Tensor:
    """(n, Q, S) firing ids: for each latent and bin, S firings in distinct contexts, none of them
    a top context. Each context not in the top K takes part with one firing drawn uniformly from
    its firings, in that firing's bin; then S of those are drawn uniformly per bin."""
    n = len(firings.counts)
    generator = torch.Generator().manual_seed(seed)
    is_top = torch.zeros(len(pairs.latent), dtype=torch.bool)
    is_top[top[top >= 0]] = True
    candidates = (~is_top[pairs.of_firing]).nonzero().squeeze(1)  # firing ids
    by_pair = candidates[sort_within(pairs.of_firing[candidates], random_keys(len(candidates), generator))]
    pair_of = pairs.of_firing[by_pair]
    first = torch.ones(len(by_pair), dtype=torch.bool)
    first[1:] = pair_of[1:] != pair_of[:-1]
    chosen = by_pair[first]  # one random firing per (latent, context)
    group = firings.latent[chosen] * Q + bins[chosen]
    chosen = chosen[sort_within(group, random_keys(len(chosen), generator))]
    return slots(firings.latent[chosen] * Q + bins[chosen], chosen, n * Q, S).view(n, Q, S)


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
    """Seconds per stage, recorded in harvest.json (bench/harvest.py reports them)."""

    def __init__(self):
        self.laps, self.last = {}, time.perf_counter()

    def lap(self, name: str) -> dict:
        now = time.perf_counter()
        self.laps[name], self.last = round(now - self.last, 3), now
        return self.laps


def harvest_sae(sae: TopKSAE, data: HarvestInput, scale: float, cfg: HarvestConfig, lm: LanguageModel) -> runfolder.Harvest:
    T, n, Q, S, K = data.context_length, sae.n_latents, cfg.quantile_bins, cfg.samples_per_bin, cfg.top_k
    excluded_ids = lm.special_token_ids if cfg.exclude_special_tokens else []
    counted = counted_positions(data.tokens, cfg.exclude_first, excluded_ids)
    n_tokens = int(counted.sum())
    clock = Stopwatch()
    firings = collect_firings(sae, data, scale, counted, cfg.batch_contexts)
    clock.lap("pass")

    log.info("per-latent statistics over %s firings", f"{len(firings.value):,}")
    tensors = latent_statistics(firings, n_tokens, cfg.histogram_bins)
    pairs = latent_context_pairs(firings, T)
    top = top_pairs(pairs, n, K)  # (n, K)
    edges = quantile_edges(firings, Q)
    bins = quantile_bins(firings, edges)
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
    vocab = data.store.vocab() if data.store is not None else token_vocab(lm.tokenizer)  # the same strings
    vocab += [f"<{i}>" for i in range(len(vocab), lm.unembed.weight.shape[0])]  # rows with no token (padding)
    vocab_size = len(vocab)
    tensors.update(token_search(firings, data.tokens, counted, vocab_size, cfg.token_latents))

    clock.lap("statistics and examples")
    log.info("logit effects and nearest latents")
    W_dec = sae.W_dec.detach()
    tensors.update(logit_effects(W_dec, lm.final_norm or torch.nn.Identity(), lm.unembed, cfg.logit_tokens,
                                 cfg.histogram_bins, dtype=fast_matmul_dtype(W_dec.device)))
    tensors["neighbour_index"], tensors["neighbour_cosine"] = nearest_latents(W_dec, cfg.neighbours)

    clock.lap("logit effects and neighbours")
    log.info("explanations")
    heldout = np.zeros(data.n_contexts, dtype=bool)
    heldout[data.n_contexts - data.n_heldout :] = True
    explanations = explain.explain_latents(
        data.tokens, counted, heldout, firings.latent.numpy(), firings.position.numpy(), firings.value.numpy(),
        n, vocab, n_examples=cfg.explanation_examples,
    )
    info = {
        "n_tokens": n_tokens,
        "n_contexts": data.n_contexts,
        "context_length": T,
        "top_k": K,
        "quantile_bins": Q,
        "samples_per_bin": S,
        "histogram_bins": cfg.histogram_bins,
        "seed": cfg.seed,
        "n_firings": len(firings.value),
        "excluded_positions": list(range(cfg.exclude_first)),
        "excluded_token_ids": excluded_ids,
        "excluded_tokens": [vocab[i] for i in excluded_ids if i < len(vocab)],
        "explanation": explain.METHOD | {"heldout_contexts": data.n_heldout},
        "seconds": clock.lap("explanations"),
    }
    return runfolder.Harvest(tensors=tensors, explanations=explanations, vocab=vocab, info=info)


def store_for_run(run_dir: Path, run_cfg: dict, cfg: HarvestConfig, store_dir: Path | None) -> ActivationStore:
    """The run's activation store; an imported SAE has none, so build one for its model and
    layer (and record it in cfg.json, so that eval finds it too)."""
    if store_dir or run_cfg.get("store"):
        return ActivationStore.open(store_dir or run_cfg["store"])
    from trainer.config import TrainConfig
    from trainer.train import prepare_store

    store_cfg = TrainConfig(
        model=run_cfg["model"], layer=run_cfg["layer"], n_latents=2, k=1, corpus=cfg.corpus,
        tokens=cfg.tokens, heldout_tokens=cfg.context_length * 16, context_length=cfg.context_length,
    )
    store = prepare_store(store_cfg, Path(run_dir) / "activations")
    if store.meta["d_model"] != run_cfg["d_in"]:
        raise runfolder.RunFolderError(
            f"{Path(run_dir) / runfolder.CFG_FILE}: the SAE reads {run_cfg['d_in']}-dim inputs but "
            f"{run_cfg['model']} has d_model {store.meta['d_model']}"
        )
    runfolder.save_cfg(run_dir, {**run_cfg, "store": str(store.path.resolve())})
    return store


def harvest_run(run_dir: Path, cfg: HarvestConfig | None = None, store_dir: Path | None = None,
                from_model: bool = False) -> runfolder.Harvest:
    """Harvest a run folder into RUN/harvest. The activations come from the run's store, or, with
    `from_model`, from the model over the store's contexts (nothing read from disk but tokens)."""
    cfg = cfg or HarvestConfig()
    device = default_device()
    run_cfg, sae = TopKSAE.load(run_dir, device)
    store = store_for_run(run_dir, run_cfg, cfg, store_dir)
    lm = load_language_model(run_cfg["model"], run_cfg["layer"], str(device))
    data = HarvestInput(tokens=store.tokens, n_heldout=int(store.meta.get("n_heldout", 0)),
                        store=None if from_model else store, lm=lm)
    harvest = harvest_sae(sae, data, run_cfg.get("input_scale", 1.0), cfg, lm)
    runfolder.save_harvest(run_dir, harvest)
    return harvest
