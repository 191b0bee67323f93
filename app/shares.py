"""Share links: a probe (SAE + text) saved under a short permanent id, opened at `/p/{id}`; a
steering (its request and its result) likewise at `/s/{id}`.

The id is the start of a hash of the SAE id and the text, so sharing the same probe twice gives
the same link and needs no lookup table of its own. Should two probes ever share a prefix, the
later one gets a longer id (still derived from its own hash), so no link is ever overwritten.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timezone

from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Sae, ShareLink, SteerShare
from app.queries import Record
from app.steering import SteerOut
from app.urls import URLs

ID_LENGTHS = (10, 16, 32, 52)  # base32 characters: 50 bits first, the whole sha-256 at most


class ShareOut(Record):
    """A shared probe: the SAE and the text, under a short permanent link."""

    id: str = Field(description="derived from a hash of the SAE id and the text: sharing twice gives the same id")
    sae: str
    text: str
    created_at: str
    sae_changed: bool = Field(description="the SAE was reloaded with other weights since the link was made")
    url: str = Field(description="the short link: /p/{id}")
    json_url: str


def share_digest(sae_id: str, text: str) -> str:
    """sha-256 of the SAE id and the text, in lower-case base32 (letters and 2-7: easy to read
    out, and the same in any case-folding channel)."""
    digest = hashlib.sha256(sae_id.encode() + b"\0" + text.encode("utf-8")).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


def create_share(session: Session, sae_id: str, text: str, urls: URLs = URLs(),
                 before_insert: Callable[[], None] | None = None) -> tuple[ShareOut, bool] | None:
    """The share link of (sae_id, text), made if it does not exist yet: (share, created);
    None for an SAE that is not in the database. `before_insert` runs just before a new link
    is stored (a link that exists is given again without it): ShareLimits.take raises there."""
    content_hash = session.execute(select(Sae.content_hash).where(Sae.id == sae_id)).scalar_one_or_none()
    if content_hash is None:
        return None
    row, created = _find_or_make(
        session, ShareLink, share_digest(sae_id, text),
        lambda share_id: ShareLink(id=share_id, sae_id=sae_id, text=text, sae_content_hash=content_hash),
        lambda row: row.sae_id == sae_id and row.text == text, before_insert)
    return _share(row, content_hash, urls), created


def _find_or_make(session: Session, table, digest: str, make, same,
                  before_insert: Callable[[], None] | None = None) -> tuple[ShareLink | SteerShare, bool]:
    """The row of `table` whose id is the shortest prefix of `digest` that is free or holds the
    same share (`same(row)`), made with `make(id)` when free, `before_insert` first: (row, created)."""
    for length in ID_LENGTHS:
        share_id = digest[:length]
        row = session.get(table, share_id)
        if row is None:
            if before_insert is not None:
                before_insert()
            made = make(share_id)
            row = _insert(session, made)  # someone else's row when they shared it at the same moment
            if row is None:
                return made, True
        if same(row):
            return row, False
    raise RuntimeError(f"sha-256 collision on {digest}")  # not in this universe


def _insert(session: Session, row: ShareLink | SteerShare) -> ShareLink | SteerShare | None:
    """Insert `row` in a transaction of its own: None, or the row of a concurrent share that
    inserted the same id first. Its own, because on SQLite a transaction that has read cannot write once
    another writer has committed meanwhile: it fails at once ("database is locked") instead of
    waiting for the lock, and two people sharing one new text together got a 500."""
    session.rollback()  # ends the lookups' read transaction; nothing was written in it
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = session.get(type(row), row.id)
        if existing is None:  # not a duplicate id: a real error
            raise
        return existing
    return None


def get_share(session: Session, share_id: str, urls: URLs = URLs()) -> ShareOut | None:
    found = _read(session, ShareLink, share_id)
    return None if found is None else _share(*found, urls)


def _read(session: Session, table, share_id: str) -> tuple[ShareLink | SteerShare, str | None] | None:
    """A share's row and its SAE's present content hash (None: the SAE is gone), or None. Any
    letter case finds it (ids are lower-case base32)."""
    row = session.get(table, share_id.lower())
    if row is None:
        return None
    return row, session.execute(select(Sae.content_hash).where(Sae.id == row.sae_id)).scalar_one_or_none()


def _share(row: ShareLink, content_hash: str | None, urls: URLs) -> ShareOut:
    created, changed = _stamp(row, content_hash)
    return ShareOut(id=row.id, sae=row.sae_id, text=row.text, created_at=created,
                 sae_changed=changed, url=urls.share(row.id), json_url=urls.share(row.id, fmt="json"))


def _stamp(row: ShareLink | SteerShare, content_hash: str | None) -> tuple[str, bool]:
    """A link's creation time (ISO, UTC) and whether its SAE has other weights now."""
    changed = row.sae_content_hash is not None and content_hash is not None and row.sae_content_hash != content_hash
    created = row.created_at
    if created is not None and created.tzinfo is None:  # SQLite keeps no time zone: it was UTC
        created = created.replace(tzinfo=timezone.utc)
    if created is not None:  # PostgreSQL gives it in the connection's time zone: one spelling
        created = created.astimezone(timezone.utc)
    return (created.isoformat() if created else ""), changed


