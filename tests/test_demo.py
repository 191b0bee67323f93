"""`saescope demo`, the README's front door, from a machine that has nothing yet: every stage
runs into a fresh workdir, and a second run reuses each stage's output instead of redoing it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess  # the demo runs as a command, in a subprocess

SMALL = ["--layer", "1", "--latents", "256", "--k", "8", "--tokens", "16384", "--heldout-tokens", "1024",
         "--context-length", "32", "--batch-size", "64"]  # fmt: skip


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saescope.cli", "demo", "--no-serve", *args],
                          capture_output=True, text=True, timeout=600)


def test_the_demo_runs_every_stage_into_a_fresh_workdir_then_reuses_them(tiny_model_dir, tmp_path):
    workdir = tmp_path / "nothing-here-yet"
    args = ["--workdir", str(workdir), "--model", str(tiny_model_dir), *SMALL]
    first = demo(*args)
    assert first.returncode == 0, first.stderr
    for stage in ("[1/4] train:", "[2/4] eval\n", "[3/4] harvest\n", "[4/4] load into"):
        assert stage in first.stdout
    with sqlite3.connect(workdir / "saescope.db") as db:
        assert db.execute("select n_latents from saes").fetchall() == [(256,)]
        assert db.execute("select count(*) from latents").fetchone() == (256,)

    again = demo(*args)
    assert again.returncode == 0, again.stderr
    for stage in ("[1/4] train: reusing", "[2/4] eval: already done", "[3/4] harvest: already done"):
        assert stage in again.stdout
    with sqlite3.connect(workdir / "saescope.db") as db:
        assert db.execute("select count(*) from saes").fetchone() == (1,)


def test_the_demo_checks_its_database_and_port_before_any_stage(tiny_model_dir, tmp_path):
    base = ["--model", str(tiny_model_dir), *SMALL]
    missing = tmp_path / "no-such-folder" / "x.db"
    result = demo("--workdir", str(tmp_path / "a"), "--db", f"sqlite:///{missing}", *base)
    assert result.returncode == 2 and f"there is no folder {missing.parent}" in result.stderr
    assert not (tmp_path / "a").exists()  # nothing made for a run that cannot finish

    result = subprocess.run([sys.executable, "-m", "saescope.cli", "demo", "--workdir", str(tmp_path / "b"),
                             "--port", "99999", *base], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port must be from 0" in result.stderr
    assert not (tmp_path / "b").exists()

    (tmp_path / "file").write_text("")
    result = demo("--workdir", str(tmp_path / "file"), *base)
    assert result.returncode == 2 and "a file, not a folder" in result.stderr
