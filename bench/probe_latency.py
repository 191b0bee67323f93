"""Probe latency under concurrent clients, against a real server, next to the bare forward pass.

    .venv/bin/python bench/probe_latency.py [--run demo/runs/smollm2-135m-instruct-l6-4096-k32]
        [--db sqlite:///demo/saescope.db] [--clients 8] [--requests 24] [--workers 1] [--threads N]

One run: (1) the bare forward pass through block L of the model (no SAE, no server) on a 64-token
text, in this process before the server starts; (2) a server (`app.server.serve` in a subprocess,
models preloaded) on a copy of the database; (3) clients posting that text, or distinct 64-token
texts, to POST /api/probe. "Server time" is the Server-Timing header the API sets: from the
handler's start to its JSON, queueing for the model included. Prints a Markdown table for
BENCHMARKS.md, each figure also as a ratio to the bare forward pass.

Scenarios: `same text` (every client sends the one text: one forward pass, the rest wait on it or
hit the result cache), `distinct texts` (every request a text never seen: a forward pass each),
and `one client` (distinct texts, one at a time: latency without contention).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO_RUN = ROOT / "demo" / "runs" / "smollm2-135m-instruct-l6-4096-k32"
N_TOKENS = 64


def texts_of(tokenizer, n: int, n_tokens: int = N_TOKENS) -> list[str]:
    """n distinct stdlib snippets that tokenize to exactly n_tokens tokens each."""
    from trainer.corpus import stdlib_files

    texts = []
    for path in stdlib_files():
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - n_tokens, 5 * n_tokens):
            text = tokenizer.decode(ids[start : start + n_tokens])
            if text.strip() and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens:
                texts.append(text)
            if len(texts) == n:
                return texts
    raise RuntimeError("the stdlib is too short")


def bare_forward_ms(lm, text: str, repeats: int = 30) -> float:
    """Median time of the model alone through block L on the text (what every probe pays)."""
    import torch

    ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    for _ in range(5):
        lm.residual(ids)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        lm.residual(ids)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def copy_database(url: str, folder: Path) -> str:
    """The server migrates its database: give it a copy, so the benchmark changes nothing."""
    if not url.startswith("sqlite:///"):
        return url
    copy = folder / "bench.db"
    with sqlite3.connect(url.removeprefix("sqlite:///")) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    return f"sqlite:///{copy}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, port: int, workers: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SAESCOPE_PROBE_PRELOAD="1", SAESCOPE_PROBE_WORKERS=str(workers),
               SAESCOPE_PROBE_MAX_PENDING="64")
    if threads:
        env["SAESCOPE_PROBE_THREADS"] = str(threads)
    code = f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):  # preloading converts nothing (cached) but still takes seconds
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200:
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
    raise RuntimeError("the server did not start in 2 minutes")


def probe(base: str, sae: str, text: str) -> tuple[float, float]:
    """(server ms from Server-Timing, client ms) of one POST /api/probe."""
    body = json.dumps({"sae": sae, "text": text}).encode()
    request = urllib.request.Request(f"{base}/api/probe", data=body, headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        timing = response.headers["Server-Timing"]
    client = (time.perf_counter() - began) * 1000
    return float(timing.split("dur=")[1]), client


def run_clients(base: str, sae: str, texts_per_client: list[list[str]]) -> list[tuple[float, float]]:
    """Every client sends its texts one after the other; all clients at once."""
    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(texts_per_client))

    def client(texts: list[str]) -> None:
        start.wait()
        for text in texts:
            timing = probe(base, sae, text)
            with lock:
                results.append(timing)

    threads = [threading.Thread(target=client, args=(texts,)) for texts in texts_per_client]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(DEMO_RUN), help="the SAE's run folder")
    parser.add_argument("--db", default=f"sqlite:///{ROOT / 'demo' / 'saescope.db'}", help="database with the run loaded")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="requests per client and scenario")
    parser.add_argument("--workers", type=int, default=1, help="SAESCOPE_PROBE_WORKERS of the server")
    parser.add_argument("--threads", type=int, default=None, help="SAESCOPE_PROBE_THREADS of the server")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine shows here

    import torch

    from trainer.runconfig import RunConfig

    cfg = RunConfig.load(Path(args.run))
    sae = cfg.slug
    lm = cfg.language_model("cpu")
    n_distinct = args.clients * args.requests + args.requests
    texts = texts_of(lm.tokenizer, 1 + 4 + n_distinct)
    text, warm_up, distinct = texts[0], texts[1:5], texts[5:]  # each text used once (no cache hits)
    forward = bare_forward_ms(lm, text)
    del lm

    with tempfile.TemporaryDirectory() as tmp:
        url = copy_database(args.db, Path(tmp))
        port = free_port()
        server = start_server(url, port, args.workers, args.threads)
        base = f"http://127.0.0.1:{port}"
        try:
            for warm in warm_up:  # warm the server's allocator and pools (not counted)
                probe(base, sae, warm)
            scenarios = {
                "same text": run_clients(base, sae, [[text] * args.requests for _ in range(args.clients)]),
                "distinct texts": run_clients(base, sae, [distinct[i * args.requests : (i + 1) * args.requests]
                                                          for i in range(args.clients)]),
                "one client, distinct texts": run_clients(base, sae, [distinct[args.clients * args.requests :][: args.requests]]),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()}, {os.cpu_count()} cores · torch {torch.__version__} · "
          f"load average before the run {load_before:.1f}")
    print(f"SAE {sae} · {N_TOKENS}-token stdlib texts · {args.clients} clients × {args.requests} requests · "
          f"server: {args.workers} probe workers, {args.threads or 'cores / workers'} torch threads each\n")
    print(f"Bare forward pass through block {cfg.layer} on the {N_TOKENS}-token text, this process "
          f"({torch.get_num_threads()} threads): {forward:.1f} ms (median of 30)\n")
    print("| scenario | clients | server p50 | server p99 | p50 / forward | p99 / forward | client p50 |")
    print("|---|---|---|---|---|---|---|")
    for name, results in scenarios.items():
        server_ms = [s for s, _ in results]
        client_ms = [c for _, c in results]
        clients = 1 if name.startswith("one client") else args.clients
        p50, p99 = percentile(server_ms, 0.5), percentile(server_ms, 0.99)
        print(f"| {name} | {clients} | {p50:.1f} ms | {p99:.1f} ms | {p50 / forward:.2f} | {p99 / forward:.2f} | "
              f"{percentile(client_ms, 0.5):.1f} ms |")


if __name__ == "__main__":
    main()
