"""What a probe page shows: the tokens of a text shaded by their latents, each token's latents (its
panel), and the latents ranked over the whole text; POST /api/probe and the page's JSON twin give
the same view as JSON. Also the feature page's "try your own text": one latent over a text.

    view = await view_text(service, sae_id, text, latent=3, sort="sum")   # a ProbeView
    trial = await try_latent(service, sae_id, index, text)               # a LatentTrial

The numbers come from app.probe_service (a ProbeResult: every latent firing on every token, and
each latent's harvest statistics); this module only ranks and shapes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import anyio
import numpy as np
from fastapi import HTTPException

from app.probe_service import LatentStats, ProbeResult, ProbeService
from app.urls import URLs
from trainer.thresholds import FREQUENT_THRESHOLD  # a latent firing more often says little about one text

SortKey = Literal["max", "sum"]


@dataclass
class LatentInfo:
    """A latent as the probe lists it, linking to its feature page."""

    index: int
    density: float
    max_activation: float  # over the harvest: the scale its shading uses
    explanation: str | None = None  # its automatic explanation, when the harvest found one
    explanation_f1: float | None = None  # and that explanation's held-out F1, when scored

    @property
    def frequent(self) -> bool:
        return self.density > FREQUENT_THRESHOLD


@dataclass
class TextLatent:
    """One latent's activity over the whole text."""

    latent: LatentInfo
    max: float
    sum: float
    n_tokens: int  # tokens it fires on

    def as_json(self, urls: URLs, sae_id: str) -> dict:
        return {
            "index": self.latent.index, "max": _short(self.max), "sum": _short(self.sum), "n_tokens": self.n_tokens,
            "density": self.latent.density, "max_activation": self.latent.max_activation,
            "explanation": self.latent.explanation, "explanation_f1": self.latent.explanation_f1,
            "url": urls.feature(sae_id, self.latent.index),
        }


@dataclass
class TokenView:
    position: int
    token: str
    token_id: int
    latents: list[tuple[LatentInfo, float]]  # those shown, strongest first
    frequent: list[tuple[LatentInfo, float]]  # frequent latents left out of `latents` (listed apart), strongest first
    excluded: bool  # an attention-sink position, left out of the ranking
    shade: float  # background strength in [0, 1]
    tip: str  # the value shown on hover
    carries: bool = False  # holds the first bytes of a character that a later token completes

    @property
    def pieces(self) -> list[tuple[str, str]]:
        """The token as (kind, text) runs: spaces, newlines and tabs visible, so its true
        boundaries show; a newline also breaks the line, so the text keeps its shape."""
        return display_pieces(self.token, self.carries)


def display_pieces(token: str, carries: bool = False) -> list[tuple[str, str]]:
    if carries:  # part of a character: "…" where its bytes are, the character on the token that ends it
        return [*display_pieces(token), ("mark", "…")] if token else [("mark", "…")]
    if token == "":
        return [("mark", "∅")]
    pieces: list[tuple[str, str]] = []
    for char in token:
        kind, shown = {" ": ("space", "·"), "\n": ("newline", "↵\n"), "\t": ("tab", "⇥"),
                       "\r": ("mark", "␍")}.get(char, ("text", char))
        if pieces and pieces[-1][0] == kind:
            pieces[-1] = (kind, pieces[-1][1] + shown)
        else:
            pieces.append((kind, shown))
    return pieces


def view_state(latent: int | None, sort: SortKey, hide: bool, token: int | None = None) -> dict:
    """The view state beyond SAE and text, as query parameters (defaults left out); `token` is the
    page's open token panel (the JSON lists every token anyway)."""
    return {"latent": latent, "sort": None if sort == "max" else sort, "all": None if hide else 1, "token": token}


