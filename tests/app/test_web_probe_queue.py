"""The probe under load, against a real server on a free port: a full queue is a 503 with
Retry-After at once (never a hang), page views keep working while probes wait, and the same text
asked for while it is being computed is computed once. The model is the edge stubbed here: a
stand-in encoder that blocks until the test releases it."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn

from app.main import create_app
from app.probe_service import LoadedSae
from app.settings import Settings
from trainer.tokens import TokenPiece


class BlockingEncoder:
    """Tokens are words; latent 1 fires on each; encoding waits for `release`. `calls` counts
    the texts encoded."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.batches = []  # texts per forward pass
        self.sae = SimpleNamespace(k=5)
        self.lm = SimpleNamespace(token_pieces=lambda ids: [TokenPiece(f" w{i}", False) for i in ids], max_positions=None)

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def encode_topk_batch(self, texts: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.calls += len(texts)
        self.batches.append(len(texts))
        self.started.set()
        assert self.release.wait(20), "the test never released the encoder"
        return [(torch.full((len(ids), 1), 1.5), torch.ones(len(ids), 1, dtype=torch.long)) for ids in texts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings():
    return {"probe_workers": 1, "probe_max_pending": 2}


@pytest.fixture
def queue_server(database_url, synthetic_sae_id, settings):
    """A real uvicorn server in this process (so the test can hand it the stand-in encoder)."""
    app = create_app(Settings(database_url=database_url, **settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    encoder = BlockingEncoder()
    service = app.state.probe
    service._loaded[service.locate(synthetic_sae_id).key] = LoadedSae(encoder, excluded_positions=1)
    encoder.pending = lambda: service._pending  # probes waiting or running: see wait_for_pending
    try:
        yield f"http://127.0.0.1:{port}", encoder
    finally:
        encoder.release.set()
        server.should_exit = True
        thread.join(timeout=10)


def prober(base: str, sae_id: str):
    return lambda text: httpx.post(f"{base}/api/probe", json={"sae": sae_id, "text": text}, timeout=30)


def occupy_the_worker(clients: ThreadPoolExecutor, probe, text: str, encoder: BlockingEncoder):
    """A probe the (one) worker is busy with until the test releases the encoder."""
    running = clients.submit(probe, text)
    assert encoder.started.wait(10)
    return running


def wait_for_pending(encoder: BlockingEncoder, n: int, timeout: float = 10) -> None:
    """Until n probes wait or run in the server: the clients' requests have all arrived (a fixed
    sleep was not always long enough on a slow machine)."""
    deadline = time.monotonic() + timeout
    while encoder.pending() < n:
        assert time.monotonic() < deadline, f"only {encoder.pending()} of {n} probes arrived"
        time.sleep(0.01)


def test_full_queue_is_503_at_once_and_pages_keep_working(queue_server, synthetic_sae_id):
    base, encoder = queue_server
    probe = prober(base, synthetic_sae_id)
    with ThreadPoolExecutor(4) as clients:
        first = occupy_the_worker(clients, probe, "one two three", encoder)
        second = clients.submit(probe, "four five")  # queued behind the first: 2 pending, the limit
        same = clients.submit(probe, "one two three")  # joins the first: no new work, no slot
        wait_for_pending(encoder, 2)

        began = time.perf_counter()
        busy = probe("six seven")
        assert time.perf_counter() - began < 2  # an answer at once, not a hang
        assert busy.status_code == 503 and busy.json()["detail"].startswith("the probe is busy")
        assert int(busy.headers["Retry-After"]) >= 1
        page = httpx.get(f"{base}/probe", params={"sae": synthetic_sae_id, "text": "eight nine"}, timeout=5)
        assert page.status_code == 503 and "Retry-After" in page.headers and "Trying again" in page.text

        for path in (f"/saes/{synthetic_sae_id}", f"/saes/{synthetic_sae_id}/features/0", "/probe", "/index.json"):
            began = time.perf_counter()
            assert httpx.get(base + path, timeout=5).status_code == 200, path
            assert time.perf_counter() - began < 2, path  # pages do not wait on the probe pool

        encoder.release.set()
        results = [future.result() for future in (first, second, same)]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert results[0].json() == results[2].json()
    assert encoder.calls == 2  # "one two three" was computed once for both asks
    assert [t["top_latents"] for t in results[0].json()["tokens"]][1] == [{"index": 1, "activation": 1.5}]
    assert probe("one two three").json() == results[0].json() and encoder.calls == 2  # from the cache
    assert probe("six seven").status_code == 200  # room again


@pytest.mark.parametrize("settings", [{"probe_workers": 1, "probe_max_pending": 8, "probe_batch": 3}])
def test_probes_queued_behind_a_busy_worker_share_one_pass(queue_server, synthetic_sae_id):
    base, encoder = queue_server
    probe = prober(base, synthetic_sae_id)
    with ThreadPoolExecutor(6) as clients:
        first = occupy_the_worker(clients, probe, "one", encoder)
        queued = [clients.submit(probe, text) for text in ("two two", "three three three", "four", "five five")]
        wait_for_pending(encoder, 5)  # all four wait behind the first
        encoder.release.set()
        results = [future.result() for future in (first, *queued)]
    assert [r.status_code for r in results] == [200] * 5
    assert [r.json()["n_tokens"] for r in results] == [1, 2, 3, 1, 2]  # each its own text's result
    assert encoder.batches == [1, 3, 1]  # the four queued ones in passes of at most probe_batch
