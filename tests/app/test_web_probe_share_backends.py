"""Share links on both backends (tests/test_probe_share.py covers the pages, on SQLite only): the
tiny real run loaded into a SQLite file and into a PostgreSQL schema, shared through the HTTP API,
reopened by a restarted app, raced by two writers, and its created_at read back with a time zone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db import make_engine, session_factory
from app.main import create_app
from app.models import ShareLink
from app.settings import Settings
from app.shares import create_share, share_digest
from tests.app.databases import BACKENDS, empty_database

TEXT = "def total(xs):\n    return sum(x * 2 for x in xs)  # <b>twice</b>"


@pytest.fixture(scope="module", params=BACKENDS)
def share_db(request, tmp_path_factory, tiny_run) -> Iterator[str]:
    """The tiny real run (tests/conftest.py) loaded into each backend once for this module."""
    from app.loader import load_run

    with empty_database(request.param, tmp_path_factory.mktemp("share-db")) as url:
        load_run(tiny_run, url)
        yield url


@pytest.fixture(scope="module")
def share_client(share_db) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=share_db))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def sessions(share_db):
    engine = make_engine(share_db)
    yield session_factory(engine)
    engine.dispose()


def rows_of(sessions, sae: str, text: str) -> list[str]:
    with sessions() as session:
        return session.execute(select(ShareLink.id).where(ShareLink.sae_id == sae, ShareLink.text == text)).scalars().all()


def test_sharing_twice_gives_the_same_link(share_client, sessions, tiny_sae_id, share_db):
    text = f"{TEXT}\n# twice on {share_db.split(':', 1)[0]}"
    first = share_client.post("/api/share", json={"sae": tiny_sae_id, "text": text})
    assert first.status_code == 201, first.text
    made = first.json()
    assert made["id"] == share_digest(tiny_sae_id, text)[:10]
    assert (made["sae"], made["text"], made["sae_changed"]) == (tiny_sae_id, text, False)
    assert made["url"] == f"/p/{made['id']}" and made["json_url"] == f"/p/{made['id']}.json"

    again = share_client.post("/api/share", json={"sae": tiny_sae_id, "text": text})
    assert again.status_code == 200, again.text
    assert again.json() == made  # the same link, created_at included

    # the page's share button finds the same link rather than making another
    form = share_client.post("/probe/share", data={"sae": tiny_sae_id, "text": text}, follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"] == made["url"]
    assert rows_of(sessions, tiny_sae_id, text) == [made["id"]]


def test_a_link_survives_an_app_restart(share_client, share_db, tiny_sae_id):
    made = share_client.post("/api/share", json={"sae": tiny_sae_id, "text": TEXT})
    assert made.status_code in (200, 201)
    share_id = made.json()["id"]
    before = share_client.get(f"/p/{share_id}.json")
    assert before.status_code == 200
    before = before.json()
    assert before["error"] is None and before["probe"] is not None
    direct = share_client.post("/api/probe", json={"sae": tiny_sae_id, "text": TEXT}).json()

    with TestClient(create_app(Settings(database_url=share_db))) as restarted:  # nothing in memory
        assert restarted.app.state.probe.loaded() == []
        after = restarted.get(f"/p/{share_id}.json")
        assert after.status_code == 200, after.text
        after = after.json()
    assert after["id"] == share_id and after["sae"] == tiny_sae_id and after["text"] == TEXT
    assert after["error"] is None
    tokens = [(t["token"], t["token_id"]) for t in after["probe"]["tokens"]]
    assert len(tokens) > 5 and "".join(token for token, _ in tokens).strip() != ""
    assert tokens == [(t["token"], t["token_id"]) for t in before["probe"]["tokens"]]
    assert after["probe"]["tokens"] == direct["tokens"]  # the same view as probing the text directly
    assert after == before


def test_two_writers_racing_on_a_new_text_share_one_row(sessions, tiny_sae_id, share_db):
    """Writer A looks the id up (absent), writer B makes the link, then A inserts: A's insert
    conflicts, and create_share must answer B's link rather than fail or make a second row."""
    text = f"{TEXT}\n# raced on {share_db.split(':', 1)[0]}"
    share_id = share_digest(tiny_sae_id, text)[:10]
    lookups: list[object] = []
    raced: list[tuple] = []
    with sessions() as a, sessions() as b:
        original_get = a.get

        def get_then_lose_the_race(entity, ident, **kwargs):
            row = original_get(entity, ident, **kwargs)
            if entity is ShareLink:
                lookups.append(row)
                if not raced:
                    raced.append(create_share(b, tiny_sae_id, text))  # B commits between A's lookup and insert
            return row

        a.get = get_then_lose_the_race
        a_share, a_created = create_share(a, tiny_sae_id, text)

    b_share, b_created = raced[0]
    assert b_created is True and a_created is False
    assert a_share.id == b_share.id == share_id and a_share.text == text
    assert a_share == b_share  # created_at too: both read B's row
    assert lookups[0] is None and lookups[1] is not None  # A went through the insert-conflict path
    assert len(lookups) == 2
    assert rows_of(sessions, tiny_sae_id, text) == [share_id]


