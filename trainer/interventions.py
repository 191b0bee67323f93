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
- **ablation effects** (`ablation_effects`): a latent's activation set to 0 where it fires (error
  term kept), and the change in the log-probability of each actual next token, plus the next
  tokens most raised and lowered, over a few contexts (the feature page's section).
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
from trainer.model import LanguageModel
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
    return lm.unembed(hidden.float())[0]


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


@dataclass
class AblationEffects:
    """What removing one latent changes over a batch of contexts (C, T)."""

    latent: int
    activations: np.ndarray  # (C, T) its activation where it was ablated (0 elsewhere)
    delta_logprob: np.ndarray  # (C, T) Δ log p of each actual token given the ones before (0 at t = 0)
    raised: list[tuple[int, float]]  # next tokens whose log-probability rose most (mean over affected positions)
    lowered: list[tuple[int, float]]


def ablation_edit(reader: LatentReader, latent: int, skip_first: int = 0, record: list | None = None):
    """Set `latent`'s activation to 0 where it fires (positions from `skip_first` on), the SAE's
    error term kept: x − z_i(x)·W_dec[i]. Positions where it does not fire are left bit for bit."""
    latents = torch.tensor([latent])
    W = reader.sae.W_dec.detach()[latent].float()  # (d,)

    def edit(resid: torch.Tensor) -> torch.Tensor:
        B, T, d = resid.shape
        rows = resid.reshape(-1, d)
        z, stats = reader.activations(rows, latents)  # (N, 1)
        z = z.view(B, T)
        z[:, :skip_first] = 0  # the attention sink is left as the harvest leaves it
        if record is not None:
            record.append(z.clone())
        delta = to_residual(reader.norm, stats, z.reshape(-1, 1) * W[None, :]).view(B, T, d)
        return torch.where((z > 0)[..., None], resid - delta.to(resid.dtype), resid)

    return edit


@torch.no_grad()
def ablation_effects(lm: LanguageModel, reader: LatentReader, contexts: torch.Tensor, latent: int,
                     skip_first: int = 1, top_n: int = 10) -> AblationEffects:
    """`latent` removed from `contexts` (C, T): two forward passes of the whole model (clean and
    ablated). The raised and lowered tokens average the change of every next-token log-probability
    over the positions the ablation can reach (from the first where it fired, per context)."""
    loaded, model = lm.loaded, lm.loaded.causal_lm
    ids = contexts.long().to(lm.device)  # (C, T)
    record: list = []
    with loaded.autocast():
        clean = model(input_ids=ids, use_cache=False).logits.float()  # (C, T, V): position t predicts token t + 1
        with loaded.editing(lm.layer, ablation_edit(reader, latent, skip_first, record)):
            ablated = model(input_ids=ids, use_cache=False).logits.float()
    z = record[0].cpu()  # (C, T)
    # log p = logit − logsumexp: only what is read of the (C, T, V) log-probabilities is made
    lse_clean, lse_ablated = clean.logsumexp(-1), ablated.logsumexp(-1)  # (C, T)
    targets = ids[:, 1:, None]
    delta = torch.zeros(ids.shape)
    delta[:, 1:] = ((ablated[:, :-1].gather(-1, targets)[..., 0] - lse_ablated[:, :-1])
                    - (clean[:, :-1].gather(-1, targets)[..., 0] - lse_clean[:, :-1])).cpu()
    reached = ((z > 0).int().cumsum(-1) > 0).to(clean.device)  # (C, T): at or after the first firing
    if reached.any():
        V = clean.shape[-1]
        weights = reached.float().view(1, -1) / reached.sum()  # the mean over reached positions, as a product
        shift = float((weights[0] * (lse_ablated - lse_clean).view(-1)).sum())
        mean = ((weights @ ablated.view(-1, V)) - (weights @ clean.view(-1, V)))[0].cpu() - shift  # (V,)
        top, bottom = mean.topk(top_n), mean.topk(top_n, largest=False)
        raised = [(int(i), float(v)) for v, i in zip(*top) if v > 0]
        lowered = [(int(i), float(v)) for v, i in zip(*bottom) if v < 0]
    else:
        raised, lowered = [], []
    return AblationEffects(latent, z.numpy(), delta.numpy(), raised, lowered)


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
            return [lm.unembed(hidden[row, p : p + horizon].float()) for row, p in enumerate(positions.tolist())]  # (h, V) each

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
