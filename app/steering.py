"""The steering service: continue a prompt as the model does and with latents steered, side by side.

The tensor work is trainer.interventions'; this module checks the request (before any model is
loaded), finds the SAE's model through the probe service (one model object per process serves
both: the probe reads it through the hookpoint, steering runs it whole), and runs generations on
a worker thread of its own, never on the event loop. At most `steer_max_pending` steerings run or
wait at once; the next gets a 503 with Retry-After, never a queue that grows without bound.
Identical requests are computed once and kept in a small LRU (the page, its twin and its share
link ask for the same steering).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import anyio
from fastapi import HTTPException
from pydantic import BaseModel, Field

from app.probe_service import ProbeService, SaeWeights
from app.queries import Record
from app.urls import URLs

# The limits, stated once (trainer.interventions holds the mechanism's own).
MAX_PROMPT_TOKENS = 512
MAX_NEW_TOKENS = 128
MAX_LATENTS = 8
MAX_STRENGTH = 100.0
MAX_TEMPERATURE = 5.0

Mode = Literal["add", "clamp"]


class SteerRequest(BaseModel):
    """What to steer: POST /api/steer's body, and the /steer page's query string."""

    sae: str = Field(description="SAE id, as listed by /index.json")
    prompt: str = Field(description=f"text to continue: at most {MAX_PROMPT_TOKENS} tokens (and the probe's character "
                                    "limit), no control characters but tab and newlines")
    latents: list[tuple[int, float]] = Field(
        description=f"1 to {MAX_LATENTS} [latent index, strength] pairs; a strength is a multiple of the latent's "
                    f"max activation in the harvest, between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}")
    mode: Mode = Field("add", description="add: strength x max activation x W_dec[i] added to the residual stream at "
                                          "every position; clamp: the latent's activation set to strength x max "
                                          "activation at every position, the SAE's error term kept")
    tokens: int = Field(32, description=f"new tokens, 1 to {MAX_NEW_TOKENS}")
    temperature: float = Field(0.0, description=f"0: greedy; up to {MAX_TEMPERATURE:g}: sampled with the seed")
    top_p: float = Field(1.0, description="nucleus sampling: the smallest set of tokens holding this much probability")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="the sampler's seed: the same request gives the same texts")

    def key(self) -> tuple:
        return (self.sae, self.prompt, tuple(self.latents), self.mode, self.tokens, self.temperature, self.top_p, self.seed)


class SteeredLatentOut(Record):
    index: int
    strength: float
    max_activation: float = Field(description="its largest activation in the harvest: strength 1")
    explanation: str | None
    url: str = Field(description="the latent's page")
    activations: list[float] = Field(description="its activation on every token of the prompt and the steered "
                                                 "continuation, as the SAE reads the steered residual stream")


class ContinuationOut(Record):
    token_ids: list[int]
    tokens: list[str] = Field(description="each new token's piece of the text (they join into `text`)")
    text: str


class SteerOut(Record):
    """The default and the steered continuation of one prompt, with the same sampler."""

    sae: str
    prompt: str
    mode: Mode
    tokens: int
    temperature: float
    top_p: float
    seed: int
    latents: list[SteeredLatentOut]
    prompt_tokens: list[str] = Field(description="the prompt's tokens, each its piece of the text")
    default: ContinuationOut
    steered: ContinuationOut
    divergence: int | None = Field(description="the first new token where the two continuations differ (null: identical)")
    url: str = Field(description="this steering's page: /steer with its query string")
    json_url: str

    def request(self) -> SteerRequest:
        return SteerRequest(sae=self.sae, prompt=self.prompt, latents=[(latent.index, latent.strength) for latent in self.latents],
                            mode=self.mode, tokens=self.tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


def latents_param(latents: list[tuple[int, float]]) -> str:
    """[(12, 4.0), (7, -2.5)] -> "12:4,7:-2.5": the `latents` of a /steer link."""
    return ",".join(f"{index}:{strength:g}" for index, strength in latents)


def parse_latents_param(text: str) -> list[tuple[int, float]]:
    """"12:4,7:-2.5" -> [(12, 4.0), (7, -2.5)]; a bare index means strength 1."""
    latents = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        index, _, strength = part.partition(":")
        try:
            latents.append((int(index), float(strength) if strength.strip() else 1.0))
        except ValueError:
            raise HTTPException(422, f"latents is a list like 12:4,7:-2.5 (index:strength), got {part!r}") from None
    return latents


DEFAULTS = {"mode": "add", "tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def link_state(**state) -> dict:
    """The sampler's settings in a link only where they differ from the defaults: short links."""
    return {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in state.items() if v != DEFAULTS.get(k)}


