"""What a probe page shows: the tokens of a text shaded by their latents, each token's latents (its
panel), and the latents ranked over the whole text; POST /api/probe and the page's JSON twin give
the same view as JSON. Also the feature page's "try your own text": one latent over a text.

    view = await view_text(service, sae_id, text, urls, latent=3, sort="sum")   # a ProbeResponse
    trial = await try_latent(service, sae_id, index, text)                     # a LatentTrial

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
from pydantic import Field, PrivateAttr, computed_field, field_serializer

from app.probe_service import LatentStats, ProbeResult, ProbeService
from app.queries import LatentHitOut, Record
from app.shares import ShareOut
from app.urls import URLs
from trainer.thresholds import FREQUENT_THRESHOLD  # a latent firing more often says little about one text

SortKey = Literal["max", "sum"]


class TextLatentOut(LatentHitOut):
    """One latent's activity over the whole text."""

    max: float = Field(description="its largest activation over the counted tokens")
    sum: float = Field(description="its activations summed over the counted tokens")
    n_tokens: int = Field(description="counted tokens it fires on")

    @field_serializer("max", "sum", when_used="json")
    def _json_number(self, value: float) -> float:
        return _short(value)


class ProbeLatent(Record):
    index: int
    activation: float


class ProbeTokenOut(Record):
    position: int
    token: str = Field(description="the token's text, leading spaces and newlines kept")
    token_id: int
    top_latents: list[ProbeLatent] = Field(description="up to top_k latents firing on this token, strongest first")


class HighlightOut(Record):
    index: int
    activations: list[float] = Field(description="its activation on every token of the text, 0 where it does not fire")
    max_activation: float = Field(description="its largest activation in the harvest")
    density: float
    url: str


@dataclass
class TokenView:
    """A token as the page shows it: its chip (shade, hover text) and its panel (its latents)."""

    position: int
    token: str
    token_id: int
    latents: list[tuple[LatentHitOut, float]]  # those shown, strongest first
    frequent: list[tuple[LatentHitOut, float]]  # frequent latents left out of `latents` (listed apart), strongest first
    excluded: bool  # an attention-sink position, left out of the ranking
    shade: float  # background strength in [0, 1]
    tip: str  # the value shown on hover
    carries: bool = False  # holds the first bytes of a character that a later token completes

    @property
    def pieces(self) -> list[tuple[str, str]]:
        """The token as (kind, text) runs: spaces, newlines and tabs visible, so its true
        boundaries show; a newline also breaks the line, so the text keeps its shape."""
        return display_pieces(self.token, self.carries)

    @property
    def all_latents(self) -> list[tuple[LatentHitOut, float, bool]]:
        """Every latent firing on the token, strongest first, each with whether it is a frequent
        one (left out of the shading and the ranking, shown dimmed: never hidden)."""
        rows = [(info, value, False) for info, value in self.latents] + [(info, value, True) for info, value in self.frequent]
        return sorted(rows, key=lambda row: -row[1])


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


def view_state(latent: int | None, sort: SortKey, hide: bool, token: int | None = None, bos: bool = False) -> dict:
    """The view state beyond SAE and text, as query parameters (defaults left out); `token` is the
    page's open token panel (the JSON lists every token anyway), `bos` the beginning-of-text
    token put before the text."""
    return {"bos": 1 if bos else None, "latent": latent, "sort": None if sort == "max" else sort,
            "all": None if hide else 1, "token": token}