class ShareLimitReached(Exception):
    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShareLimits:
    """Share links are anonymous and permanent, so their making is bounded: at most `per_client`
    new links per client address in any hour (counted by this server process), and at most
    `total` links stored. 0 turns a limit off."""

    WINDOW_S = 3600

    def __init__(self, per_client: int, total: int, clock: Callable[[], float] = time.monotonic):
        self.per_client, self.total, self.clock = per_client, total, clock
        self.made: dict[str, deque[float]] = {}  # client -> when it made its links in the window
        self.lock = threading.Lock()

    def take(self, session: Session, client: str) -> None:
        """Count one new link of `client`, or raise ShareLimitReached saying which limit and when
        to try again."""
        if self.total and sum(session.execute(select(func.count()).select_from(table)).scalar_one()
                              for table in (ShareLink, SteerShare)) >= self.total:
            raise ShareLimitReached(f"this server holds its limit of {self.total:,} share links: no new link can be "
                                    "made (an existing one still opens)")
        if not self.per_client:
            return
        now = self.clock()
        with self.lock:
            if len(self.made) > 10_000:  # forget clients with nothing in the window
                self.made = {c: t for c, t in self.made.items() if t and t[-1] > now - self.WINDOW_S}
            times = self.made.setdefault(client, deque())
            while times and times[0] <= now - self.WINDOW_S:
                times.popleft()
            if len(times) >= self.per_client:
                wait = int(times[0] + self.WINDOW_S - now) + 1
                raise ShareLimitReached(f"at most {self.per_client} new share links an hour from one address: "
                                        f"try again in {(wait + 59) // 60} min", retry_after_s=wait)
            times.append(now)


# ---------------------------------------------------------------- shared steerings (/s/{id})


class SteerShareOut(Record):
    """A shared steering: the request and the texts it gave, stored together under a short permanent link."""

    id: str = Field(description="derived from a hash of the SAE id and the request: sharing twice gives the same id")
    created_at: str
    sae_changed: bool = Field(description="the SAE was reloaded with other weights since the link was made")
    url: str = Field(description="the short link: /s/{id}")
    json_url: str
    steering: SteerOut = Field(description="the steering as it was when shared: the same texts, always")


def create_steer_share(session: Session, steering: SteerOut, urls: URLs = URLs(),
                       before_insert: Callable[[], None] | None = None) -> tuple[SteerShareOut, bool] | None:
    """The share link of a steering, made if new (`before_insert` first, as create_share):
    (share, created); None for an unknown SAE."""
    content_hash = session.execute(select(Sae.content_hash).where(Sae.id == steering.sae)).scalar_one_or_none()
    if content_hash is None:
        return None
    request = steering.request().model_dump_json()
    row, created = _find_or_make(
        session, SteerShare, share_digest(steering.sae, request),
        lambda share_id: SteerShare(id=share_id, sae_id=steering.sae, request=request, result=steering.model_dump_json(),
                                    sae_content_hash=content_hash),
        lambda row: row.sae_id == steering.sae and row.request == request, before_insert)
    return _steer_share(row, content_hash, urls), created


def get_steer_share(session: Session, share_id: str, urls: URLs = URLs()) -> SteerShareOut | None:
    found = _read(session, SteerShare, share_id)
    return None if found is None else _steer_share(*found, urls)


def _steer_share(row: SteerShare, content_hash: str | None, urls: URLs) -> SteerShareOut:
    created, changed = _stamp(row, content_hash)
    return SteerShareOut(id=row.id, created_at=created, sae_changed=changed,
                         url=urls.steer_shared(row.id), json_url=urls.steer_shared(row.id, fmt="json"),
                         steering=SteerOut.model_validate_json(row.result))
