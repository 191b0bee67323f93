"""`saescope load` is one transaction: a real loader process SIGKILLed at several points leaves
the database exactly as it was, or with the run fully loaded; never anything in between.

The loader logs each phase on stderr ("writing N latents rows", ..., "committing"); the test
waits for a phase, kills the process there (or a moment later), then checks every table's
counts and the database's integrity. At the end one load runs to completion and a second one is
a no-op.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from app.db import make_engine
from app.loader import load_run, read_run
from tests.app.databases import BACKENDS, empty_database
from tests.app.webrun import make_synthetic_run, table_counts

pytestmark = pytest.mark.multiprocess  # loads in subprocesses, killed

ROOT = Path(__file__).resolve().parents[2]
# (phase the loader announces, seconds to wait after it, must the database be unchanged?)
KILL_POINTS = [
    ("writing", "latents rows", 0.0, True),
    ("writing", "examples rows", 0.0, True),  # in the middle of the biggest table
    ("writing", "examples rows", 0.25, False),
    ("committing", "", 0.0, False),  # the commit may or may not have happened: either state is fine
]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """Big enough that writing its examples takes a while (131,072 example rows). Its contexts are
    fewer: each loader start reads every one into the search documents before it writes."""
    return make_synthetic_run(tmp_path_factory.mktemp("big") / "run", n_latents=4096, n_examples=32,
                              context_length=32, n_contexts=1024)


def start_loader(run: Path, url: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "saescope.cli", "load", str(run), "--db", url],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, *words: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if all(word in line for word in words):
            return line
    proc.kill()
    raise AssertionError(f"the loader never said {' '.join(words)!r}; it said:\n{''.join(seen)}")


def integrity_problems(url: str) -> list[str]:
    engine = make_engine(url)
    problems = []
    orphans = {
        "examples without their latent": "SELECT count(*) FROM examples e WHERE NOT EXISTS (SELECT 1 FROM latents l "
                                         "WHERE l.sae_id = e.sae_id AND l.\"index\" = e.latent_index)",
        "examples without their context": "SELECT count(*) FROM examples e WHERE NOT EXISTS (SELECT 1 FROM contexts c "
                                          "WHERE c.sae_id = e.sae_id AND c.context_id = e.context_id)",
        "latents without their SAE": "SELECT count(*) FROM latents l WHERE NOT EXISTS (SELECT 1 FROM saes s WHERE s.id = l.sae_id)",
        "contexts without their SAE": "SELECT count(*) FROM contexts c WHERE NOT EXISTS (SELECT 1 FROM saes s WHERE s.id = c.sae_id)",
        "SAEs missing latents": "SELECT count(*) FROM saes s WHERE s.n_latents <> (SELECT count(*) FROM latents l WHERE l.sae_id = s.id)",
        **{f"{table} without their SAE": f"SELECT count(*) FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM saes s WHERE s.id = t.sae_id)"
           for table in ("latent_details", "vocab", "token_latents", "explanation_terms")},
        "SAEs missing latent details": "SELECT count(*) FROM saes s WHERE s.n_latents <> "
                                       "(SELECT count(*) FROM latent_details d WHERE d.sae_id = s.id)",
    }
    try:
        with engine.connect() as conn:
            for what, sql in orphans.items():
                if n := conn.execute(text(sql)).scalar_one():
                    problems.append(f"{n} {what}")
            if engine.dialect.name == "sqlite":
                if (check := conn.exec_driver_sql("PRAGMA integrity_check").scalar_one()) != "ok":
                    problems.append(check)
    finally:
        engine.dispose()
    return problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_any_point_leaves_before_or_after(backend, tmp_path, run_dir, big_run):
    rows = read_run(big_run)
    with empty_database(backend, tmp_path) as url:
        load_run(run_dir, url)  # another SAE is already there and must survive untouched
        before = table_counts(url)
        after = {"saes": before["saes"] + 1} | {name: before[name] + len(table) for name, table in rows.tables.items() if name in before}
        outcomes = []
        for *words, delay, unchanged in KILL_POINTS:
            proc = start_loader(big_run, url)
            wait_for(proc, *words)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
            state = table_counts(url)
            assert state in (before, after), f"killed at {words} +{delay}s: partial state {state}"
            if unchanged:
                assert state == before, f"killed at {words}: the transaction cannot have committed yet"
            assert integrity_problems(url) == []
            outcomes.append(state == after)
            if state == after:
                break  # loaded: a later load would be a no-op, nothing left to interrupt
        # The database is usable: the next load completes (or finds the run already loaded).
        proc = start_loader(big_run, url)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        assert table_counts(url) == after and integrity_problems(url) == []
        assert load_run(big_run, url) == rows.sae_id and table_counts(url) == after  # twice: a no-op
        assert outcomes[:2] == [False, False]


# ------------------------------------------------------------ kills at "committing", and during a --replace

SAE_TABLES = ("latents", "latent_details", "contexts", "examples", "vocab", "token_latents", "explanation_terms")


def sae_snapshot(url: str, sae_id: str) -> dict:
    """What tells one load of `sae_id` from another, or from a mix of two: the SAE's row, its rows
    per table, sums over its examples, and its first and last latents and examples."""
    engine = make_engine(url)
    key = {"id": sae_id}
    try:
        with engine.connect() as conn:
            def rows(sql: str) -> list[tuple]:
                return [tuple(row) for row in conn.execute(text(sql), key).all()]

            return {
                "sae": rows("SELECT id, content_hash, n_latents, n_explained, run_dir, metrics, harvest "
                            "FROM saes WHERE id = :id"),
                "counts": {table: conn.execute(text(f"SELECT count(*) FROM {table} WHERE sae_id = :id"), key).scalar_one()
                           for table in SAE_TABLES},
                "example_sums": rows("SELECT sum(latent_index), sum(\"bin\"), sum(\"rank\"), sum(context_id), "
                                     "sum(position) FROM examples WHERE sae_id = :id"),
                **{f"examples_{order}": rows("SELECT latent_index, \"bin\", \"rank\", context_id, position, max_activation, "
                                             f"activations FROM examples WHERE sae_id = :id ORDER BY latent_index {order}, "
                                             f"\"bin\" {order}, \"rank\" {order} LIMIT 40")
                   for order in ("ASC", "DESC")},
                **{f"latents_{order}": rows("SELECT \"index\", density, max_activation, mean_activation, explanation "
                                            f"FROM latents WHERE sae_id = :id ORDER BY \"index\" {order} LIMIT 20")
                   for order in ("ASC", "DESC")},
                "contexts": rows("SELECT context_id, tokens FROM contexts WHERE sae_id = :id ORDER BY context_id LIMIT 5"),
                "terms": rows("SELECT term, latent, score FROM explanation_terms WHERE sae_id = :id "
                              "ORDER BY term, latent LIMIT 20"),
            }
    finally:
        engine.dispose()


def start_replacer(run: Path, url: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "saescope.cli", "load", str(run), "--db", url, "--replace"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_at(proc: subprocess.Popen, words: tuple[str, ...], delay: float) -> None:
    wait_for(proc, *words)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # killed, not finished


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """The same SAE id as big_run (model, layer, size, k) from other files, with other row counts
    (fewer examples and contexts, another seed): what a `--replace` of big_run swaps out."""
    return make_synthetic_run(tmp_path_factory.mktemp("old") / "run", n_latents=4096, n_examples=8,
                              context_length=32, n_contexts=512, seed=1)


# (what the loader says, seconds to wait after it, must the old run still be there?)
REPLACE_KILL_POINTS = [
    (("replacing",), 0.0, True),  # deleting the old rows
    (("writing", "examples rows"), 0.0, True),  # old rows deleted, the new SAE and some tables written
    (("committing",), 0.0, False),  # the commit may or may not have happened
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_during_replace_keeps_the_old_run_or_the_new_one(backend, tmp_path, run_dir, old_run, big_run):
    """`saescope load --replace` deletes the old rows and writes the new ones in one transaction: a
    kill at any point leaves exactly the old run (never no run, never a mix), or past the commit
    exactly the new one."""
    with empty_database(backend, tmp_path) as url:
        other = load_run(run_dir, url)  # another SAE, which no replace may touch
        other_before = sae_snapshot(url, other)
        old_id = load_run(big_run, url)
        new, counts_new = sae_snapshot(url, old_id), table_counts(url)
        assert load_run(old_run, url, replace=True) == old_id
        old, counts_old = sae_snapshot(url, old_id), table_counts(url)
        assert old["sae"] and old["counts"] != new["counts"] and old["sae"] != new["sae"]  # tellable apart

        for words, delay, must_be_old in REPLACE_KILL_POINTS:
            kill_at(start_replacer(big_run, url), words, delay)
            state, counts = sae_snapshot(url, old_id), table_counts(url)
            assert integrity_problems(url) == []
            assert sae_snapshot(url, other) == other_before
            if must_be_old:
                assert state == old and counts == counts_old, f"killed at {words} +{delay}s: the old run is not intact"
            else:
                assert (state, counts) in ((old, counts_old), (new, counts_new)), \
                    f"killed at {words} +{delay}s: neither the old run nor the new one: {counts}"
            if state == new and words != REPLACE_KILL_POINTS[-1][0]:  # put the old run back for the next kill
                load_run(old_run, url, replace=True)
                assert sae_snapshot(url, old_id) == old

        # The database is usable: the replace completes, and the same replace again is a no-op.
        assert load_run(big_run, url, replace=True) == old_id
        assert sae_snapshot(url, old_id) == new and table_counts(url) == counts_new
        assert sae_snapshot(url, other) == other_before and integrity_problems(url) == []
        assert load_run(big_run, url, replace=True) == old_id and sae_snapshot(url, old_id) == new


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_committing_leaves_before_or_after(backend, tmp_path, run_dir, big_run):
    """The kill loop above stops once a kill lands after the commit, so its last point may go
    unvisited: here a fresh load is killed the moment it says "committing"."""
    rows = read_run(big_run)
    with empty_database(backend, tmp_path) as url:
        other = load_run(run_dir, url)
        other_before, before = sae_snapshot(url, other), table_counts(url)
        after = {"saes": before["saes"] + 1} | {name: before[name] + len(table) for name, table in rows.tables.items() if name in before}
        kill_at(start_loader(big_run, url), ("committing",), 0.0)
        state = table_counts(url)
        assert state in (before, after), f"killed at committing: partial state {state}"
        assert integrity_problems(url) == [] and sae_snapshot(url, other) == other_before
        if state == after:  # committed before the kill landed: the run is there, from these files
            assert sae_snapshot(url, rows.sae_id)["sae"][0][1] == rows.sae["content_hash"]
            return
        assert sae_snapshot(url, rows.sae_id)["sae"] == []  # not committed: no trace, and the next load completes
        assert load_run(big_run, url) == rows.sae_id
        assert table_counts(url) == after and integrity_problems(url) == []
