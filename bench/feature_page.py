"""Server time of the feature page on a database holding 65,536 latents, on SQLite and PostgreSQL.

    .venv/bin/python bench/feature_page.py [--requests 400] [--backend SQLite|PostgreSQL] [--profile]
        [bench/load_throughput.py's run and database options: --latents 65536 --workdir ... --postgres URL]

The run is bench/load_throughput.py's synthetic one (65,536 latents x 20 top + 10 quantile bins x
3 examples x 64 tokens, a 1,000-token vocabulary), loaded once into a SQLite file and a PostgreSQL
schema of the work folder's (reused when bench/load_throughput.py --keep left them). Each request
is a random latent's page, its JSON twin, or the page with full contexts, through the whole ASGI
app in-process (middleware, routing, queries, rendering; no socket), one at a time, after 50
warm-up requests. "Server time" is the app's time per request. Beside it, in the same run, the
time of the same app answering /healthz (the floor of any request) is reported. --profile runs
pyinstrument over 200 pages' queries and template instead and prints where the time goes. Prints Markdown.
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

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402

KINDS = {"feature page": "", "feature .json": ".json", "feature page, full contexts": "?context=full"}


def timed(client: TestClient, path: str) -> float:
    start = time.perf_counter()
    response = client.get(path)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, (path, response.status_code)
    return elapsed


def measure(client: TestClient, sae_id: str, n_latents: int, requests: int, rng: random.Random) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS} | {"/healthz (floor)": []}
    paths = [(kind, f"/saes/{sae_id}/features/{rng.randrange(n_latents)}{suffix}")
             for _ in range(requests) for kind, suffix in KINDS.items()]
    rng.shuffle(paths)
    for kind, path in paths[:50]:  # warm-up: connections, caches, templates
        timed(client, path)
    for kind, path in paths:
        times[kind].append(timed(client, path))
        if len(times["/healthz (floor)"]) < requests:
            times["/healthz (floor)"].append(timed(client, "/healthz"))
    return times


def profile(client: TestClient, sae_id: str, n_latents: int, rng: random.Random) -> None:
    """pyinstrument samples one thread: the page's own work (queries, then the template) is run
    here, as the route runs it, rather than through the client's server thread."""
    from pyinstrument import Profiler

    from app.features import get_feature
    from app.urls import URLs

    app = client.app
    template = app.state.templates.get_template("feature.html")
    profiler = Profiler(interval=0.0002)
    with profiler, app.state.sessions() as session:
        for index in [rng.randrange(n_latents) for _ in range(200)]:
            feature = get_feature(session, sae_id, index)
            template.render(urls=URLs(), feature=feature, trial=None, text="", window="snippet", sae_id=sae_id,
                            index=index, unavailable=None, oob=False)
    print(profiler.output_text(unicode=True, color=False, show_all=False))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per kind")
    add_run_arguments(parser)
    parser.add_argument("--backend", choices=("SQLite", "PostgreSQL"), action="append")
    parser.add_argument("--profile", action="store_true", help="profile 200 pages' queries and template")
    args = parser.parse_args()
    run = run_of(args)
    load_before = os.getloadavg()[0]
    results = []
    for backend in args.backend or ("SQLite", "PostgreSQL"):
        url, sae_id = loaded_database(backend, run, args)
        with TestClient(create_app(Settings(database_url=url))) as client:
            rng = random.Random(0)
            if args.profile:
                print(f"## {backend}")
                profile(client, sae_id, args.latents, rng)
                continue
            results.append((backend, measure(client, sae_id, args.latents, args.requests, rng)))
    if args.profile:
        return
    print(f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()} · {args.requests} requests "
          f"per kind, one at a time · load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    for backend, times in results:
        floor = statistics.median(times["/healthz (floor)"])
        print(f"\n{backend} ({args.latents:,} latents)\n")
        print("| request | p50 | p90 | p99 | p50 / /healthz |")
        print("|---|---|---|---|---|")
        for kind, values in times.items():
            print(f"| {kind} | {statistics.median(values) * 1000:.2f} ms | {percentile(values, 90) * 1000:.2f} ms | "
                  f"{percentile(values, 99) * 1000:.2f} ms | {statistics.median(values) / floor:.1f} |")


if __name__ == "__main__":
    main()
