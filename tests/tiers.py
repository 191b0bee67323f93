"""The test tiers (a pytest plugin, loaded by tests/conftest.py).

`make test` runs every test; `make test-fast` leaves out four kinds, each a marker registered in
pyproject.toml (`--strict-markers`):

- `browser`: drives Chromium through Playwright. Applied here to every test that uses the
  `browser` fixture (tests/app/conftest.py), the only way the tests open Chromium.
- `postgresql`: needs the PostgreSQL server. Carried by the "postgresql" parameter of
  tests.app.databases.BACKENDS (so by every test run on each backend, whether through a fixture's
  params or @pytest.mark.parametrize) and applied here to the tests that use `postgres_url`.
- `multiprocess`: starts another process: the CLI in a subprocess, a server, torchrun, a
  browser. Marked by hand (`@pytest.mark.multiprocess`, or a module's `pytestmark`); browser tests
  get it here.
- `slow`: measured slow, several seconds of its own or of a fixture that only it uses (the
  comment beside the marker says how slow). Marked by hand.

Marks by hand can be forgotten, so two guards check them while the tests run: a test that starts
a process without `multiprocess`, or connects to the tests' PostgreSQL server without
`postgresql`, while its fixtures are set up or while it runs, fails and says which marker it lacks
(clean-ups are not checked: see `cleaning_up`). And no test is skipped: a skip is reported as a
failure, since a skipped test checks nothing (`.ci/run` provides what the tests need: PostgreSQL,
Chromium).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest

SPAWN_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.multiprocess)  # Chromium, and the server it opens
        if "postgres_url" in fixtures:
            item.add_marker(pytest.mark.postgresql)


class _Guard:
    """What the running test may do; everything is allowed outside a test (collection, reports)."""

    item: pytest.Item | None = None
    may_spawn = True
    may_use_postgres = True


def _audit(event: str, args: tuple) -> None:
    if event in SPAWN_EVENTS and not _Guard.may_spawn:
        what = args[1] if event == "subprocess.Popen" and len(args) > 1 else args[:1]
        raise RuntimeError(f"{_Guard.item.nodeid} starts a process ({event} {what!r}) but is not marked "
                           "multiprocess: add @pytest.mark.multiprocess (tests/tiers.py)")


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only reads _Guard


def _test_server() -> tuple[str, str]:
    from sqlalchemy import make_url

    from tests.app.databases import POSTGRES

    url = make_url(POSTGRES)
    return str(url.host or "localhost"), str(url.port or 5432)


def _guarded_connect(connect):
    def guarded(conninfo: str = "", **kwargs):
        if not _Guard.may_use_postgres:
            from psycopg.conninfo import conninfo_to_dict

            params = {**(conninfo_to_dict(conninfo) if conninfo else {}), **kwargs}
            if (str(params.get("host", "localhost")), str(params.get("port", 5432))) == _test_server():
                raise RuntimeError(f"{_Guard.item.nodeid} connects to the tests' PostgreSQL but is not marked "
                                   "postgresql: take the database from tests.app.databases.BACKENDS or "
                                   "postgres_url, or add @pytest.mark.postgresql (tests/tiers.py)")
        return connect(conninfo, **kwargs)

    return guarded


@pytest.fixture(scope="session", autouse=True)
def _postgres_guard():
    import psycopg

    connect = psycopg.connect
    psycopg.connect = _guarded_connect(connect)  # what SQLAlchemy's psycopg dialect calls
    yield
    psycopg.connect = connect


@contextmanager
def _guarded(item: pytest.Item):
    _Guard.item = item
    _Guard.may_spawn = item.get_closest_marker("multiprocess") is not None
    _Guard.may_use_postgres = item.get_closest_marker("postgresql") is not None
    try:
        yield
    finally:
        _Guard.item, _Guard.may_spawn, _Guard.may_use_postgres = None, True, True


# Setting up a test's fixtures and running it are checked; tearing down is not: pytest finishes a
# fixture after the last test that needs it, in whichever test comes next.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _guarded(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _guarded(item):
        return (yield)


@contextmanager
def cleaning_up():
    """For a fixture's clean-up, which pytest may also run while it sets up a later test (when a
    parametrized fixture moves on to its next value, say): not checked."""
    saved = _Guard.may_spawn, _Guard.may_use_postgres
    _Guard.may_spawn = _Guard.may_use_postgres = True
    try:
        yield
    finally:
        _Guard.may_spawn, _Guard.may_use_postgres = saved


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        _fail_the_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if report.skipped:  # a module-level pytest.skip or importorskip
        _fail_the_skip(report)
    return report


def _fail_the_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped ({reason}): saescope's tests do not skip; provide what the test needs (.ci/run)"