def test_two_requests_racing_on_a_new_text_share_one_row(request, share_client, sessions, tiny_sae_id, share_db):
    """Two POST /api/share of the same new text, each held after its lookup until the other has
    looked too: both find no link, both insert; one makes it (201), the other answers it (200)."""  # the loser's answer is a 500
    text = f"{TEXT}\n# two requests on {share_db.split(':', 1)[0]}"
    both_looked = threading.Barrier(2, timeout=10)
    lookups: list[object] = []
    make_session = share_client.app.state.sessions

    def racing_session():
        session = make_session()
        original_get, held = session.get, []

        def get(entity, ident, **kwargs):
            row = original_get(entity, ident, **kwargs)
            if entity is ShareLink:
                lookups.append(row)
                if not held:  # only the first lookup waits, not the one after a conflict
                    held.append(True)
                    both_looked.wait()
            return row

        session.get = get
        return session

    answers: list = [None, None]

    def share(i: int) -> None:
        answers[i] = share_client.post("/api/share", json={"sae": tiny_sae_id, "text": text})

    share_client.app.state.sessions = racing_session  # (monkeypatch would delete it from starlette's State)
    try:
        threads = [threading.Thread(target=share, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        share_client.app.state.sessions = make_session

    assert sorted(answer.status_code for answer in answers) == [200, 201], [answer.text for answer in answers]
    first, second = (answer.json() for answer in answers)
    assert first == second and first["id"] == share_digest(tiny_sae_id, text)[:10]  # created_at too
    assert lookups[:2] == [None, None] and len(lookups) == 3 and lookups[2] is not None  # one conflict, read back
    assert rows_of(sessions, tiny_sae_id, text) == [first["id"]]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ShareLink).where(ShareLink.id == first["id"])) == 1


def test_created_at_round_trips_with_a_time_zone(share_client, share_db, sessions, tiny_sae_id):
    text = f"{TEXT}\n# when on {share_db.split(':', 1)[0]}"
    before = datetime.now(timezone.utc)
    made = share_client.post("/api/share", json={"sae": tiny_sae_id, "text": text})
    after = datetime.now(timezone.utc)
    assert made.status_code == 201
    created = datetime.fromisoformat(made.json()["created_at"])
    assert created.tzinfo is not None and created.utcoffset() is not None
    assert before - timedelta(seconds=1) <= created <= after + timedelta(seconds=1)

    with TestClient(create_app(Settings(database_url=share_db))) as restarted:
        read = restarted.get(made.json()["json_url"]).json()["created_at"]
        again = restarted.post("/api/share", json={"sae": tiny_sae_id, "text": text}).json()["created_at"]
    reread = datetime.fromisoformat(read)
    assert reread.tzinfo is not None and reread.utcoffset() is not None
    assert reread == created  # the same instant, to the microsecond
    assert read == again == made.json()["created_at"]  # and written the same way

    with sessions() as session:  # what the database itself holds
        stored = session.get(ShareLink, made.json()["id"]).created_at
    if stored.tzinfo is None:  # SQLite keeps no zone; app/shares.py reads it as UTC
        assert share_db.startswith("sqlite")
        stored = stored.replace(tzinfo=timezone.utc)
    assert stored == created

    if share_db.startswith("postgresql"):
        # PostgreSQL answers timestamptz in the session's TimeZone: a server not on UTC still
        # gives the same instant, written the same way (app/shares.py turns it into UTC).
        kolkata_db = f"{share_db}%20-ctimezone%3DAsia/Kolkata"
        engine = make_engine(kolkata_db)  # as the app connects: the option reaches the session
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "Asia/Kolkata"
        engine.dispose()
        with TestClient(create_app(Settings(database_url=kolkata_db))) as kolkata:
            elsewhere = kolkata.get(made.json()["json_url"]).json()["created_at"]
        assert elsewhere == made.json()["created_at"]
