"""`saescope load` and `saescope serve` default to the database the server's Settings would use:
the same variables, the same precedence, the same default."""

from __future__ import annotations

import os
import time

import pytest

from app.settings import Settings
from saescope.cli import default_db


@pytest.fixture
def env(monkeypatch):
    """An environment with no database variable in it."""
    for name in list(os.environ):
        if name.upper().endswith("DATABASE_URL"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("variables, expected", [
    ({}, Settings.model_fields["database_url"].default),
    ({"DATABASE_URL": "sqlite:///main.db"}, "sqlite:///main.db"),
    ({"SAESCOPE_DATABASE_URL": "sqlite:///alias.db"}, "sqlite:///alias.db"),
    ({"DATABASE_URL": "sqlite:///main.db", "SAESCOPE_DATABASE_URL": "sqlite:///alias.db"}, "sqlite:///main.db"),
    ({"OTHER_DATABASE_URL": "sqlite:///other.db"}, Settings.model_fields["database_url"].default),
])
def test_default_db_reads_what_settings_read(env, variables, expected):
    for name, value in variables.items():
        env.setenv(name, value)
    assert default_db() == expected == Settings().database_url


def test_default_db_ignores_other_settings(env):
    env.setenv("SAESCOPE_DATABASE_URL", "sqlite:///alias.db")
    env.setenv("SAESCOPE_ADMIN_TOKEN", "short")  # Settings() refuses it; `saescope train` must not care
    assert default_db() == "sqlite:///alias.db"


@pytest.mark.multiprocess
def test_serve_listens_where_the_settings_say_unless_told(tmp_path):
    """SAESCOPE_PORT and SAESCOPE_HOST reach `saescope serve` (its flags only override them)."""
    from tests.app.servers import free_port, running_server

    port = free_port()
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    with running_server(["-m", "saescope.cli", "serve", "--db", db], port,
                        env={"SAESCOPE_PORT": str(port), "SAESCOPE_HOST": "127.0.0.1"}) as (base, _):
        assert base.endswith(f":{port}")
    other = free_port()
    with running_server(["-m", "saescope.cli", "serve", "--db", db, "--port", str(other)], other,
                        env={"SAESCOPE_PORT": str(port)}) as (base, _):
        assert base.endswith(f":{other}")


def test_the_port_to_listen_on():
    from saescope.cli import CommandError, listening_port

    assert listening_port("127.0.0.1", 8123) == 8123
    assert 0 < listening_port("127.0.0.1", 0) < 65536
    with pytest.raises(CommandError, match="cannot listen on no-such-host.invalid"):
        listening_port("no-such-host.invalid", 0)


@pytest.mark.multiprocess
def test_serve_on_port_0_says_the_port_it_listens_on(tmp_path):
    """--port 0 asks for any free port: the line printed names the real one, where it answers."""
    import subprocess
    import sys
    import urllib.request

    process = subprocess.Popen([sys.executable, "-m", "saescope.cli", "serve", "--db", f"sqlite:///{tmp_path / 'e.db'}",
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving ") and ":0/" not in line, line
        url = line.split(" at ")[1].strip()
        deadline = time.monotonic() + 60
        while True:
            try:
                assert urllib.request.urlopen(url + "healthz", timeout=2).read() == b"ok"
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.multiprocess
@pytest.mark.parametrize("variable, value, says", [
    ("SAESCOPE_ADMIN_TOKEN", "short", "setting SAESCOPE_ADMIN_TOKEN: admin_token must be at least 16 characters"),
    ("SAESCOPE_WORKERS", "0", "setting SAESCOPE_WORKERS: Input should be greater than or equal to 1"),
    ("SAESCOPE_PORT", "http", "setting SAESCOPE_PORT: Input should be a valid integer"),
])
def test_a_bad_setting_stops_serve_with_one_line(tmp_path, variable, value, says):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "saescope.cli", "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, **{variable: value}))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"saescope serve: error: {says}") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "x.db").exists()
