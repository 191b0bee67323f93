"""Real servers for the tests: a free loopback port, a server process, and waiting for it; and
the real browser that opens their pages (the `browser` fixture of conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SAESCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SHOTS = Path(os.environ.get("SAESCOPE_SHOTS", "/tmp/shots"))  # screenshots to look at


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args: list[str], port: int, env: dict | None = None, timeout: float = 60):
    """Start `python ARGS` in the repository, wait until /healthz answers, yield its base URL,
    and stop it (SIGTERM, then SIGKILL) afterwards. Its output (access log included) goes to a
    temporary file, not a pipe: a pipe nobody reads fills up and blocks the server."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{base}/healthz", timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(log.read().decode(errors="replace")) from None
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def chromium():
    """Debian's Chromium under Playwright. No skipping: `make test` installs it (`make browser`)."""
    import playwright.sync_api as playwright_api

    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium)"
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
