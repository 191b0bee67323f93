"""The probe service: run typed text through the model and the SAE, off the event loop.

One `LatentEncoder` per SAE is loaded lazily (seconds) and kept in memory. Inference runs on a
small thread pool; at most `probe_max_pending` probes wait or run at once, and the next one gets
a 503 with Retry-After instead of a hang. Input is checked (empty, too long, unknown SAE) before
any model is loaded.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
from fastapi import HTTPException
from sqlalchemy.orm import Session, sessionmaker

from app import queries
from app.settings import Settings
from trainer.runfolder import SAE_FILE


@dataclass
class LatentActivation:
    index: int
    activation: float


@dataclass
class ProbeToken:
    token: str
    token_id: int
    top_latents: list[LatentActivation]  # strongest first; only latents that fire


@dataclass
class ProbeResult:
    sae: str
    text: str
    tokens: list[ProbeToken]
    truncated: bool  # more tokens than probe_max_tokens: only the first ones are shown

    def as_json(self) -> dict:
        return {
            "sae": self.sae,
            "tokens": [asdict(token) for token in self.tokens],
            "truncated": self.truncated,
        }


class ProbeService:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions
        self._executor = ThreadPoolExecutor(max_workers=settings.probe_workers, thread_name_prefix="probe")
        self._encoders: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._pending = 0  # touched only on the event loop

    # ------------------------------------------------------------ checks (no model needed)

    def check_text(self, text: str) -> None:
        if not text or not text.strip():
            raise HTTPException(422, "text must not be empty")
        if len(text) > self.settings.probe_max_chars:
            raise HTTPException(
                413,
                f"text is {len(text)} characters; the probe accepts at most {self.settings.probe_max_chars}",
            )

    def run_dir(self, sae_id: str) -> Path:
        """The SAE's run folder on this server: 404 for an unknown SAE, 503 without weights."""
        with self.sessions() as session:
            recorded = queries.sae_run_dir(session, sae_id)
        if recorded is None:
            raise HTTPException(404, f"no SAE {sae_id!r}")
        candidates = [Path(recorded)]
        if self.settings.runs_root is not None:
            candidates.append(Path(self.settings.runs_root) / Path(recorded).name)
        for candidate in candidates:
            if (candidate / SAE_FILE).is_file():
                return candidate
        raise HTTPException(
            503,
            f"the weights of SAE {sae_id!r} are not available on this server "
            f"(run folder {recorded} not found); pages still work, probing does not",
        )

    # ------------------------------------------------------------ probing

    async def probe(self, sae_id: str, text: str, top_k: int = 5) -> ProbeResult:
        self.check_text(text)
        run_dir = await anyio.to_thread.run_sync(self.run_dir, sae_id)
        if self._pending >= self.settings.probe_max_pending:
            raise HTTPException(503, "the probe is busy; try again in a few seconds", headers={"Retry-After": "5"})
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._probe_sync, sae_id, run_dir, text, top_k)
        finally:
            self._pending -= 1

    def _probe_sync(self, sae_id: str, run_dir: Path, text: str, top_k: int) -> ProbeResult:
        import torch

        encoded = self.encoder(sae_id, run_dir).encode_text(text)
        limit = self.settings.probe_max_tokens
        latents = encoded.latents[:limit]  # (T, n_latents)
        k = min(top_k, latents.shape[-1])
        values, indices = torch.topk(latents, k, dim=-1)  # (T, k)
        tokens = []
        for token, token_id, vals, idxs in zip(encoded.tokens, encoded.token_ids, values.tolist(), indices.tolist()):
            top = [LatentActivation(index=i, activation=round(v, 4)) for v, i in zip(vals, idxs) if v > 0]
            tokens.append(ProbeToken(token=token, token_id=int(token_id), top_latents=top))
        return ProbeResult(sae=sae_id, text=text, tokens=tokens, truncated=len(encoded.token_ids) > limit)

    def encoder(self, sae_id: str, run_dir: Path):
        """The cached encoder for `sae_id`, loaded once even when many threads ask at once."""
        encoder = self._encoders.get(sae_id)
        if encoder is not None:
            return encoder
        with self._locks_guard:
            lock = self._locks.setdefault(sae_id, threading.Lock())
        with lock:
            if sae_id not in self._encoders:
                from trainer.inference import LatentEncoder  # heavy (torch, transformers): load on first probe

                self._encoders[sae_id] = LatentEncoder.from_run(run_dir)
            return self._encoders[sae_id]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._encoders.clear()
