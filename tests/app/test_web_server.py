"""The deployment's server: `python -m app.server` (what docker-compose runs), several uvicorn
workers, configured only by the environment, on PostgreSQL."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.loader import load_run
from tests.app.servers import free_port, running_server

pytestmark = pytest.mark.multiprocess  # a server process with several workers


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_several_workers_configured_by_the_environment(postgres_url, run_dir, synthetic_sae_id):
    load_run(run_dir, postgres_url)
    port = free_port()
    env = {"DATABASE_URL": postgres_url, "SAESCOPE_HOST": "127.0.0.1", "SAESCOPE_PORT": str(port),
           "SAESCOPE_WORKERS": "2", "SAESCOPE_ADMIN_TOKEN": ""}
    with running_server(["-m", "app.server"], port, env) as (base, proc):
        assert len(children(proc.pid)) >= 2  # uvicorn's supervisor and its worker processes
        for _ in range(8):  # several connections: whichever worker answers, the same app
            with urllib.request.urlopen(f"{base}/index.json", timeout=10) as response:
                assert [sae["id"] for sae in json.load(response)["saes"]] == [synthetic_sae_id]
                assert "nosniff" == response.headers["X-Content-Type-Options"]
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                assert response.headers.get("Server") is None  # no server banner
        request = urllib.request.Request(f"{base}/api/saes/{synthetic_sae_id}", method="DELETE")
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError("DELETE without a token must fail")
        except urllib.error.HTTPError as e:
            assert e.code == 403  # empty SAESCOPE_ADMIN_TOKEN: writes are off
        # Request line + headers are bounded too (h11 buffers at most the limit plus one read;
        # httptools would buffer any size): a 1 MB header is refused, never answered 200.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
                answer = raw.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                answer = b"connection reset"
            assert answer.startswith(b"HTTP/1.1 400") or answer in (b"connection reset", b""), answer
