"""How fast `saescope load` writes: example rows per second into SQLite and into PostgreSQL, for a
synthetic run of 65,536 latents x 50 examples (20 top + 10 quantile bins x 3 samples: 3,276,800
example rows), written by trainer.runfolder's own save functions (tests/synthetic.py's
random_harvest: every other table of the harvest comes along, at its real shape).

    .venv/bin/python bench/load_throughput.py [--latents 65536] [--top 20] [--quantile-bins 10]
        [--samples-per-bin 3] [--context-length 64] [--workdir /tmp/saescope-bench] [--postgres URL] [--keep]

Each backend gets a fresh database: a SQLite file in the work folder, and a schema of its own in
the PostgreSQL database at --postgres (dropped afterwards unless --keep, which bench/http_load.py
and bench/feature_page.py then reuse). The run folder is cached in the work folder. Prints a
Markdown table for BENCHMARKS.md. (The comparison with the schema before migration 0003, whose
examples had foreign keys, is gone: today's loader writes tables that schema lacks.)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests" / "app"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from app.db import make_engine, upgrade  # noqa: E402
from app.loader import load_run, read_run, write_in_one_transaction  # noqa: E402
from webrun import make_synthetic_run  # noqa: E402

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BENCH_SCHEMA = "saescope_bench"


def synthetic_run(workdir: Path, n_latents: int, top: int, quantile_bins: int, samples_per_bin: int,
                  context_length: int) -> Path:
    """The run folder, made once per size and kept in the work folder (a folder of the old
    harvest format is made again)."""
    run = workdir / f"run-{n_latents}x{top}+{quantile_bins}x{samples_per_bin}x{context_length}"
    if not (run / "harvest" / "tokens.safetensors").is_file():
        start = time.perf_counter()
        make_synthetic_run(run, n_latents=n_latents, n_examples=top, context_length=context_length,
                           n_contexts=n_latents, model="bench/Synthetic-Model", quantile_bins=quantile_bins,
                           samples_per_bin=samples_per_bin)
        print(f"made {run} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return run


def sqlite_url(workdir: Path, run: Path) -> str:
    return f"sqlite:///{workdir / (run.name + '.db')}"


def postgres_url(base: str, schema: str = BENCH_SCHEMA) -> str:
    return f"{base}?options=-csearch_path%3D{schema}"


@contextmanager
def fresh_postgres_schema(base: str, schema: str, keep: bool):
    admin = create_engine(base, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield postgres_url(base, schema)
    finally:
        if not keep:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def fresh_sqlite(url: str) -> str:
    path = Path(url.removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return url


def timed_load(rows, url: str) -> float:
    """Seconds for the write transaction alone (the run is read and the schema made before)."""
    upgrade(url)
    engine = make_engine(url)
    try:
        start = time.perf_counter()
        assert write_in_one_transaction(engine, rows)
        return time.perf_counter() - start
    finally:
        engine.dispose()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic run's size and where it and the databases live (every load/page benchmark)."""
    parser.add_argument("--latents", type=int, default=65_536)
    parser.add_argument("--top", type=int, default=20, help="top examples per latent")
    parser.add_argument("--quantile-bins", type=int, default=10)
    parser.add_argument("--samples-per-bin", type=int, default=3, help="examples sampled per quantile bin")
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/saescope-bench"))
    parser.add_argument("--postgres", default=os.environ.get("SAESCOPE_BENCH_POSTGRES", DEFAULT_POSTGRES))


def run_of(args: argparse.Namespace) -> Path:
    """The run the arguments describe (made once, in the work folder)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    return synthetic_run(args.workdir, args.latents, args.top, args.quantile_bins, args.samples_per_bin, args.context_length)


def loaded_database(backend: str, run: Path, args: argparse.Namespace) -> tuple[str, str]:
    """(database URL, SAE id) of `run` loaded into the work folder's SQLite file or PostgreSQL
    schema (a no-op when --keep left it loaded), with the statistics and visibility map that a
    shared server's autovacuum would have made (for bench/http_load.py, bench/feature_page.py)."""
    url = sqlite_url(args.workdir, run) if backend == "SQLite" else postgres_url(args.postgres)
    if backend == "PostgreSQL":
        admin = create_engine(args.postgres, poolclass=NullPool)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{BENCH_SCHEMA}"'))
        admin.dispose()
    start = time.perf_counter()
    sae_id = load_run(run, url)
    print(f"{backend}: {sae_id} ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    engine = make_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE" if backend == "PostgreSQL" else "ANALYZE")
        if backend == "PostgreSQL":
            conn.exec_driver_sql("CHECKPOINT")
    engine.dispose()
    # The load's dirty pages reach the disk now, not during the measurement that follows (a
    # freshly written SQLite file of ~1 GB was being written back while its minute ran).
    os.sync()
    return url, sae_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--keep", action="store_true", help="keep the databases for bench/http_load.py")
    args = parser.parse_args()
    run = run_of(args)
    start = time.perf_counter()
    rows = read_run(run)
    read_s = time.perf_counter() - start
    n_examples, n_rows = len(rows.tables["examples"]), rows.n_rows
    results = []

    url = fresh_sqlite(sqlite_url(args.workdir, run))
    results.append(("SQLite (executemany, WAL)", timed_load(rows, url)))
    if not args.keep:
        fresh_sqlite(url)
    with fresh_postgres_schema(args.postgres, BENCH_SCHEMA, keep=args.keep) as url:
        results.append(("PostgreSQL (binary COPY)", timed_load(rows, url)))

    print(f"{platform.node()} · {os.cpu_count()} cores · {platform.python_version()} · "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    per_latent = args.top + args.quantile_bins * args.samples_per_bin
    print(f"run: {args.latents:,} latents x {per_latent} examples x {args.context_length} tokens = "
          f"{n_examples:,} example rows, {n_rows:,} rows in all; reading and checking the run folder: "
          f"{read_s:.1f} s (once, before either database)\n")
    print("| database | write transaction | example rows/s | all rows/s |")
    print("|---|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.1f} s | {n_examples / seconds:,.0f} | {n_rows / seconds:,.0f} |")


if __name__ == "__main__":
    main()