def steer_url(urls: URLs, request: SteerRequest, fmt: str | None = None) -> str:
    return urls.steer(request.sae, request.prompt, latents_param(request.latents), fmt=fmt,
                      **link_state(mode=request.mode, tokens=request.tokens, temperature=request.temperature,
                                   top_p=request.top_p, seed=request.seed))


def busy(retry_after: int) -> HTTPException:
    return HTTPException(503, f"steering is busy; try again in {retry_after} s", headers={"Retry-After": str(retry_after)})


class SteerService:
    def __init__(self, probe: ProbeService):
        self.probe, self.settings = probe, probe.settings
        # One worker: a generation uses every core the probe's share gives it (ProbeService._start_worker).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer", initializer=probe._start_worker)
        self._pending = 0  # touched only on the event loop
        self._results: OrderedDict[tuple, SteerOut] = OrderedDict()
        self._inflight: dict[tuple, asyncio.Future] = {}
        self._seconds = 2.0  # moving average of one steering's time, for Retry-After

    def check(self, request: SteerRequest) -> None:
        """Everything but the SAE and the prompt's tokens, before any lookup or model."""
        try:
            self.probe.check_text(request.prompt)
        except HTTPException as e:  # the probe's words for its text, said of the prompt
            raise HTTPException(e.status_code, "the prompt" + e.detail.removeprefix("text").replace("the probe", "steering")) from None
        if not 1 <= len(request.latents) <= MAX_LATENTS:
            raise HTTPException(422, f"steer 1 to {MAX_LATENTS} latents at once, got {len(request.latents)}")
        if len({index for index, _ in request.latents}) != len(request.latents):
            raise HTTPException(422, "each latent may be steered once")
        for index, strength in request.latents:
            if index < 0:
                raise HTTPException(422, f"a latent index is 0 or more, got {index}")
            if not (math.isfinite(strength) and abs(strength) <= MAX_STRENGTH):
                raise HTTPException(422, f"latent {index}: strength must be between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} "
                                         f"(times its max activation), got {strength:g}")
        if not 1 <= request.tokens <= MAX_NEW_TOKENS:
            status = 413 if request.tokens > MAX_NEW_TOKENS else 422
            raise HTTPException(status, f"tokens must be 1 to {MAX_NEW_TOKENS} new tokens, got {request.tokens}")
        if not (math.isfinite(request.temperature) and 0 <= request.temperature <= MAX_TEMPERATURE):
            raise HTTPException(422, f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {request.temperature:g}")
        if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
            raise HTTPException(422, f"top_p must be more than 0 and at most 1, got {request.top_p:g}")

    async def steer(self, request: SteerRequest, urls: URLs) -> SteerOut:
        """422/413 for a request the checks refuse, 404 unknown SAE or latent, 503 no weights,
        no model, or busy (with Retry-After)."""
        self.check(request)
        sae = await anyio.to_thread.run_sync(self.probe.locate, request.sae)
        stats = await self.probe.stats(sae)
        n_latents = len(stats.max_activation)
        for index, _ in request.latents:
            if index >= n_latents:
                raise HTTPException(404, f"SAE {request.sae!r} has no latent {index} (its latents are 0 to {n_latents - 1})")
        return await self.submit((sae.key, *request.key()), self._run, sae, request, stats, urls)

    async def submit(self, key: tuple, work, *args):
        """`work(*args)` on the worker, once per `key` however many ask (its result kept in the
        LRU); a 503 with Retry-After when `steer_max_pending` are running or waiting already."""
        if (cached := self._results.get(key)) is not None:
            self._results.move_to_end(key)
            return cached
        future = self._inflight.get(key)
        if future is None:
            if self._pending >= self.settings.steer_max_pending:
                raise busy(max(1, math.ceil(self._pending * self._seconds)))
            self._pending += 1
            loop = asyncio.get_running_loop()
            future = asyncio.wrap_future(self._executor.submit(self._timed, work, *args), loop=loop)
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        # shield: a client that goes away must not cancel the work others are waiting on
        return await asyncio.shield(future)

    def _timed(self, work, *args):
        began = time.perf_counter()
        try:
            return work(*args)
        finally:
            self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - began)

    def ablate(self, sae: SaeWeights, index: int, contexts: list[list[int]], skip_first: int):
        """trainer.interventions.ablation_effects of latent `index` over `contexts` (token ids), on
        the worker (through `submit`); the SAE's model loaded as the probe loads it."""
        import torch

        from trainer.interventions import LatentReader, ablation_effects

        encoder = self.probe.load(sae).encoder
        reader = LatentReader(encoder.sae, encoder.norm, encoder.cfg.fast_matmul)
        length = min(map(len, contexts))  # a harvest's contexts are of one length
        return ablation_effects(encoder.lm, reader, torch.tensor([ids[:length] for ids in contexts]), index, skip_first)

    def _finished(self, key: tuple, future: asyncio.Future) -> None:
        self._pending -= 1
        self._inflight.pop(key, None)
        if future.cancelled() or future.exception() is not None:
            return
        self._results[key] = future.result()
        while len(self._results) > self.settings.probe_cache_size:
            self._results.popitem(last=False)

    def _run(self, sae: SaeWeights, request: SteerRequest, stats, urls: URLs) -> SteerOut:
        from trainer.interventions import LatentReader, Steering, steer  # heavy: on first use

        encoder = self.probe.load(sae).encoder  # the probe's: the SAE and the shared model (503 when it cannot load)
        lm = encoder.lm
        prompt_ids = encoder.tokenize(request.prompt)
        limit = min(MAX_PROMPT_TOKENS, (lm.max_positions or math.inf) - request.tokens)
        if not prompt_ids:
            raise HTTPException(422, "the prompt has no tokens")
        if len(prompt_ids) > limit:
            raise HTTPException(413, f"the prompt is {len(prompt_ids)} tokens; steering accepts at most {int(limit)}"
                                     + (f" with {request.tokens} new tokens (the model's context)" if limit < MAX_PROMPT_TOKENS else ""))
        indices = tuple(index for index, _ in request.latents)
        steering = Steering(request.mode, indices, tuple(s for _, s in request.latents),
                            tuple(float(stats.max_activation[i]) for i in indices))
        pair = steer(lm, LatentReader(encoder.sae, encoder.norm, encoder.cfg.fast_matmul), prompt_ids, steering,
                     request.tokens, request.temperature, request.top_p, request.seed)

        def continuation(new: list[int]) -> ContinuationOut:
            pieces = lm.token_pieces(prompt_ids + new)[len(prompt_ids):]  # a character split over tokens joins
            return ContinuationOut(token_ids=new, tokens=[p.text for p in pieces], text="".join(p.text for p in pieces))

        activations = pair.steered.activations  # (T, m)
        latents = [SteeredLatentOut(index=i, strength=s, max_activation=float(stats.max_activation[i]),
                                    explanation=stats.explanation[i], url=urls.feature(request.sae, i),
                                    activations=[round(float(a), 4) for a in activations[:, j]])
                   for j, (i, s) in enumerate(request.latents)]
        return SteerOut(sae=request.sae, prompt=request.prompt, mode=request.mode, tokens=request.tokens,
                        temperature=request.temperature, top_p=request.top_p, seed=request.seed, latents=latents,
                        prompt_tokens=[p.text for p in lm.token_pieces(prompt_ids)],
                        default=continuation(pair.default.token_ids), steered=continuation(pair.steered.token_ids),
                        divergence=pair.divergence, url=steer_url(urls, request), json_url=steer_url(urls, request, "json"))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._results.clear()
