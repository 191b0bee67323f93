"""The notebook API against the pages' own paths: both figures of BENCHMARKS.md's notebook section,
measured side by side in one run on one machine.

    .venv/bin/python bench/notebook.py [--run demo/runs/smollm2-135m-instruct-l6-4096-k32]
        [--latents 65536] [--texts 64] [--tokens 64] [--repeats 5] [--workdir /tmp/saescope-bench-notebook]

1. Latents: `db.latents(sae_id)` (saescope.connect) on a database of one synthetic SAE of --latents
   latents (tests/app/webrun.py's make_synthetic_run, loaded by the real loader into a SQLite file
   in --workdir, kept for the next run) against the SAE page's own query for all rows:
   app.queries.list_latents with per_page = n (its records for every latent), both in the page's
   default order (density, descending), and db.latents() in its own default order (index). The
   median of --repeats, the two interleaved.
2. Encoding: `run.encode(texts)` (saescope.open_run) on --texts distinct stdlib snippets of exactly
   --tokens tokens each, against the probe's own path on the same texts: ProbeService._probe_batch
   in batches of the probe's probe_batch setting (8), what one worker runs per forward pass
   (tokenizing, the model through the hookpoint, the SAE, the token pieces). Tokens per second,
   the median of --repeats, interleaved, after one warm-up each; and run.encode with the probe's
   batch size, like for like.

Prints a Markdown table with the date, the CPU (lscpu's model name) and torch's threads.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests" / "app", ROOT / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

DEMO_RUN = ROOT / "demo" / "runs" / "smollm2-135m-instruct-l6-4096-k32"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        import platform

        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def timed(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def interleaved(a, b, repeats: int) -> tuple[list[float], list[float]]:
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a))
        times_b.append(timed(b))
    return times_a, times_b


# ---------------------------------------------------------------- 1. latents


def latents_database(workdir: Path, n_latents: int) -> tuple[str, str]:
    """A SQLite file with one synthetic SAE of n_latents latents (few examples each: the latents
    table is what is measured), made once and kept."""
    from app.loader import load_run
    from webrun import make_synthetic_run

    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{workdir / f'latents-{n_latents}.db'}"
    run = workdir / f"run-{n_latents}"
    if not (workdir / f"latents-{n_latents}.db").is_file():
        began = time.perf_counter()
        if not (run / "harvest" / "harvest.json").is_file():
            make_synthetic_run(run, n_latents=n_latents, n_examples=2, context_length=16, model="bench/Synthetic-Model",
                               quantile_bins=1, samples_per_bin=1)
        sae_id = load_run(run, url)
        print(f"made {url} in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    from trainer.runconfig import RunConfig

    return url, RunConfig.load(run).slug


def bench_latents(url: str, sae_id: str, n_latents: int, repeats: int) -> dict:
    import saescope
    from app import queries
    from app.db import make_engine, session_factory

    db = saescope.connect(url)
    engine = make_engine(url)
    sessions = session_factory(engine)

    def page_query():
        with sessions() as session:
            page = queries.list_latents(session, sae_id, per_page=n_latents)
            assert len(page.latents) == n_latents

    def notebook_same_order():
        assert len(db.latents(sae_id, sort="density", order="desc")) == n_latents

    def notebook_default():
        assert len(db.latents(sae_id)) == n_latents

    for warm in (page_query, notebook_same_order, notebook_default):
        warm()
    page, same = interleaved(page_query, notebook_same_order, repeats)
    _, default = interleaved(page_query, notebook_default, repeats)
    db.close()
    engine.dispose()
    return {"page": statistics.median(page), "notebook": statistics.median(same), "notebook_default": statistics.median(default)}


# ---------------------------------------------------------------- 2. encoding


def bench_encode(run_dir: Path, n_texts: int, n_tokens: int, repeats: int) -> dict:
    import saescope
    from app.probe_service import ProbeService, SaeWeights
    from app.settings import Settings
    from probe_latency import texts_of

    run = saescope.open_run(run_dir)
    texts = texts_of(run.encoder.lm.tokenizer, n_texts, n_tokens)
    settings = Settings(database_url="sqlite://")
    service = ProbeService(settings, sessions=None)
    sae = SaeWeights(run.cfg.slug, run.cfg.model, run_dir, "bench")
    batch = settings.probe_batch

    def probe():
        for start in range(0, len(texts), batch):
            results = service._probe_batch(sae, texts[start : start + batch])
            assert not any(isinstance(result, Exception) for result in results)

    def notebook():
        frame = run.encode(texts)
        assert frame["text"].nunique() == len(texts)

    def notebook_probe_batches():
        assert run.encode(texts, batch_size=batch)["text"].nunique() == len(texts)

    probe(), notebook(), notebook_probe_batches()  # warm-up: the model and the SAE loaded, the kernels chosen
    probe_times, notebook_times = interleaved(probe, notebook, repeats)
    _, same_batches = interleaved(probe, notebook_probe_batches, repeats)
    tokens = n_texts * n_tokens
    return {"probe": tokens / statistics.median(probe_times), "notebook": tokens / statistics.median(notebook_times),
            "notebook_batch": tokens / statistics.median(same_batches), "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEMO_RUN, help="a run folder with its model (default: the demo's)")
    parser.add_argument("--latents", type=int, default=65_536)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/saescope-bench-notebook"))
    args = parser.parse_args()

    import torch

    url, sae_id = latents_database(args.workdir, args.latents)
    latents = bench_latents(url, sae_id, args.latents, args.repeats)
    encode = bench_encode(args.run, args.texts, args.tokens, args.repeats)

    print(f"\n{datetime.date.today().isoformat()}, {cpu_name()}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"`{' '.join(['bench/notebook.py', *sys.argv[1:]])}`\n")
    print("| what | the pages' own path | the notebook API | ratio |")
    print("|---|---|---|---|")
    print(f"| all {args.latents:,} latents of one SAE (SQLite), page order | list_latents(per_page=n): "
          f"{latents['page'] * 1000:.0f} ms | db.latents(sort='density', order='desc'): {latents['notebook'] * 1000:.0f} ms | "
          f"{latents['notebook'] / latents['page']:.2f}x the time (target <= 2x) |")
    print(f"| the same, db.latents()'s own order (index) | | {latents['notebook_default'] * 1000:.0f} ms | "
          f"{latents['notebook_default'] / latents['page']:.2f}x the time |")
    print(f"| {args.texts} texts of {args.tokens} tokens, {args.run.name} | probe batches of {encode['batch']}: "
          f"{encode['probe']:,.0f} tokens/s | run.encode(): {encode['notebook']:,.0f} tokens/s | "
          f"{encode['notebook'] / encode['probe']:.2f}x the tokens/s (target >= 0.8x) |")
    print(f"| the same, run.encode(batch_size={encode['batch']}) (the probe's batches) | | "
          f"{encode['notebook_batch']:,.0f} tokens/s | {encode['notebook_batch'] / encode['probe']:.2f}x the tokens/s |")


if __name__ == "__main__":
    main()
