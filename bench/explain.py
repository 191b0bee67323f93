"""Throughput of `saescope explain` at --concurrency 1 and 8, side by side in one run, against a
real local chat-completions server that answers every request in fixed time.

    .venv/bin/python bench/explain.py [--latents 96] [--delay 0.2] [--workdir /tmp/saescope-bench-explain]

The server is tests/llm_server.py's (the standard library's threading HTTP server on a loopback
port): it sleeps --delay seconds, then sends a fixed valid answer (an explanation, or a list of
0/1 of the right length). The run is a tiny one (the tests' tiny Llama, 512 latents, trained and
harvested once into the work folder); the latents are its first --latents that fire on under 1 %
of the tokens (a denser one may have no silent context to be scored against). Each concurrency explains the same --latents latents in a
fresh copy of the run (nothing resumed), timed end to end as `saescope explain` runs: the harvest
read, the SAE's pass over 64 pool contexts, then two requests per latent. Also reported: the span
from the first request's arrival to the last answer (the requests alone). Prints Markdown.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from saescope.cli import main  # noqa: E402
from tests.llm_server import chat_server, fixed_answers  # noqa: E402
from tests.tiny_model import make_tiny_model  # noqa: E402
from trainer.chat import ChatServer  # noqa: E402
from trainer.llm_explain import LlmExplainConfig, explain_run  # noqa: E402
from trainer.runfolder import load_harvest  # noqa: E402

TRAIN = ["--layer", "1", "--latents", "512", "--k", "8", "--tokens", "16384", "--heldout-tokens", "2048",
         "--context-length", "32", "--batch-size", "256"]


def tiny_run(workdir: Path) -> Path:
    run = workdir / "run"
    if (run / "harvest" / "harvest.json").exists():
        return run
    model = make_tiny_model(workdir / "model")
    assert main(["train", "--out", str(run), "--model", str(model), "--overwrite", *TRAIN]) == 0
    assert main(["harvest", str(run)]) == 0
    return run


def timed_answers(delay: float):
    """fixed_answers(delay), noting when each request came and when its answer left."""
    answer, spans, lock = fixed_answers(delay), [], threading.Lock()

    def timed(request):
        began = time.perf_counter()
        reply = answer(request)
        with lock:
            spans.append((began, time.perf_counter()))
        return reply

    return timed, spans


def explainable(run: Path, n_latents: int) -> str:
    """The first n latents that fire on less than 1 % of the tokens: a denser one may fire in every
    pool context, leaving none to score it against (an error, with no requests)."""
    density = load_harvest(run).density
    chosen = ((density > 0) & (density < 0.01)).nonzero().squeeze(1)[:n_latents].tolist()
    assert len(chosen) == n_latents, f"the run has only {len(chosen)} such latents"
    return ",".join(map(str, chosen))


def measure(run: Path, workdir: Path, concurrency: int, latents: str, delay: float) -> dict:
    copy = workdir / f"copy-{concurrency}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("activations", "llm_explanations.jsonl"))
    answer, spans = timed_answers(delay)
    cfg = LlmExplainConfig(latents=latents, concurrency=concurrency, negative_pool=64)
    with chat_server(answer) as server:
        began = time.perf_counter()
        summary = explain_run(copy, ChatServer(server.url, "fixed"), cfg, report=print)
        wall = time.perf_counter() - began
    assert len(summary.ok) == summary.asked and not summary.failed, "every latent must be explained"
    requests = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"concurrency": concurrency, "latents": len(summary.ok), "requests": len(spans), "wall": wall,
            "requests_span": requests}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=96)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--workdir", default="/tmp/saescope-bench-explain")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = tiny_run(workdir)
    latents = explainable(run, args.latents)
    rows = [measure(run, workdir, c, latents, args.delay) for c in (1, 8)]
    print(f"\n{date.today()}, {cpu_name()}, {args.latents} latents, server answers in {args.delay} s\n")
    print("| --concurrency | latents | requests | wall (s) | latents/s | first request to last answer (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['latents']} | {r['requests']} | {r['wall']:.1f} | "
              f"{r['latents'] / r['wall']:.2f} | {r['requests_span']:.1f} |")
    one, eight = rows
    print(f"\nthroughput ratio, 8 vs 1: {one['wall'] / eight['wall']:.2f}x end to end, "
          f"{one['requests_span'] / eight['requests_span']:.2f}x over the requests alone")


if __name__ == "__main__":
    main_bench()