@dataclass
class ProbeView:
    """One probe as the page and the API show it: the tokens, each token's latents, and the
    latents ranked over the whole text. `hide` leaves frequent latents and the attention-sink
    position(s) out of the ranking and the shading (the per-token JSON keeps everything)."""

    result: ProbeResult
    stats: LatentStats
    hide: bool = True
    latent: int | None = None  # highlighted over all tokens
    sort: SortKey = "max"
    top_n: int = 20
    top_k: int = 5  # per token, in the JSON

    def __post_init__(self):
        self.text_latents = self._rank()
        self.selected = self.info(self.latent) if self.latent is not None else None

    @cached_property
    def tokens(self) -> list[TokenView]:
        """Every token as the page shows it (built only for the page: the JSON needs less)."""
        return self._tokens()

    @property
    def sae(self) -> str:
        return self.result.sae

    @property
    def text(self) -> str:
        return self.result.text

    @property
    def excluded_positions(self) -> list[int]:
        return list(range(min(self.result.excluded_positions, len(self.result)))) if self.hide else []

    def info(self, index: int) -> LatentInfo:
        return LatentInfo(index=index, density=float(self.stats.density[index]),
                          max_activation=float(self.stats.max_activation[index]),
                          explanation=self.stats.explanation[index], explanation_f1=self.stats.explanation_f1[index])

    def _counted(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, values) over the positions the view counts: (T', k) each."""
        first = len(self.excluded_positions)
        return self.result.indices[first:], self.result.values[first:]

    def _kept(self) -> tuple[np.ndarray, np.ndarray]:
        """The same over the latents the view counts: a hidden frequent latent's values are 0."""
        indices, values = self._counted()
        if self.hide:
            values = np.where(self.stats.density[indices] > FREQUENT_THRESHOLD, 0, values)
        return indices, values

    @cached_property
    def hidden_frequent(self) -> int:
        """Frequent latents that fire on the counted tokens but are left out of the ranking."""
        if not self.hide:
            return 0
        indices, values = self._counted()
        return len(np.unique(indices[(values > 0) & (self.stats.density[indices] > FREQUENT_THRESHOLD)]))

    def _rank(self) -> list[TextLatent]:
        indices, values = self._kept()
        n = len(self.stats.density)
        fired = values > 0
        total = np.bincount(indices[fired], weights=values[fired], minlength=n)  # (n,)
        count = np.bincount(indices[fired], minlength=n)
        peak = np.zeros(n)
        np.maximum.at(peak, indices[fired], values[fired])
        score = peak if self.sort == "max" else total
        candidates = np.flatnonzero(count)
        order = candidates[np.lexsort((candidates, -score[candidates]))][: self.top_n]  # ties: lower index first
        return [TextLatent(self.info(int(i)), float(peak[i]), float(total[i]), int(count[i])) for i in order]

    def _tokens(self) -> list[TokenView]:
        n_excluded = len(self.excluded_positions)
        selected = self.result.activations_of(self.latent) if self.latent is not None else None
        if selected is not None:
            scale = self.selected.max_activation if self.selected.max_activation > 0 else float(selected.max(initial=0))
        tokens = []
        for position, (token, token_id) in enumerate(zip(self.result.tokens, self.result.token_ids)):
            latents = [(self.info(i), v) for i, v in self.result.token_latents(position)]
            shown = [(info, v) for info, v in latents if not (self.hide and info.frequent)]
            frequent = [(info, v) for info, v in latents if self.hide and info.frequent]
            excluded = position < n_excluded
            if selected is not None:
                value = float(selected[position])
                shade = 0.0 if excluded else _ratio(value, scale)
                tip = f"#{self.latent}: {value:.3f}"
            elif shown and not excluded:
                top, value = shown[0]
                shade = _ratio(value, top.max_activation if top.max_activation > 0 else value)
                tip = f"#{top.index}: {value:.3f}"
            else:
                shade, tip = 0.0, ("first position: left out" if excluded else "no latent fires")
            carries = position < len(self.result.carries) and self.result.carries[position]
            tokens.append(TokenView(position, token, token_id, shown, frequent, excluded, shade, tip, carries))
        return tokens

    def as_json(self, urls: URLs) -> dict:
        return {
            "sae": self.sae,
            "text": self.text,
            "n_tokens": len(self.result),
            "tokens": [
                {"position": p, "token": token, "token_id": token_id,
                 "top_latents": [{"index": i, "activation": _short(v)} for i, v in self.result.token_latents(p, self.top_k)]}
                for p, (token, token_id) in enumerate(zip(self.result.tokens, self.result.token_ids))
            ],
            "top_latents": [latent.as_json(urls, self.sae) for latent in self.text_latents],
            "sort": self.sort,
            "hide_frequent_and_first": self.hide,
            "excluded_positions": self.excluded_positions,
            "frequent_density": FREQUENT_THRESHOLD,
            "highlighted": None if self.selected is None else {
                "index": self.latent, "activations": [_short(v) for v in self.result.activations_of(self.latent)],
                "max_activation": self.selected.max_activation, "density": self.selected.density,
                "url": urls.feature(self.sae, self.latent)},
            "url": urls.probe(self.sae, self.text, **view_state(self.latent, self.sort, self.hide)),
        }


def _short(value) -> float:
    """A float32 activation as a JSON number without float64 noise (6 significant digits)."""
    return float(f"{float(value):.6g}")


def _ratio(value: float, scale: float) -> float:
    if not scale or scale <= 0 or not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, value / scale))


@dataclass
class LatentTrial:
    """One latent's activation on every token of a typed text, or why it could not be computed."""

    text: str
    tokens: list[str] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)
    scale: float = 0.0  # the latent's largest activation in the harvest: full shading
    excluded_positions: list[int] = field(default_factory=list)  # left out of the harvest's statistics
    error: str | None = None

    @property
    def max(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def n_fired(self) -> int:
        return sum(value > 0 for value in self.activations)


async def view_text(service: ProbeService, sae_id: str, text: str, latent: int | None = None, strict: bool = True,
                    **options) -> ProbeView:
    """Probe `text` and shape it for the page or the API (options: ProbeView's fields). A
    latent the SAE does not have is a 422, or ignored when not `strict` (the page keeps the
    highlighted latent while the user switches SAEs)."""
    result, stats = await service.encode(sae_id, text)
    if latent is not None and not 0 <= latent < len(stats.density):
        if not strict:
            latent = None
        else:
            raise HTTPException(422, f"latent {latent} does not exist: SAE {sae_id!r} has latents 0..{len(stats.density) - 1}")
    return ProbeView(result, stats, latent=latent, **options)


async def try_latent(service: ProbeService, sae_id: str, index: int, text: str) -> LatentTrial:
    """One latent over every token of `text` (the feature page's "try your own text"); a
    probe that cannot run here gives a trial that says why."""
    if reason := await anyio.to_thread.run_sync(service.unavailable, sae_id):
        return LatentTrial(text=text, error=f"this SAE cannot run on new text here: {reason}")
    try:
        view = await view_text(service, sae_id, text, latent=index, hide=False)
    except HTTPException as e:
        return LatentTrial(text=text, error=e.detail)
    return LatentTrial(text=text, tokens=view.result.tokens, activations=view.result.activations_of(index).tolist(),
                       scale=view.selected.max_activation,
                       excluded_positions=list(range(min(view.result.excluded_positions, len(view.result)))))
