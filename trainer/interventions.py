"""Interventions: what the model does when a latent is turned up, clamped or removed.

Three uses of one mechanism, an edit of the residual stream at the SAE's hookpoint while the whole
model runs (every block and the LM head; `LoadedModel.editing`, per thread, so the probe sharing
the model never sees it):

- **steering** (`generate` with a `Steering`): generation with a KV cache, greedy or seeded
  sampling, with the residual stream at every position of the prompt and of the new tokens edited:
    add:   x + Σ_i strength_i · max_activation(i) · W_dec[i]
    clamp: x + Σ_i (v_i − z_i(x)) · W_dec[i],   v_i = strength_i · max_activation(i)
  (z_i(x) the latent's SAE activation there; the SAE's error term is kept). Strength 1 is the
  latent's strongest firing in the harvest in both modes. W_dec lives in the SAE's normalised
  space: a vector there is mapped back to the residual stream as a reconstruction is (÷ the
  input scale, or × the token's deviation for per-token normalisation).
- **ablation effects** (`ablation_effects`, `Ablator`): a latent's activation set to 0 where it
  fires (error term kept), and the change in the log-probability of each actual next token, plus
  the next tokens most raised and lowered, over a few contexts (the feature page's section; every
  latent's in trainer.ablation_harvest). Here the model runs whole once per context, and with the
  latent removed only from the hookpoint on (`LoadedModel.capturing` and `resume`, per thread).
- **ablation sparsity** (`ablation_sparsity`), the paper's fourth metric (Gao et al. 2024,
  Section 4.5): how concentrated the change in logits is when one latent is removed at one
  position, against random directions of the same norm.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.errors import ConfigError
from trainer.model import Captured, LanguageModel
from trainer.sae import InputNorm, TopKSAE, fast_matmul_dtype

MODES = ("add", "clamp")
MAX_LATENTS = 8  # steered at once
MAX_NEW_TOKENS = 128
MAX_STRENGTH = 100.0  # |strength|, in multiples of the latent's max activation, both modes
MAX_TEMPERATURE = 5.0


# ---------------------------------------------------------------- what to steer


@dataclass(frozen=True)
class Steering:
    """Latents to steer, each with a strength (a multiple of its max activation in the harvest)."""

    mode: str
    latents: tuple[int, ...]
    strengths: tuple[float, ...]
    max_activations: tuple[float, ...]  # each latent's, from the harvest

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= len(self.latents) <= MAX_LATENTS:
            raise ConfigError(f"steer 1 to {MAX_LATENTS} latents at once, got {len(self.latents)}")
        if len(set(self.latents)) != len(self.latents):
            raise ConfigError("each latent may be steered once")
        if len(self.strengths) != len(self.latents) or len(self.max_activations) != len(self.latents):
            raise ConfigError("one strength and one max activation per latent")
        for latent, strength in zip(self.latents, self.strengths):
            if not (np.isfinite(strength) and abs(strength) <= MAX_STRENGTH):
                raise ConfigError(f"latent {latent}: strength must be between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} "
                                  f"(times its max activation), got {strength:g}")

    @property
    def amounts(self) -> torch.Tensor:
        """(m,) strength × max activation: what add adds along W_dec[i], what clamp sets z_i to."""
        return torch.tensor([s * m for s, m in zip(self.strengths, self.max_activations)], dtype=torch.float32)


def to_residual(norm: InputNorm, stats, delta_n: torch.Tensor) -> torch.Tensor:
    """A change in the SAE's normalised space (N, d) -> the same change in the residual stream."""
    if norm.kind == "scale":
        return delta_n / norm.scale
    _, std = stats
    return delta_n * std


