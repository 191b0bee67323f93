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

What a probe page shows of the result is app.probe_view's; whether an SAE can be probed on this
server at all, app.probe_availability's.
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import numpy as np
from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Latent, Sae
from app.probe_availability import SaeOption, find_run_dir, missing_weights, unavailable_for
from app.queries import SUMMARY_COLUMNS, SaeSource
from app.settings import Settings
from trainer.runfolder import HARVEST_DIR
from trainer.tokens import TokenPiece

log = logging.getLogger("saescope.probe")

# C0 and C1 control characters except tab, newline and carriage return; lone UTF-16 surrogates
# (JSON can smuggle them in as "\ud800") are not text at all.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class TooLong(HTTPException):
    """A text over the probe's limit (413), with the part of it that fits: its first `limit`
    tokens (or characters), which the page offers to probe instead."""

    def __init__(self, detail: str, prefix: str, limit: int, unit: str):
        super().__init__(413, detail)
        self.prefix, self.limit, self.unit = prefix, limit, unit


def start_token(tokenizer) -> tuple[int, str] | None:
    """The model's beginning-of-text token: the tokenizer's BOS, or else its end-of-text token,
    which GPT-2-style models put between documents (the harvest's contexts are cut from such a
    stream); None when it has neither."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        return None
    return int(token_id), tokenizer.convert_ids_to_tokens(int(token_id))


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
    # Whether position 0 is the model's beginning-of-text token, put before the text (its piece is
    # that token's name, not part of the text): the text's first token is then counted.
    bos: bool = False
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



# ---------------------------------------------------------------- the service


@dataclass
class QueuedProbe:
    sae: SaeWeights
    text: str
    future: asyncio.Future  # set on its event loop
    loop: asyncio.AbstractEventLoop
    bos: bool = False  # the beginning-of-text token before the text


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
        if len(text) > (limit := self.settings.probe_max_chars):
            raise TooLong(f"text is {len(text)} characters; the probe accepts at most {limit}", text[:limit], limit,
                          "characters")
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
        run_dir = find_run_dir(row.run_dir, self.settings.runs_root)
        if run_dir is None:
            raise HTTPException(503, missing_weights(sae_id, row.run_dir))
        return SaeWeights(sae_id, row.model, run_dir, row.content_hash)

    def options(self) -> list[SaeOption]:
        """Every SAE in the database, each marked with why it cannot be probed here (or None)."""
        with self.sessions() as session:
            rows = session.execute(
                select(*SUMMARY_COLUMNS, *SaeSource.columns).order_by(Sae.model, Sae.layer, Sae.n_latents, Sae.k, Sae.id)
            ).all()
        return [SaeOption(**row._mapping, unavailable=self.unavailable_for(SaeSource.of(row))) for row in rows]

    def unavailable(self, sae_id: str) -> str | None:
        """Why this SAE cannot be probed here, checked without loading its model (None: it may be)."""
        with self.sessions() as session:
            row = session.execute(select(*SaeSource.columns).where(Sae.id == sae_id)).first()
        return f"no SAE {sae_id!r}" if row is None else self.unavailable_for(SaeSource.of(row))

    def unavailable_for(self, sae: SaeSource) -> str | None:
        """The same for an SAE whose source was read already: no query. A model that failed to
        load here before says why (app.probe_availability checks the rest)."""
        return unavailable_for(sae, self.settings.runs_root, self._failures)

    # ------------------------------------------------------------ probing

    async def encode(self, sae_id: str, text: str, bos: bool = False) -> tuple[ProbeResult, LatentStats]:
        """Every latent on every token of `text` (after the model's beginning-of-text token with
        `bos`), and the SAE's latent statistics (app.probe_view ranks and shapes them): 422/413
        for a text the checks refuse, 404 unknown SAE, 503 no weights, no model or too busy."""
        self.check_text(text)
        sae = await anyio.to_thread.run_sync(self.locate, sae_id)
        result = await self._probe(sae, text, bos)
        return result, await self.stats(sae)

    async def _probe(self, sae: SaeWeights, text: str, bos: bool = False) -> ProbeResult:
        key = (sae.key, text, bos)
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
                self._queue.append(QueuedProbe(sae, text, future, asyncio.get_running_loop(), bos))
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
            results = self._probe_batch(batch[0].sae, [queued.text for queued in batch], [queued.bos for queued in batch])
        except Exception as e:  # noqa: BLE001: loading failed (a 503), or a bug: every request hears of it
            results = [e] * len(batch)
        for queued, result in zip(batch, results):
            queued.loop.call_soon_threadsafe(_settle, queued.future, result)

    def _probe_batch(self, sae: SaeWeights, texts: list[str], bos: list[bool] | None = None
                     ) -> list[ProbeResult | HTTPException]:
        """Each text's probe (or why not), with the model's beginning-of-text token before those
        that `bos` marks."""
        loaded = self.load(sae)
        encoder = loaded.encoder
        bos = bos or [False] * len(texts)
        start = start_token(encoder.lm.tokenizer) if any(bos) else None  # (id, name); None: none asked, or none in the tokenizer
        began = time.perf_counter()
        # the model's own context length may be shorter than the setting (a tiny test model's is)
        limit = min(self.settings.probe_max_tokens, encoder.lm.max_positions or math.inf)
        token_ids: dict[int, list[int]] = {}  # by position in `texts`, the ones within the limits
        outcomes: list[ProbeResult | HTTPException | None] = [None] * len(texts)
        for i, text in enumerate(texts):  # the token limit is checked before the forward pass
            ids = ([start[0]] if bos[i] and start else []) + encoder.tokenize(text)
            first = 1 if bos[i] and start else 0  # the text's own tokens begin here
            if len(ids) == first:
                outcomes[i] = HTTPException(422, "text has no tokens")
            elif len(ids) > limit:
                pieces = encoder.lm.token_pieces(ids[first:limit])
                while pieces and pieces[-1].carries:  # a character cut at the limit: left out whole
                    pieces.pop()
                outcomes[i] = TooLong(f"text is {len(ids)} tokens; the probe accepts at most {limit}",
                                      "".join(piece.text for piece in pieces), limit, "tokens")
            else:
                token_ids[i] = ids
        if token_ids:
            encoded = encoder.encode_topk_batch(list(token_ids.values()))  # (T, k) each, strongest first
            for (i, ids), (values, indices) in zip(token_ids.items(), encoded):
                with_start = bool(bos[i] and start)
                pieces = ([TokenPiece(start[1], False)] if with_start else []) + encoder.lm.token_pieces(ids[with_start:])
                outcomes[i] = ProbeResult(
                    sae=sae.id, text=texts[i], token_ids=[int(t) for t in ids], tokens=[p.text for p in pieces],
                    indices=indices.numpy(), values=values.numpy(), excluded_positions=loaded.excluded_positions,
                    bos=with_start, carries=tuple(p.carries for p in pieces),
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
                await self.encode(option.id, "Hello, world!")
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

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loaded.clear()
        self._results.clear()


def _excluded_positions(run_dir: Path) -> int:
    """How many leading positions the harvest left out (harvest.json), 1 when it does not say."""
    try:
        info = json.loads((run_dir / HARVEST_DIR / "harvest.json").read_text())
        return len(info.get("excluded_positions", [0]))
    except (OSError, ValueError):
        return 1
