"""Real servers for the tests: a free loopback port, a server process, and waiting for it."""

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