class LatentReader:
    """The SAE read at the hookpoint: the activation of chosen latents at every position, as the
    harvest and the probe compute them (top k chosen in the fast dtype, values exact in fp32)."""

    def __init__(self, sae: TopKSAE, norm: InputNorm, fast: bool = True):
        self.sae, self.norm = sae, norm
        self.dtype = fast_matmul_dtype(sae.W_dec.device, fast)

    def activations(self, rows: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """(N, d) residual rows -> (N, m) activations of `latents` (m,), and the norm's stats."""
        x_n, stats = self.norm.normalize(rows.float())
        chosen = self.sae.encode_selected(x_n, self.dtype)  # (N, k)
        hit = chosen.indices[:, :, None] == latents[None, None, :]  # (N, k, m)
        return (chosen.values[:, :, None] * hit).sum(1), stats  # (N, m)

    def stats(self, rows: torch.Tensor):
        return None if self.norm.kind == "scale" else self.norm.normalize(rows.float())[1]


def steering_edit(reader: LatentReader, steering: Steering, record: list | None = None):
    """The residual stream's edit for `steering`: (B, T, d) -> (B, T, d). With `record`, each call
    appends the steered latents' activations on the edited stream ((B·T, m), as the SAE reads it)."""
    latents = torch.tensor(steering.latents, dtype=torch.long)
    amounts = steering.amounts  # (m,)
    W = reader.sae.W_dec.detach()[latents].float()  # (m, d)

    def edit(resid: torch.Tensor) -> torch.Tensor:
        rows = resid.reshape(-1, resid.shape[-1])  # (N, d)
        if steering.mode == "add":
            stats = reader.stats(rows)
            delta_n = (amounts @ W).expand_as(rows)  # (N, d): Σ strength·max·W_dec[i]
        else:
            z, stats = reader.activations(rows, latents)  # (N, m)
            delta_n = (amounts[None, :] - z) @ W  # Σ (v_i − z_i(x))·W_dec[i]; the error term stays
        edited = rows + to_residual(reader.norm, stats, delta_n).to(rows.dtype)
        if record is not None:
            record.append(reader.activations(edited, latents)[0])
        return edited.view_as(resid)

    return edit


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # the new tokens
    step_seconds: list[float] = field(default_factory=list)  # the time of each new token
    # the steered latents' activations on every token, prompt and new (T, m); None unsteered
    activations: np.ndarray | None = None


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else a draw from the softmax at `temperature`, kept to the smallest
    set of tokens whose probability reaches `top_p` (nucleus sampling), from the seeded `generator`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(lm: LanguageModel, prompt_ids: list[int], n_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, steering: Steering | None = None, reader: LatentReader | None = None,
             stop_ids: tuple[int, ...] = ()) -> Generation:
    """`n_tokens` new tokens after `prompt_ids` (fewer when a `stop_ids` token comes), the whole
    model with a KV cache: each new token costs one position's forward. The same arguments give
    the same tokens (the sampler has its own seeded generator); with `steering` (and its
    `reader`), every position's residual stream at the hookpoint is edited."""
    if not 1 <= n_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"generate 1 to {MAX_NEW_TOKENS} new tokens, got {n_tokens}")
    if not prompt_ids:
        raise ConfigError("the prompt has no tokens")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise ConfigError(f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature:g}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top-p must be more than 0 and at most 1, got {top_p:g}")
    loaded = lm.loaded
    generator = torch.Generator().manual_seed(seed)
    record: list | None = [] if steering is not None else None
    editing = loaded.editing(lm.layer, steering_edit(reader, steering, record)) if steering is not None else nullcontext()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=lm.device)  # (1, T)
    cache, new, seconds = kv_cache(loaded.base), [], []
    with editing:
        for _ in range(n_tokens):
            began = time.perf_counter()
            token = next_token(last_logits(lm, ids, cache).cpu(), temperature, top_p, generator)
            seconds.append(time.perf_counter() - began)
            new.append(token)
            if token in stop_ids:
                break
            ids = torch.tensor([[token]], dtype=torch.long, device=lm.device)
        if record is not None:  # the last token's own activations: one more position through the blocks
            with loaded.autocast():
                loaded.base(input_ids=torch.tensor([[new[-1]]], device=lm.device), use_cache=True, **cache)
    activations = torch.cat(record).cpu().numpy() if record is not None else None
    return Generation(list(prompt_ids), new, seconds, activations)


