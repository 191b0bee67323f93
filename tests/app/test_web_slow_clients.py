"""Slow clients cannot hold the server's connections: a request head must arrive whole within
SAESCOPE_HEADER_TIMEOUT_S (app.server.HeaderTimeoutProtocol), and past
SAESCOPE_LIMIT_CONCURRENCY open connections a request gets a 503 instead of a slot."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from tests.app.servers import free_port, running_server

pytestmark = pytest.mark.multiprocess  # a server process

HEADER_TIMEOUT_S = 2.0  # room for the checks below on a busy machine; the test waits for it once
LIMIT = 4  # connections per process, the asking one included (uvicorn counts it)


def answer_of(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def status_of(url: str) -> int:
    return answer_of(url)[0]


def seconds_until_closed(conn: socket.socket, started: float) -> float:
    """Reads until the server closes the connection; its answer, if any, must be nothing."""
    conn.settimeout(HEADER_TIMEOUT_S + 4)
    try:
        assert conn.recv(1024) == b""
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_slow_request_heads_are_cut_off_and_free_their_slot(tmp_path):
    port = free_port()
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}", "SAESCOPE_PORT": str(port),
           "SAESCOPE_HOST": "127.0.0.1", "SAESCOPE_WORKERS": "1",
           "SAESCOPE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "SAESCOPE_LIMIT_CONCURRENCY": str(LIMIT)}
    with running_server(["-m", "app.server"], port, env) as (base, _):
        # A slowloris: a request line and a header, never the blank line that ends the head;
        # a second header line later does not buy it more time.
        slow = socket.create_connection(("127.0.0.1", port))
        opened = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # Keep-alive: after a first answer the next head has the same deadline; its first byte
        # cancels uvicorn's own keep-alive timer (5 s), not this one.
        reused = socket.create_connection(("127.0.0.1", port))
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):  # the whole response: head, then body "ok"
            answer += reused.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        reused.sendall(b"GET /heal")
        assert status_of(f"{base}/healthz") == 200  # meanwhile another connection is served

        # One idle connection more fills the limit: the next request is refused, not queued.
        idle = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.2)  # let the server accept it
        slow.sendall(b"X-More: 1\r\n")
        status, headers = answer_of(f"{base}/healthz")
        assert status == 503 and headers["Retry-After"] == "1"
        # Refused before the app, but with the headers every response carries.
        assert "default-src" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"

        assert seconds_until_closed(slow, opened) < HEADER_TIMEOUT_S + 1
        assert seconds_until_closed(reused, answered) < HEADER_TIMEOUT_S + 1
        seconds_until_closed(idle, opened)
        assert status_of(f"{base}/healthz") == 200  # their slots are free again
        for conn in (slow, reused, idle):
            conn.close()
