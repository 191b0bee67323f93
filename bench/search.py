"""What search by meaning costs: the search page's JSON with and without it, side by side, and the
loader's time for the search documents, on SQLite and PostgreSQL.

    .venv/bin/python bench/search.py [--requests 200] [--backend SQLite|PostgreSQL]
        [bench/load_throughput.py's run and database options: --latents 65536 --workdir ... --postgres URL]

The run is bench/load_throughput.py's synthetic one (a 1,000-token vocabulary ` tok0` .. ` tok999`,
so a query word such as `tok123` is in the documents of a few thousand latents: a common word, the
costly case). Each request is /search.json for one or two random words, through the whole ASGI app
in-process, answered in turn with search by meaning (the app as it is) and without it (its
`ranked_matches` replaced by nothing: the search before it), after 20 warm-up requests of each.
The loader's share: `search_documents` timed alone beside the whole `read_run` of the same run.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "bench", ROOT / "tests" / "app"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from fastapi.testclient import TestClient  # noqa: E402
from load_throughput import add_run_arguments, loaded_database, run_of  # noqa: E402

from app import search  # noqa: E402
from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402


def timed(client: TestClient, path: str) -> float:
    start = time.perf_counter()
    response = client.get(path)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, (path, response.status_code)
    return elapsed


def measure(client: TestClient, sae_id: str, requests: int, rng: random.Random) -> dict[str, list[float]]:
    with_meaning = search.ranked_matches
    times: dict[str, list[float]] = {"with search by meaning": [], "without (before)": []}
    queries = [" ".join(f"tok{rng.randrange(1000)}" for _ in range(rng.choice((1, 2)))) for _ in range(requests + 20)]
    for i, q in enumerate(queries):
        path = f"/search.json?sae={sae_id}&q={q.replace(' ', '+')}"
        for kind in rng.sample(list(times), 2):  # in turn, in a random order
            search.ranked_matches = with_meaning if kind.startswith("with ") else (lambda *args, **kwargs: [])
            elapsed = timed(client, path)
            if i >= 20:
                times[kind].append(elapsed)
    search.ranked_matches = with_meaning
    return times


def loader_share(run: Path) -> tuple[float, float]:
    """(seconds of read_run, of which search_documents) on the same run."""
    import app.loader as loader

    inner = loader.search_documents
    spent = []

    def timed_rows(*args):
        start = time.perf_counter()
        rows = inner(*args)
        spent.append(time.perf_counter() - start)
        return rows

    loader.search_documents = timed_rows
    try:
        start = time.perf_counter()
        loader.read_run(run)
        return time.perf_counter() - start, spent[0]
    finally:
        loader.search_documents = inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="queries, each asked with and without")
    add_run_arguments(parser)
    parser.add_argument("--backend", choices=("SQLite", "PostgreSQL"), action="append")
    args = parser.parse_args()
    run = run_of(args)
    load_before = os.getloadavg()[0]
    read, documents = loader_share(run)
    results = []
    for backend in args.backend or ("SQLite", "PostgreSQL"):
        url, sae_id = loaded_database(backend, run, args)
        with TestClient(create_app(Settings(database_url=url))) as client:
            results.append((backend, measure(client, sae_id, args.requests, random.Random(0))))
    print(f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()} · {args.requests} queries "
          f"· load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"\nread_run of {args.latents:,} latents: {read:.1f} s, of which the search documents {documents:.1f} s "
          f"({documents / read:.0%})")
    for backend, times in results:
        base = statistics.median(times["without (before)"])
        print(f"\n{backend} ({args.latents:,} latents)\n")
        print("| /search.json | p50 | p90 | p50 / before |")
        print("|---|---|---|---|")
        for kind, values in times.items():
            p90 = statistics.quantiles(values, n=10)[-1]
            print(f"| {kind} | {statistics.median(values) * 1000:.1f} ms | {p90 * 1000:.1f} ms | "
                  f"{statistics.median(values) / base:.1f} |")


if __name__ == "__main__":
    main()