def last_logits(lm: LanguageModel, input_ids: torch.Tensor, cache: dict) -> torch.Tensor:
    """The next-token logits (V,) after `input_ids` (1, T), the KV `cache` extended in place: the
    blocks in the model's precision (autocast), then the LM head in fp32 on the last position
    alone. Under autocast the head's fp32 weight would be cast to bf16 on every call, 40 % of a
    new token's time for SmolLM2 on a CPU, and the logits of the prompt's other positions are
    never read. (A head that scales or caps its logits, as Gemma's does, is not modelled.)"""
    with lm.loaded.autocast():
        hidden = lm.loaded.base(input_ids=input_ids, use_cache=True, **cache).last_hidden_state[:, -1]  # (1, d)
    return lm.logits(hidden.float())[0]


def kv_cache(model) -> dict:
    """A fresh KV cache as the model's forward takes it (transformers 5 renamed past_key_values
    to cache)."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers 4: made empty
        cache = DynamicCache()
    return {name: cache}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class SteeredPair:
    """The same prompt continued twice with the same sampler: as the model does, and steered."""

    default: Generation
    steered: Generation

    @property
    def divergence(self) -> int | None:
        return first_divergence(self.default.token_ids, self.steered.token_ids)


def steer(lm: LanguageModel, reader: LatentReader, prompt_ids: list[int], steering: Steering, n_tokens: int = 32,
          temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> SteeredPair:
    """The default and the steered continuation of `prompt_ids` (the end-of-text token stops both)."""
    stop = tuple(t for t in (lm.tokenizer.eos_token_id,) if t is not None)
    same = dict(n_tokens=n_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop)
    return SteeredPair(generate(lm, prompt_ids, **same), generate(lm, prompt_ids, steering=steering, reader=reader, **same))


def parse_latents(specs: list[str]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """["INDEX=STRENGTH", ...] (or INDEX:STRENGTH, as the web's `latents` parameter) -> latents, strengths."""
    latents, strengths = [], []
    for spec in specs:
        index, sep, strength = spec.replace(":", "=").partition("=")
        try:
            latents.append(int(index))
            strengths.append(float(strength) if sep else 1.0)
        except ValueError:
            raise ConfigError(f"a steered latent is INDEX=STRENGTH (e.g. 123=4), got {spec!r}") from None
    return tuple(latents), tuple(strengths)


def steer_run(run_dir, prompt: str, specs: list[str], mode: str = "add", n_tokens: int = 32, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0, device: str | None = None) -> tuple[LanguageModel, SteeredPair]:
    """`saescope steer`: a run folder's SAE and model, the latents' max activations from its harvest."""
    from trainer.runfolder import load_harvest, load_sae

    cfg, sae = load_sae(run_dir, device or "cpu")
    latents, strengths = parse_latents(specs)
    if bad := [i for i in latents if not 0 <= i < sae.n_latents]:
        raise ConfigError(f"latent {bad[0]} does not exist: the SAE has latents 0..{sae.n_latents - 1}")
    max_activation = load_harvest(run_dir, cfg).max_activation  # (n,): strength 1 is the strongest firing
    steering = Steering(mode, latents, strengths, tuple(float(max_activation[i]) for i in latents))
    lm = cfg.language_model(device or "cpu")
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ConfigError("the prompt has no tokens")
    reader = LatentReader(sae, cfg.norm, cfg.fast_matmul)
    return lm, steer(lm, reader, prompt_ids, steering, n_tokens, temperature, top_p, seed)


# ---------------------------------------------------------------- ablation of one latent

HEAD_ROWS = 128  # positions through the LM head at once: (rows, V) fp32 logits, 25 MB for SmolLM2's 49,152 tokens
# (on a 2-core AMD EPYC the same rows took 1.15x as long in chunks of 256)
# Per (latent, context), the next tokens kept each way: a latent's raised and lowered tokens sum
# them over its contexts (a token outside a context's 64 counts 0 there: it moved less than they).
PAIR_TOKENS = 64
# ... read where it is strongest in the context, at most this many positions: a latent that fires
# on half the tokens would otherwise put half of them through the (V, d) head twice more.
READ_POSITIONS = 8


@dataclass
class AblationEffects:
    """What removing one latent changes over a batch of contexts (C, T)."""

    latent: int
    activations: np.ndarray  # (C, T) its activation where it was ablated (0 elsewhere)
    delta_logprob: np.ndarray  # (C, T) Δ log p of each actual token given the ones before (0 at t = 0)
    raised: list[tuple[int, float]]  # next tokens whose probability rose most (summed over the positions where it fired)
    lowered: list[tuple[int, float]]


@dataclass
class CleanPass:
    """One forward pass over contexts (B, T) as they are, kept for removing latents from them:
    the residual stream at the hookpoint and the next block's call (LoadedModel.capturing), the
    SAE's top k there (encoded once for every latent removed later), and from each row's
    `first` position on, the final hidden state and the two terms of each actual next token's
    log-probability (log p = logit − logsumexp)."""

    captured: Captured
    stats: tuple | None  # the norm's per-row statistics (per-token normalisation), for to_residual
    indices: torch.Tensor  # (B, T, k) the SAE's chosen latents
    values: torch.Tensor  # (B, T, k) their activations
    targets: torch.Tensor  # (B, T) the token each position predicts (t + 1's; 0 at T − 1, never read)
    first: torch.Tensor  # (B,) the head was run from here on (T: nowhere)
    hidden: torch.Tensor  # (B, T, d) fp32, after the final norm
    lse: torch.Tensor  # (B, T) logsumexp of the logits (0 before `first`)
    target: torch.Tensor  # (B, T) the logit of token t + 1 at position t (0 before `first` and at T − 1)

    @property
    def resid(self) -> torch.Tensor:
        return self.captured.resid

    def activations(self, row: int, latent: int, skip_first: int) -> torch.Tensor:
        """(T,) the latent's activation on each token of context `row` (0 at the first `skip_first`)."""
        z = ((self.indices[row] == latent) * self.values[row]).sum(-1)
        z[:skip_first] = 0  # the attention sink is left as the harvest leaves it
        return z


@dataclass
class PairEffect:
    """One latent removed from one context: per token, its activation and the change of the
    actual token's log-probability; and the next tokens whose probability changed most, summed
    over the (up to READ_POSITIONS) positions where it was strongest (its direct effect), that the
    raised and lowered tokens are summed from (summed_top_tokens)."""

    activations: torch.Tensor  # (T,)
    delta: torch.Tensor  # (T,)
    tokens: torch.Tensor  # (2 * PAIR_TOKENS,) ids, the most raised and the most lowered; -1 where none
    change: torch.Tensor  # (2 * PAIR_TOKENS,) float32: their change of probability


def first_firing(z: torch.Tensor) -> int:
    """The first position where `z` (T,) is positive; len(z) where it never is."""
    fired = (z > 0).nonzero()
    return int(fired[0]) if len(fired) else len(z)


class Ablator:
    """Removing latents from contexts at the cost of one clean pass per context and, per
    (latent, context), only the blocks after the hookpoint and the LM head at the positions the
    removal can reach: the clean pass keeps the residual stream there and the SAE's top k
    (LoadedModel.capturing), the ablated pass starts from an edited copy (LoadedModel.resume), so
    no module is changed and the probe's threads sharing the model never see it. The edit is
    x − z_i(x)·W_dec[i] where z_i > 0 (the SAE's error term kept), positions where it does not
    fire left bit for bit; positions before the first removal cannot change (the model is causal)
    and are not run through the head. Log-probabilities are read as logit − logsumexp of the
    fp32 head; the whole vocabulary's probabilities only where the latent was removed (the raised
    and lowered tokens), so no (positions, V) tensor is made over a whole context."""

    def __init__(self, lm: LanguageModel, reader: LatentReader, skip_first: int = 1):
        self.lm, self.reader, self.skip_first = lm, reader, skip_first
        self.W_dec = reader.sae.W_dec.detach().float()  # (n, d)

    def clean(self, ids: torch.Tensor, latents: list[list[int]]) -> CleanPass:
        """The clean pass over `ids` (B, T), the head run from the first position where any of
        `latents[row]` (those to be removed from that row later) fires."""
        loaded, lm = self.lm.loaded, self.lm
        ids = ids.long().to(lm.device)
        B, T = ids.shape
        with loaded.capturing(lm.layer) as captured, loaded.autocast():
            hidden = loaded.base(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d)
        rows = captured.resid.reshape(B * T, -1)
        x_n, stats = self.reader.norm.normalize(rows.float())
        chosen = self.reader.sae.encode_selected(x_n, self.reader.dtype)
        k = chosen.indices.shape[-1]
        targets = torch.zeros(B, T, dtype=torch.long)
        targets[:, :-1] = ids[:, 1:].cpu()
        clean = CleanPass(captured, stats, chosen.indices.view(B, T, k), chosen.values.view(B, T, k), targets,
                          torch.full((B,), T, dtype=torch.long), hidden.float(), torch.zeros(B, T), torch.zeros(B, T))
        for row, wanted in enumerate(latents):
            clean.first[row] = min([first_firing(clean.activations(row, latent, self.skip_first)) for latent in wanted] + [T])
        reached = torch.arange(T)[None, :] >= clean.first[:, None]  # (B, T)
        clean.lse[reached], clean.target[reached] = self.head_terms(clean.hidden[reached.to(hidden.device)], targets[reached])
        clean.target[:, -1] = 0
        return clean

    def head_terms(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, d) final hidden states, (R,) next tokens -> each row's logsumexp and target logit
        (R,), through the fp32 LM head HEAD_ROWS at a time."""
        lse, target = torch.zeros(len(hidden)), torch.zeros(len(hidden))
        for start in range(0, len(hidden), HEAD_ROWS):
            logits = self.lm.logits(hidden[start : start + HEAD_ROWS].float())  # (r, V)
            lse[start : start + HEAD_ROWS] = logits.logsumexp(-1).cpu()
            index = targets[start : start + HEAD_ROWS].to(logits.device)[:, None]
            target[start : start + HEAD_ROWS] = logits.gather(-1, index)[:, 0].cpu()
        return lse, target

    def ablate(self, items: list[tuple[CleanPass, int, int]], captured: Captured) -> list[PairEffect]:
        """Each (clean pass, row, latent) of `items`: the latent removed from that context. The
        blocks after the hookpoint run once over all of them, called as in `captured`'s pass,
        whose batch size they are filled up to (rows of a pass are alike in everything but their
        tokens: contexts of one length, none padded)."""
        B, T, d = captured.resid.shape
        if len(items) > B:
            raise ValueError(f"at most {B} contexts per ablated pass (the captured pass's batch), got {len(items)}")
        zs = [clean.activations(row, latent, self.skip_first) for clean, row, latent in items]
        firsts = [first_firing(z) for z in zs]
        effects = [PairEffect(z, torch.zeros(T), torch.full((2 * PAIR_TOKENS,), -1), torch.zeros(2 * PAIR_TOKENS))
                   for z in zs]
        live = [i for i, first in enumerate(firsts) if first < T]  # a latent that never fires there changes nothing
        if not live:
            return effects
        resid = captured.resid
        edited = resid.new_empty((B, T, d))
        edited[:] = items[live[0]][0].resid[items[live[0]][1]]  # the filler rows: any context, as it is
        for slot, i in enumerate(live):
            clean, row, latent = items[i]
            edited[slot] = self.remove(clean, row, latent, zs[i])
        with self.lm.loaded.autocast():
            hidden = self.lm.loaded.resume(captured, edited)  # (B, T, d)
        # the head at each row's reached positions only
        reached = torch.zeros(B, T, dtype=torch.bool)
        targets = torch.zeros(B, T, dtype=torch.long)
        for slot, i in enumerate(live):
            clean, row, _ = items[i]
            reached[slot, firsts[i]:] = True
            targets[slot] = clean.targets[row]
        lse, target = self.head_terms(hidden.float()[reached.to(hidden.device)], targets[reached])
        offset, read = 0, []
        for slot, i in enumerate(live):
            clean, row, _ = items[i]
            first, n = firsts[i], T - firsts[i]
            lse_a, target_a = lse[offset : offset + n], target[offset : offset + n]
            offset += n
            lse_c, target_c = clean.lse[row, first:], clean.target[row, first:]
            # position t predicts token t + 1: the change of token t + 1's log-probability
            effects[i].delta[first + 1 :] = ((target_a - lse_a) - (target_c - lse_c))[:-1]
            at = zs[i].topk(min(READ_POSITIONS, int((zs[i] > 0).sum()))).indices
            read.append((clean.hidden[row, at.to(clean.hidden.device)], hidden[slot, at.to(hidden.device)].float()))
        for i, change in zip(live, self.probability_changes(read)):
            effects[i].tokens, effects[i].change = strongest(change, PAIR_TOKENS)
        return effects

    def probability_changes(self, read: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per (clean, ablated) pair of final hidden states (P, d) at the same positions: each next
        token's change of probability, summed over the positions (pairs, V). All pairs go through
        the fp32 head together, HEAD_ROWS at a time: a call per pair would read the head's (V, d)
        weight for a few rows each time."""
        rows = torch.cat([torch.cat(pair) for pair in read])  # pair by pair, its clean then its ablated rows
        pair = torch.cat([torch.full((2 * len(clean),), i) for i, (clean, _) in enumerate(read)])
        sign = torch.cat([torch.cat([-torch.ones(len(clean)), torch.ones(len(clean))]) for clean, _ in read])
        changes = torch.zeros(len(read), self.lm.unembed.weight.shape[0])
        for start in range(0, len(rows), HEAD_ROWS):
            probs = torch.softmax(self.lm.logits(rows[start : start + HEAD_ROWS]), -1).cpu()
            changes.index_add_(0, pair[start : start + HEAD_ROWS], probs * sign[start : start + HEAD_ROWS, None])
        return changes

    def remove(self, clean: CleanPass, row: int, latent: int, z: torch.Tensor) -> torch.Tensor:
        """Context `row`'s residual stream (T, d) with x − z·W_dec[latent] where z > 0."""
        resid = clean.resid[row]
        T = resid.shape[0]
        stats = None if clean.stats is None else tuple(s[row * T : (row + 1) * T] for s in clean.stats)
        delta = to_residual(self.reader.norm, stats, z[:, None].to(self.W_dec.device) * self.W_dec[latent][None, :])
        return torch.where((z > 0).to(resid.device)[:, None], resid - delta.to(resid.dtype), resid)


def strongest(change: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of the m largest and the m smallest entries of `change` (V,) (each once where the
    two meet, in a small vocabulary) and their values, padded with id -1 to 2m."""
    k = min(m, len(change))  # a vocabulary smaller than m: all of it
    ids = torch.unique(torch.cat([change.topk(k).indices, change.topk(k, largest=False).indices]))
    tokens, values = torch.full((2 * m,), -1), torch.zeros(2 * m)
    tokens[: len(ids)], values[: len(ids)] = ids, change[ids].float()
    return tokens, values


def summed_top_tokens(tokens: torch.Tensor, change: torch.Tensor, vocab_size: int,
                      top_n: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The next tokens whose probability the removal raised and lowered most: each context's
    strongest (`tokens`, `change`: (P, 2m) from PairEffect, id -1 = none) summed over the
    contexts. Returns (raised, lowered), each [(id, summed change)], strongest first."""
    kept = tokens >= 0
    total = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, tokens[kept], change[kept].double())
    n = min(top_n, vocab_size)
    top, bottom = total.topk(n), total.topk(n, largest=False)
    return ([(int(i), float(v)) for v, i in zip(*top) if v > 0],
            [(int(i), float(v)) for v, i in zip(*bottom) if v < 0])


@torch.no_grad()
def ablation_effects(lm: LanguageModel, reader: LatentReader, contexts: torch.Tensor, latent: int,
                     skip_first: int = 1, top_n: int = 10) -> AblationEffects:
    """`latent` removed from `contexts` (C, T) (Ablator): one clean pass over them and, from the
    hookpoint on, one ablated pass. The raised and lowered tokens sum the change of every
    next token's probability over the positions where the latent was removed, the strongest
    READ_POSITIONS of each context (summed_top_tokens)."""
    ablator = Ablator(lm, reader, skip_first)
    C = contexts.shape[0]
    clean = ablator.clean(contexts, [[latent]] * C)
    effects = ablator.ablate([(clean, row, latent) for row in range(C)], clean.captured)
    raised, lowered = summed_top_tokens(torch.stack([e.tokens for e in effects]), torch.stack([e.change for e in effects]),
                                        lm.unembed.weight.shape[0], top_n)
    return AblationEffects(latent, torch.stack([e.activations for e in effects]).cpu().numpy(),
                           torch.stack([e.delta for e in effects]).numpy(), raised, lowered)


# ---------------------------------------------------------------- ablation sparsity (Section 4.5)


def effect_sparsity(delta: torch.Tensor) -> float:
    """(‖δ‖₁ / ‖δ‖₂)² / size(δ): the effective number of entries that change, as a fraction of
    them all; 1/size for a single entry, 1 for a change spread evenly (lower is sparser)."""
    delta = delta.double().flatten()
    l2 = delta.norm()
    if l2 == 0:
        return float("nan")
    return float((delta.abs().sum() / l2) ** 2 / delta.numel())


@torch.no_grad()
def ablation_sparsity(lm: LanguageModel, reader: LatentReader, tokens: torch.Tensor, counted: torch.Tensor,
                      n_samples: int = 24, horizon: int = 16, seed: int = 0, batch: int = 8) -> dict:
    """Gao et al. 2024, Section 4.5: for up to `n_samples` latents drawn at random among those
    firing on the held-out contexts `tokens` (C, T) at counted positions, one position where each
    fires (at random): remove it there (x − z_i·W_dec[i], the error term kept) and take the change
    in the logits at that position and the `horizon` − 1 after it, over the whole vocabulary (each
    position's change centred over the vocabulary first: the softmax ignores a constant shift).
    Its sparsity is effect_sparsity of that (horizon, V) change, averaged over the samples. The
    baseline removes a random direction of the same norm at the same positions.

    Each context runs only up to its last affected position (later ones cannot change what comes
    before them), in batches of like length, and the LM head (fp32) only where the change is read."""
    loaded, model = lm.loaded, lm.loaded.causal_lm
    device = lm.device
    tokens = tokens.long()
    C, T = tokens.shape
    # 1. every firing at counted positions, then the samples: distinct latents, one firing each
    record: list = []
    firings = []
    for start in range(0, C, batch):
        ids = tokens[start : start + batch].to(device)
        resid = loaded.residual(ids, lm.layer)  # (B, T, d), fp32 (the SAE's side runs outside autocast)
        x_n, _ = reader.norm.normalize(resid.reshape(-1, resid.shape[-1]))
        chosen = reader.sae.encode_selected(x_n, reader.dtype)
        rows = torch.arange(len(ids) * T).repeat_interleave(chosen.indices.shape[1])
        keep = (chosen.values.flatten() > 0) & counted[start : start + batch].reshape(-1).to(device)[rows]
        rows, latents, values = rows[keep], chosen.indices.flatten()[keep], chosen.values.flatten()[keep]
        firings.append(torch.stack([rows // T + start, rows % T, latents], -1))
        record.append(values)
    firings, values = torch.cat(firings), torch.cat(record)
    if len(firings) == 0:
        return {"ablation_sparsity": None, "ablation_sparsity_random": None, "ablation_samples": 0}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(firings), generator=generator)
    _, first = np.unique(firings[order, 2].numpy(), return_index=True)  # one random firing per latent
    picks = order[torch.from_numpy(first)]
    picks = picks[torch.randperm(len(picks), generator=generator)[:n_samples]]
    samples = [(int(c), int(p), int(i), float(v)) for (c, p, i), v in zip(firings[picks].tolist(), values[picks])]
    # 2. per batch of samples (in order of position, so that a batch's rows are of like length):
    # the contexts up to p + horizon as they are, with the latent removed at p, and with a random
    # direction of its norm removed there; the LM head (fp32) only at positions p .. p + horizon - 1
    samples.sort(key=lambda sample: sample[1])
    W = reader.sae.W_dec.detach().float()
    randoms = torch.nn.functional.normalize(torch.randn(len(samples), W.shape[1], generator=generator), dim=-1)
    scores = {"latent": [], "random": []}
    for start in range(0, len(samples), batch):
        group = samples[start : start + batch]
        length = min(T, max(p for _, p, _, _ in group) + horizon)
        ids = tokens[[c for c, _, _, _ in group], :length].to(device)  # (B, L)
        positions = torch.tensor([p for _, p, _, _ in group])
        decoder = W[[i for _, _, i, _ in group]] * torch.tensor([v for _, _, _, v in group])[:, None]  # (B, d): z_i W_dec[i]
        removed = {"latent": decoder,
                   "random": randoms[start : start + len(group)] * decoder.norm(dim=-1, keepdim=True)}

        def windows(edit=None) -> list[torch.Tensor]:
            with loaded.editing(lm.layer, edit) if edit else nullcontext(), loaded.autocast():
                hidden = loaded.base(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, d)
            read = [hidden[row, p : p + horizon].float() for row, p in enumerate(positions.tolist())]  # (≤ h, d) each
            return list(lm.logits(torch.cat(read)).split([len(rows) for rows in read]))  # (≤ h, V) each, one head call

        clean = windows()
        for name, vectors in removed.items():
            for before, after in zip(clean, windows(_remove_at(reader.norm, positions, vectors))):
                delta = after - before  # (h, V)
                delta = delta - delta.mean(-1, keepdim=True)
                if not math.isnan(score := effect_sparsity(delta)):  # nan: nothing changed at all
                    scores[name].append(score)

    def mean(values):
        return float(np.mean(values)) if values else None

    return {"ablation_sparsity": mean(scores["latent"]), "ablation_sparsity_random": mean(scores["random"]),
            "ablation_samples": len(samples), "ablation_horizon": horizon}


def _remove_at(norm: InputNorm, positions: torch.Tensor, vectors_n: torch.Tensor):
    """Subtract row b's vector (in the SAE's space, mapped back) at position positions[b] only."""

    def edit(resid: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(positions))
        at = resid[rows, positions]  # (B, d)
        stats = None if norm.kind == "scale" else norm.normalize(at.float())[1]
        out = resid.clone()
        out[rows, positions] = at - to_residual(norm, stats, vectors_n).to(resid.dtype)
        return out

    return edit
