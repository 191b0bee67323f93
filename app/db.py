"""Engines, sessions and schema upgrades. The schema is made only by Alembic migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from app.resources import MIGRATIONS_DIR


def make_engine(database_url: str, *, statement_timeout_s: float | None = None,
                pool_size: int | None = None, read_only: bool = False) -> Engine:
    """An engine for `database_url`; SQLite behaves like PostgreSQL where it matters.
    `read_only`: every connection refuses writes (SQLite's query_only, PostgreSQL's
    default_transaction_read_only), as the notebook API (saescope.connect) opens databases.

    SQLite: foreign keys enforced; WAL, so readers never wait for a load; real transactions
    (pysqlite's own BEGIN handling is off and SQLAlchemy emits BEGIN, or `BEGIN IMMEDIATE` for a
    connection with the execution option `sqlite_begin="IMMEDIATE"`, as the loader asks).
    PostgreSQL: `statement_timeout_s` bounds every statement (the web app sets it; loads don't).
    """
    # Kept connections, and as many more at once: past those a connection is opened and closed per
    # request (on SQLite with its PRAGMAs: 7 % of the server's CPU under load with the default 5 + 10).
    pool = {"pool_size": pool_size, "max_overflow": pool_size} if pool_size else {}
    if database_url.startswith("sqlite"):
        # check_same_thread: FastAPI runs sync handlers in a thread pool; timeout waits on locks.
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_connect)
        if read_only:
            event.listen(engine, "connect", lambda dbapi_connection, _: dbapi_connection.execute("PRAGMA query_only=ON"))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args = {}
    settings = ([f"-c statement_timeout={int(statement_timeout_s * 1000)}"] if statement_timeout_s else []) + (
        ["-c default_transaction_read_only=on"] if read_only else [])
    if settings:
        # connect_args replace the URL's own libpq "options" (e.g. a search_path): keep both.
        options = make_url(database_url).query.get("options")
        connect_args["options"] = " ".join(([options] if options else []) + settings)
    return create_engine(database_url, pool_pre_ping=True, connect_args=connect_args, **pool)


def sqlite_file(url) -> Path | None:
    """The file of an SQLite URL (a parsed sqlalchemy URL); None for an in-memory one or another
    database."""
    on_disk = url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:")
    return Path(url.database) if on_disk else None


def database_problem(database_url: str) -> str | None:
    """Why `database_url` cannot be opened, in one line, or None: checked by the command line
    before it loads or serves, so that a mistyped URL is not a traceback."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return f"{database_url!r} is not a database URL (sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
    shown = url.render_as_string(hide_password=True)
    file = sqlite_file(url)
    if url.drivername.startswith("sqlite") and file is None:
        return f"{shown} is an in-memory SQLite database, gone when the command ends: give a file, sqlite:///FILE"
    if file and not file.exists():  # made by the first load; connecting now would leave an empty file
        return None if file.parent.is_dir() else f"cannot open {shown}: there is no folder {file.parent}"
    try:
        engine = make_engine(database_url)
    except (ArgumentError, NoSuchModuleError, ImportError) as e:
        return f"{shown}: {e} (sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
    try:
        with engine.connect():
            return None
    except DBAPIError as e:
        return f"cannot open {shown}: {_first_line(e)}"
    finally:
        engine.dispose()


def _sqlite_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin hook below starts transactions
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL: one writer and any number of readers at once; a killed writer's uncommitted frames are
    # ignored on the next open. synchronous=NORMAL is still safe against a killed process.
    mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode == "wal":
        cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # configparser interpolates '%': a password with '%' must be escaped.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


class MigrationError(RuntimeError):
    """The database opens but cannot be brought to this saescope's schema (one line)."""


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at `database_url` to `revision` (creates it on a fresh database)."""
    shown = make_url(database_url).render_as_string(hide_password=True)
    try:
        command.upgrade(alembic_config(database_url), revision)
    except CommandError as e:  # "Can't locate revision ...": most likely a newer saescope's schema
        raise MigrationError(f"cannot migrate {shown}: {e} (was it made by a newer saescope?)") from None
    except DBAPIError as e:  # e.g. a PostgreSQL search_path naming a schema that does not exist
        raise MigrationError(f"cannot migrate {shown}: {_first_line(e)}") from None


def _first_line(e: DBAPIError) -> str:
    """The driver's own message, first line (PostgreSQL's go on with hints), or its error's name."""
    return (str(e.orig).strip().splitlines() or [type(e.orig).__name__])[0]


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
