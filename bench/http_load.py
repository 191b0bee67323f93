"""The server under load: 16 concurrent keep-alive clients for 60 s against `python -m app.server`
(its workers from SAESCOPE_WORKERS) over the 65,536-latent database, on SQLite and on PostgreSQL.

    .venv/bin/python bench/http_load.py [--duration 60] [--clients 16] [--workers 2] [--slices 4]
        [--repeat 0.5] [--max-requests 400000] [--workdir /tmp/saescope-bench] [--postgres URL] [--keep]
        [--app-root PATH]

The mix, drawn at random per request: a latent's page and its JSON twin (a random latent), the
SAE's latent list and its JSON twin (random sort, order and page, 50 per page), a search and its
JSON twin (a random token of the synthetic vocabulary, which is also a word of some
explanations), and, as the baseline measured in the same run, a static file of the same size
(the median size of the mix's responses) served by the same server. Bounded in time and in
requests, loopback only (the servers bind 127.0.0.1 and the clients connect there). Every answer
but a 200 (or a 304 to a repeat) counts as an error.

Clients behave as browsers do: every request accepts gzip, and a share --repeat of the page
requests (0.5 by default) ask again for a page that client fetched before, with the ETag it got
(`If-None-Match`: a revisit, the back button, a reload), as a browser revalidates a page whose
Cache-Control says so; a server without ETags answers them in full. The static file is asked for
fresh each time, as the reference. Besides each slice of the mix, a slice of the static file
alone gives the server's CPU per static request, the unit of "CPU per request / static's".
--app-root serves another checkout of the app (e.g. an export of an older commit) with this
script, to compare before and after on the same machine in the same way.

Both backends' servers run at once and the clock alternates between them in --slices turns each
(SQLite, PostgreSQL, PostgreSQL, SQLite, ...): a shared VM's speed drifts over minutes, and
measuring one backend's whole minute after the other's put that drift between them. Besides the
latencies, each backend's server CPU time per request (its processes, and PostgreSQL's) is read
from /proc: it moves far less with the VM than latency does. Prints Markdown tables for
BENCHMARKS.md. The databases are those of bench/load_throughput.py (made here if missing); the
PostgreSQL schema is dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "app"))

from cpu_time import named_cpu_seconds, tree_cpu_seconds  # noqa: E402
from load_throughput import BENCH_SCHEMA, add_run_arguments, loaded_database, run_of  # noqa: E402
from servers import free_port, running_server  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402


HOST = "127.0.0.1"  # loopback only
STATIC_NAME = "bench-same-size.html"  # written into app/static/ for the run, removed afterwards
KINDS = ("feature page", "feature .json", "latent list", "latent list .json", "search", "search .json")


def request_maker(sae_id: str, n_latents: int, per_page: int = 50, static_only: bool = False):
    pages = -(-n_latents // per_page)

    def next_request(rng: random.Random) -> tuple[str, str]:
        kind = "static, same size" if static_only else rng.choice(KINDS + ("static, same size",))
        suffix = ".json" if kind.endswith(".json") else ""
        if kind.startswith("feature"):
            return kind, f"/saes/{sae_id}/features/{rng.randrange(n_latents)}{suffix}"
        if kind.startswith("latent list"):
            sort, order = rng.choice(("density", "max_activation", "explanation_f1", "index")), rng.choice(("desc", "asc"))
            return kind, f"/saes/{sae_id}{suffix}?sort={sort}&order={order}&page={rng.randint(1, pages)}&per_page={per_page}"
        if kind.startswith("search"):  # " tok123": a token of the synthetic vocabulary and a word of explanations
            return kind, f"/search{suffix}?sae={sae_id}&q=tok{rng.randrange(1000)}"
        return kind, f"/static/{STATIC_NAME}"

    return next_request


async def fetch(reader, writer, path: str, etag: str | None = None) -> tuple[int, int, str | None]:
    """One keep-alive HTTP/1.1 GET that accepts gzip, revalidating `etag` if given: (status, body
    bytes on the wire, the answer's ETag). Our server sends Content-Length, except on a 304."""
    condition = f"If-None-Match: {etag}\r\n" if etag else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n{condition}\r\n".encode())
    status = int((await reader.readline()).split()[1])
    length, tag = None, None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "etag":
            tag = value.strip()
    if status == 304:
        length = length or 0
    if length is None:
        raise RuntimeError(f"{path}: no Content-Length")
    await reader.readexactly(length)
    return status, length, tag


async def run_clients(port: int, next_request, clients: int, duration: float, max_requests: int, seed: int,
                      repeat: float = 0.0):
    latencies: dict[str, list[float]] = defaultdict(list)
    sizes: dict[str, list[int]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    sent = 0
    deadline = time.monotonic() + duration

    async def client(i: int) -> None:
        nonlocal sent
        rng = random.Random(seed * 1000 + i)
        seen: list[tuple[str, str, str | None]] = []  # this client's pages: (kind, path, ETag)
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                kind, path = next_request(rng)
                etag = None
                if seen and kind in KINDS and rng.random() < repeat:  # a page asked for again
                    kind, path, etag = rng.choice(seen)
                start = time.perf_counter()
                try:
                    status, size, tag = await fetch(reader, writer, path, etag)
                except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError, IndexError):
                    errors[kind] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                latencies[kind].append(time.perf_counter() - start)
                sizes[kind].append(size)
                if kind in KINDS and etag is None and status == 200:
                    seen.append((kind, path, tag))
                    del seen[:-50]  # a browser's recent history
                if status != 200 and not (status == 304 and etag):
                    errors[kind] += 1
                elif status == 304:
                    latencies["repeats answered 304"].append(latencies[kind][-1])
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, sizes, errors, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


@dataclass
class Measured:
    """One backend's requests over all its slices."""

    backend: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    sizes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    elapsed: float = 0.0
    app_cpu: float = 0.0  # CPU seconds of the server's processes while it was measured
    db_cpu: float | None = None  # and of PostgreSQL's (None for SQLite: it runs inside the server)
    static_requests: int = 0  # the static-only slices: requests and the server's CPU seconds
    static_cpu: float = 0.0

    def add(self, latencies, sizes, errors, elapsed: float) -> None:
        for kind, values in latencies.items():
            self.latencies[kind] += values
        for kind, values in sizes.items():
            self.sizes[kind] += values
        for kind, count in errors.items():
            self.errors[kind] += count
        self.elapsed += elapsed


def measure(databases: dict[str, tuple[str, str]], n_latents: int, args) -> list[Measured]:
    """Every backend's server runs at once (an idle one costs nothing); the clock alternates
    between them in slices, ABBA..., so that the VM's drift over the minutes falls on all alike."""
    static = args.app_root / "app" / "static" / STATIC_NAME
    with ExitStack() as stack:
        static.write_bytes(b"<!-- placeholder -->")
        stack.enter_context(static_removed(static))
        servers = {}
        for backend, (url, sae_id) in databases.items():
            port = free_port()
            env = {"DATABASE_URL": url, "SAESCOPE_HOST": HOST, "SAESCOPE_PORT": str(port),
                   "SAESCOPE_WORKERS": str(args.workers), "SAESCOPE_ADMIN_TOKEN": ""}
            # the app of --app-root, first on the path (this checkout's is the default)
            serve = f"import runpy, sys; sys.path.insert(0, {str(args.app_root)!r}); runpy.run_module('app.server', run_name='__main__')"
            _, proc = stack.enter_context(running_server(["-c", serve], port, env))
            servers[backend] = (port, request_maker(sae_id, n_latents), proc.pid, request_maker(sae_id, n_latents, static_only=True))
        # Warm-up: every worker's connections and caches, and the mix's median response size.
        dynamic = []
        for port, next_request, _, _ in servers.values():
            warm = asyncio.run(run_clients(port, next_request, args.clients, 5, 2_000, seed=1))
            dynamic += [size for kind, values in warm[1].items() if kind in KINDS for size in values]
        same_size = sorted(dynamic)[len(dynamic) // 2]
        # random letters: gzip cannot shrink the reference below the mix's own bytes on the wire
        static.write_bytes((b"<!doctype html><p>" + base64.b64encode(os.urandom(same_size)))[:same_size])
        results = {backend: Measured(backend) for backend in servers}
        order = list(servers)
        for slice_ in range(args.slices):
            for backend in order if slice_ % 2 == 0 else order[::-1]:
                port, next_request, pid, static_request = servers[backend]
                app_before, db_before = tree_cpu_seconds(pid), named_cpu_seconds("postgres")
                results[backend].add(*asyncio.run(run_clients(
                    port, next_request, args.clients, args.duration / args.slices,
                    args.max_requests // args.slices, seed=2 + slice_, repeat=args.repeat)))
                results[backend].app_cpu += tree_cpu_seconds(pid) - app_before
                # the static file alone, a quarter of the slice: the server's CPU per static request
                static_before = tree_cpu_seconds(pid)
                static_latencies = asyncio.run(run_clients(
                    port, static_request, args.clients, args.duration / args.slices / 4,
                    args.max_requests // args.slices, seed=100 + slice_))[0]
                results[backend].static_cpu += tree_cpu_seconds(pid) - static_before
                results[backend].static_requests += sum(len(values) for values in static_latencies.values())
                if backend == "PostgreSQL":
                    db = named_cpu_seconds("postgres") - db_before
                    results[backend].db_cpu = (results[backend].db_cpu or 0.0) + db
    return list(results.values())


@contextmanager
def static_removed(path: Path):
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def report(result: Measured) -> None:
    latencies, sizes, errors = result.latencies, result.sizes, result.errors
    dynamic = [value for kind in KINDS for value in latencies[kind]]
    total = sum(len(values) for values in latencies.values())
    n_errors = sum(errors.values())
    total -= len(latencies["repeats answered 304"])  # counted already under their kind
    cpu = f"server CPU {result.app_cpu / total * 1000:.2f} ms per request"
    if result.db_cpu is not None:
        cpu += f", PostgreSQL's {result.db_cpu / total * 1000:.2f} ms"
    if result.static_requests:
        static_cpu = result.static_cpu / result.static_requests
        cpu += (f"; a static request alone {static_cpu * 1000:.2f} ms, so the mix's requests (static ones "
                f"included) cost {result.app_cpu / total / static_cpu:.1f}× a static one's CPU")
    print(f"\n**{result.backend}**: {total:,} requests in {result.elapsed:.0f} s "
          f"({total / result.elapsed:,.0f}/s), {n_errors} errors; {cpu}\n")
    print("| requests | count | median size | p50 | p99 | max |")
    print("|---|---|---|---|---|---|")
    rows = [(kind, latencies[kind], sizes[kind]) for kind in KINDS]
    rows.append(("**all pages (the mix)**", dynamic, [s for kind in KINDS for s in sizes[kind]]))
    rows.append(("static file of the same size", latencies["static, same size"], sizes["static, same size"]))
    if latencies["repeats answered 304"]:
        rows.append(("(of the mix: repeats answered 304)", latencies["repeats answered 304"], [0]))
    for name, values, body_sizes in rows:
        if values:
            print(f"| {name} | {len(values):,} | {statistics.median(body_sizes) / 1024:,.1f} KiB | "
                  f"{percentile(values, 50) * 1000:.1f} ms | {percentile(values, 99) * 1000:.1f} ms | "
                  f"{max(values) * 1000:.1f} ms |")
    static = latencies["static, same size"]
    if dynamic and static:
        print(f"\nmix p99 / static p99: {percentile(dynamic, 99) / percentile(static, 99):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per backend")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="server processes")
    parser.add_argument("--max-requests", type=int, default=400_000, help="upper bound per backend")
    parser.add_argument("--slices", type=int, default=4, help="turns per backend, alternated ABBA...")
    parser.add_argument("--repeat", type=float, default=0.5,
                        help="share of page requests that ask again for a page fetched before, with its ETag")
    parser.add_argument("--app-root", type=Path, default=ROOT, help="the checkout whose app the servers run")
    add_run_arguments(parser)
    parser.add_argument("--backend", choices=("SQLite", "PostgreSQL"), action="append")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    args = parser.parse_args()
    run = run_of(args)
    try:
        databases = {backend: loaded_database(backend, run, args) for backend in args.backend or ("SQLite", "PostgreSQL")}
        results = measure(databases, args.latents, args)
    finally:
        if not args.keep:
            admin = create_engine(args.postgres, poolclass=NullPool)
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{BENCH_SCHEMA}" CASCADE'))
            admin.dispose()
    print(f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()} · "
          f"{args.clients} clients, {args.workers} server workers, {args.duration:.0f} s per backend in "
          f"{args.slices} alternated slices · {args.repeat:.0%} of page requests repeated with their ETag · "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for result in results:
        report(result)


if __name__ == "__main__":
    main()
