"""saescope installed from its wheel, as a user gets it, works away from the repository: the wheel
is built from a copy of the sources, installed (--no-deps) into a fresh virtual environment, and
`saescope serve` started from an unrelated folder migrates a fresh SQLite database and serves the
pages, the static files and htmx, all from the installed package; `alembic` by hand (what
docker-compose's migrate service runs) finds the installed migrations too.

Installing torch and the rest again would take minutes: the fresh environment sees this one's
packages through a .pth file that lists this environment's site-packages. A plain path line of a
.pth file does not run that folder's own .pth files, so a development (editable) install of
saescope there stays out of sight: `app` and `saescope` can only come from the wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # about 15 s: builds, installs, serves

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "app", "trainer", "saescope"]  # what a build reads


def clean_env() -> dict[str, str]:
    """This process's environment without what would point Python at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(*args, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the build's files stay out of the checkout)."""
    npm_htmx = ROOT / "node_modules" / "htmx.org" / "dist" / "htmx.min.js"
    assert npm_htmx.is_file(), "no htmx in node_modules: run `make setup` (npm install)"
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    (source / "node_modules").symlink_to((ROOT / "node_modules").resolve(), target_is_directory=True)
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, source,
        cwd=dist)
    shutil.rmtree(source)  # nothing installed may point back at the build's files
    (built,) = dist.glob("saescope-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh environment with the wheel installed in it, seeing this one's dependencies."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=clean_env())
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "saescope-test-dependencies.pth").write_text("".join(f"{folder}\n" for folder in ours))
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=venv)
    return venv


def test_the_installed_package_is_the_wheel(venv, tmp_path):
    where = run(venv / "bin" / "python", "-c",
                "import app, saescope, trainer, app.resources as r; "
                "print(app.__file__, saescope.__file__, trainer.__file__, r.htmx_dir(), r.MIGRATIONS_DIR, sep='\\n')",
                cwd=tmp_path).split()
    site = venv.resolve()
    for path in where:
        assert Path(path).resolve().is_relative_to(site), f"{path} is not in the fresh environment {site}"
    assert not any(Path(path).resolve().is_relative_to(ROOT) for path in where)


def test_saescope_serve_migrates_a_fresh_database_and_serves_pages_and_htmx(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no repository, no node_modules, no migrations here
    elsewhere.mkdir()
    db = elsewhere / "fresh.db"
    log_path = elsewhere / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([str(venv / "bin" / "saescope"), "serve", "--db", f"sqlite:///{db}",
                                   "--host", "127.0.0.1", "--port", "0"],
                                  cwd=elsewhere, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        base = wait_for_server(server, log_path)
        index = fetch(f"{base}/")
        static = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', index))  # htmx, our CSS and JS, the icon
        (htmx,) = [path for path in static if "htmx" in path]
        assert fetch(f"{base}{htmx}").startswith("var htmx=")  # npm's htmx.min.js, shipped in the package
        assert all(fetch(f"{base}{path}") for path in static)
        assert any(re.fullmatch(r"/static/style\.[0-9a-f]{10}\.css", path) for path in static)  # hashed: immutable
        assert "<html" in fetch(f"{base}/api")
    finally:
        server.terminate()
        server.wait(timeout=30)
    with sqlite3.connect(db) as conn:  # migrated by the server on start, to the head of the migrations
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrations_head(),)]


def test_alembic_by_hand_finds_the_installed_migrations(venv, tmp_path):
    """docker-compose's migrate service: `alembic upgrade head` beside a copy of alembic.ini, with the
    package installed and no sources."""
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    db = tmp_path / "by-hand.db"
    env = {k: v for k, v in clean_env().items() if not k.upper().endswith("DATABASE_URL")} | {"DATABASE_URL": f"sqlite:///{db}"}
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "alembic", "-c", "alembic.ini", "upgrade", "head"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrations_head(),)]


def migrations_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()


def wait_for_server(server: subprocess.Popen, log_path: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace")
        if server.poll() is not None:
            pytest.fail(f"saescope serve exited with {server.returncode}:\n{log}")
        if found := re.search(r"serving \S+ at (http://[\d.]+:\d+)/", log):
            try:
                if urllib.request.urlopen(f"{found.group(1)}/healthz", timeout=1).status == 200:
                    return found.group(1)
            except OSError:
                pass
        time.sleep(0.1)
    pytest.fail(f"saescope serve did not answer:\n{log_path.read_text(errors='replace')}")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        return response.read().decode()