class ProbeResponse(Record):
    """One probe of a text: its tokens, each token's latents, and the latents ranked over the
    whole text (frequent latents and the first position left out unless asked for)."""

    # The page shows the same object: `hide` leaves frequent latents and the attention-sink
    # position(s) out of the ranking and the shading (the per-token JSON keeps everything). What
    # only the page shows (`token_views`, `selected`, `hidden_frequent`) and the JSON's per-token
    # lists are built when first read.

    sae: str
    text: str
    n_tokens: int
    top_latents: list[TextLatentOut] = Field(description="latents most active over the whole text")
    sort: SortKey
    hide_frequent_and_first: bool
    excluded_positions: list[int] = Field(description="positions left out of top_latents")
    bos: bool = Field(False, description="position 0 is the model's beginning-of-text token, put before the text "
                                         "(asked with bos): the text's first token is counted")
    frequent_density: float = Field(FREQUENT_THRESHOLD, description="density above which a latent counts as frequent")
    url: str = Field(description="the probe page showing this result")
    # the view's state that the JSON gives in other shapes (highlighted, tokens)
    latent: int | None = Field(None, exclude=True)  # highlighted over all tokens
    top_k: int = Field(5, exclude=True)  # latents per token, in the JSON
    _result: ProbeResult = PrivateAttr()
    _stats: LatentStats = PrivateAttr()
    _urls: URLs = PrivateAttr()
    _infos: dict[int, LatentHitOut] = PrivateAttr(default_factory=dict)
    _top_n: int = PrivateAttr(20)

    @classmethod
    def of(cls, result: ProbeResult, stats: LatentStats, urls: URLs, hide: bool = True, latent: int | None = None,
           sort: SortKey = "max", top_n: int = 20, top_k: int = 5) -> ProbeResponse:
        excluded = list(range(min(result.excluded_positions, len(result)))) if hide else []
        view = cls(sae=result.sae, text=result.text, n_tokens=len(result), top_latents=[], sort=sort,
                   hide_frequent_and_first=hide, excluded_positions=excluded, latent=latent, top_k=top_k, bos=result.bos,
                   url=urls.probe(result.sae, result.text, **view_state(latent, sort, hide, bos=result.bos)))
        view._result, view._stats, view._urls, view._top_n = result, stats, urls, top_n
        view.top_latents = view._rank(top_n)
        return view

    @property
    def result(self) -> ProbeResult:
        return self._result

    @property
    def hide(self) -> bool:
        return self.hide_frequent_and_first

    @computed_field(description="every token, with the latents firing on it")
    @cached_property
    def tokens(self) -> list[ProbeTokenOut]:
        result = self._result
        return [ProbeTokenOut(position=p, token=token, token_id=token_id,
                              top_latents=[ProbeLatent(index=i, activation=_short(v))
                                           for i, v in result.token_latents(p, self.top_k)])
                for p, (token, token_id) in enumerate(zip(result.tokens, result.token_ids))]

    @computed_field(description="the latent the query string's latent= names, over the text")
    @cached_property
    def highlighted(self) -> HighlightOut | None:
        if self.selected is None:
            return None
        return HighlightOut(index=self.latent, activations=[_short(v) for v in self._result.activations_of(self.latent)],
                            max_activation=self.selected.max_activation, density=self.selected.density,
                            url=self.selected.url)

    @cached_property
    def selected(self) -> LatentHitOut | None:
        """The highlighted latent."""
        return self.info(self.latent) if self.latent is not None else None

    @cached_property
    def token_views(self) -> list[TokenView]:
        """Every token as the page shows it (built only for the page: the JSON needs less)."""
        return self._tokens()

    def info(self, index: int) -> LatentHitOut:
        """A latent of the SAE, with its harvest statistics (read once per view)."""
        if (found := self._infos.get(index)) is None:
            stats = self._stats
            found = self._infos[index] = LatentHitOut(
                index=index, density=float(stats.density[index]), max_activation=float(stats.max_activation[index]),
                explanation=stats.explanation[index], explanation_f1=stats.explanation_f1[index],
                url=self._urls.feature(self.sae, index))
        return found

    def _counted(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, values) over the positions the view counts: (T', k) each."""
        first = len(self.excluded_positions)
        return self._result.indices[first:], self._result.values[first:]

    def _kept(self) -> tuple[np.ndarray, np.ndarray]:
        """The same over the latents the view counts: a hidden frequent latent's values are 0."""
        indices, values = self._counted()
        if self.hide:
            values = np.where(self._stats.density[indices] > FREQUENT_THRESHOLD, 0, values)
        return indices, values

    @cached_property
    def hidden_frequent(self) -> int:
        """Frequent latents that fire on the counted tokens but are left out of the ranking."""
        if not self.hide:
            return 0
        indices, values = self._counted()
        return len(np.unique(indices[(values > 0) & (self._stats.density[indices] > FREQUENT_THRESHOLD)]))

    @cached_property
    def ranking(self) -> list[TextLatentOut]:
        """The page's ranking: top_latents, and among them, by the same score, the frequent
        latents left out of it that score as high (the page dims and marks them; a token's
        strongest latent is never hidden)."""
        if not self.hidden_frequent:
            return self.top_latents
        score = (lambda latent: latent.max) if self.sort == "max" else (lambda latent: latent.sum)
        full = len(self.top_latents) >= self._top_n
        floor = score(self.top_latents[-1]) if full and self.top_latents else -math.inf
        frequent = [latent for latent in self._rank(self._top_n, frequent_only=True) if score(latent) >= floor]
        return sorted(self.top_latents + frequent, key=lambda latent: (-score(latent), latent.index))

    def _rank(self, top_n: int, frequent_only: bool = False) -> list[TextLatentOut]:
        indices, values = self._kept()
        if frequent_only:  # the frequent latents alone
            indices, values = self._counted()
            values = np.where(self._stats.density[indices] > FREQUENT_THRESHOLD, values, 0)
        n = len(self._stats.density)
        fired = values > 0
        total = np.bincount(indices[fired], weights=values[fired], minlength=n)  # (n,)
        count = np.bincount(indices[fired], minlength=n)
        peak = np.zeros(n)
        np.maximum.at(peak, indices[fired], values[fired])
        score = peak if self.sort == "max" else total
        candidates = np.flatnonzero(count)
        order = candidates[np.lexsort((candidates, -score[candidates]))][:top_n]  # ties: lower index first
        return [TextLatentOut(**dict(self.info(int(i))), max=float(peak[i]), sum=float(total[i]), n_tokens=int(count[i]))
                for i in order]

    def _tokens(self) -> list[TokenView]:
        result = self._result
        n_excluded = len(self.excluded_positions)
        selected = result.activations_of(self.latent) if self.latent is not None else None
        if selected is not None:
            scale = self.selected.max_activation if self.selected.max_activation > 0 else float(selected.max(initial=0))
        tokens = []
        for position, (token, token_id) in enumerate(zip(result.tokens, result.token_ids)):
            latents = [(self.info(i), v) for i, v in result.token_latents(position)]
            shown = [(info, v) for info, v in latents if not (self.hide and info.density > FREQUENT_THRESHOLD)]
            frequent = [(info, v) for info, v in latents if self.hide and info.density > FREQUENT_THRESHOLD]
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
            carries = position < len(result.carries) and result.carries[position]
            tokens.append(TokenView(position, token, token_id, shown, frequent, excluded, shade, tip, carries))
        return tokens


class SharedProbeOut(ShareOut):
    """A shared probe and what it gives now."""

    probe: ProbeResponse | None = Field(description="the probe of the shared text (null when it cannot run here)")
    error: str | None = Field(description="why the probe cannot run here, if it cannot")


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


class UnknownLatent(HTTPException):
    """A latent the SAE does not have, asked for in a request: a 422 wherever it is asked (the
    probe's twin, a shared probe's twin)."""

    def __init__(self, sae_id: str, latent: int, n_latents: int):
        super().__init__(422, f"latent {latent} does not exist: SAE {sae_id!r} has latents 0..{n_latents - 1}")


async def view_text(service: ProbeService, sae_id: str, text: str, urls: URLs = URLs(), latent: int | None = None,
                    strict: bool = True, bos: bool = False, **options) -> ProbeResponse:
    """Probe `text` and shape it for the page or the API (options: ProbeResponse.of's). A latent the
    SAE does not have is a 422, or ignored when not `strict` (the page keeps the highlighted
    latent while the user switches SAEs)."""
    result, stats = await service.encode(sae_id, text, bos)
    if latent is not None and not 0 <= latent < len(stats.density):
        if not strict:
            latent = None
        else:
            raise UnknownLatent(sae_id, latent, len(stats.density))
    return ProbeResponse.of(result, stats, urls, latent=latent, **options)


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
