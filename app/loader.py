"""Load a run folder into SQL: read and check everything first, then write in one transaction.

    sae_id = load_run("runs/demo", "sqlite:///saescope.db")

A bad folder raises `RunFolderError` (naming the file) before the database is touched. Loading
the same files twice is a no-op; the same SAE id with different files raises `LoadError` unless
`replace=True`, which swaps the old rows for the new ones in the same transaction.

The rows are built as columns (numpy arrays), not as one Python object per row, and written by
each backend's bulk path: PostgreSQL's binary `COPY` (psycopg 3), fed one buffer per table that
numpy lays out in COPY's wire format; SQLite's `executemany` over the raw connection. Either way
it is one transaction, so a process killed at any point (SIGKILL included) leaves the database as
it was or with the run fully loaded. Two loads of the same SAE at once are serialised (an
advisory lock on PostgreSQL, `BEGIN IMMEDIATE` on SQLite): the second sees the first's rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, Engine, delete, select

from app.db import make_engine, upgrade
from app.models import Context, Example, Latent, Sae
from trainer.runfolder import (
    CFG_FILE,
    HARVEST_DIR,
    METRICS_FILE,
    SAE_FILE,
    load_cfg,
    load_harvest,
    load_metrics,
    load_sae_weights,
    sae_slug,
)

log = logging.getLogger("app.loader")

BATCH = 50_000  # rows per executemany/COPY chunk: flat memory, progress between chunks


class LoadError(ValueError):
    """The run cannot be loaded into this database as asked."""


@dataclass
class Latents:
    index: np.ndarray  # (n,) int
    density: np.ndarray  # (n,) float64, finite
    max_activation: np.ndarray
    mean_activation: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class Contexts:
    context_id: np.ndarray  # (C,) int, only contexts some example shows
    token_ids: np.ndarray  # (C, T) little-endian int32
    tokens: list[str]  # (C,) JSON list of T readable strings each

    def __len__(self) -> int:
        return len(self.context_id)


@dataclass
class Examples:
    latent_index: np.ndarray  # (N,) int, sorted with rank: the primary key's order
    rank: np.ndarray  # (N,) 0.. per latent, skipping empty slots
    context_id: np.ndarray  # (N,)
    max_activation: np.ndarray  # (N,) float64, finite
    activations: np.ndarray  # (N, T) little-endian float16

    def __len__(self) -> int:
        return len(self.latent_index)


@dataclass
class RunRows:
    """Everything one run puts into the database, read and checked before any write."""

    sae: dict
    latents: Latents
    contexts: Contexts
    examples: Examples

    @property
    def sae_id(self) -> str:
        return self.sae["id"]

    @property
    def n_rows(self) -> int:
        return 1 + len(self.latents) + len(self.contexts) + len(self.examples)


def load_run(run_dir: str | Path, database_url: str, replace: bool = False) -> str:
    """Load `run_dir` into the database at `database_url` (migrated first); returns the SAE id."""
    log.info("reading %s", run_dir)
    rows = read_run(run_dir)
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        write_in_one_transaction(engine, rows, replace=replace)
    finally:
        engine.dispose()
    log.info("loaded %s", rows.sae_id)
    return rows.sae_id


def write_in_one_transaction(engine: Engine, rows: RunRows, replace: bool = False) -> bool:
    """One transaction that takes the load lock first; True when rows were written."""
    # BEGIN IMMEDIATE on SQLite: take the write lock before reading, so the "already loaded?"
    # check and the inserts see the same database (app.db's begin hook reads this option).
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        lock_sae(conn, rows.sae_id)
        written = write_run(conn, rows, replace=replace)
        if written:
            log.info("committing %s rows", f"{rows.n_rows:,}")
    return written


def lock_sae(conn: Connection, sae_id: str) -> None:
    """Serialise writers of one SAE until the transaction ends (a load, a replace, a delete).
    SQLite needs nothing more: a `BEGIN IMMEDIATE` transaction already excludes other writers."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"saescope.sae:{sae_id}",))


def unload_sae(engine: Engine, sae_id: str) -> bool:
    """Delete one SAE and all its rows in one transaction; False when there was none."""
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        lock_sae(conn, sae_id)
        deleted = delete_sae(conn, sae_id)
    if deleted:
        log.info("deleted %s", sae_id)
    return deleted


def content_hash(run_dir: Path) -> str:
    """sha256 over every file the load reads: the same run gives the same hash, and a run
    re-evaluated or re-harvested gives a new one."""
    digest = hashlib.sha256()
    harvest = sorted(str(p.relative_to(run_dir)) for p in (run_dir / HARVEST_DIR).glob("*") if p.is_file())
    for name in (CFG_FILE, SAE_FILE, METRICS_FILE, *harvest):
        if not (run_dir / name).is_file():
            continue
        digest.update(name.encode())
        with open(run_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_run(run_dir: str | Path) -> RunRows:
    """Read and check a run folder (raises RunFolderError) and turn it into table columns."""
    run_dir = Path(run_dir).resolve()
    cfg = load_cfg(run_dir)
    load_sae_weights(run_dir, cfg)  # checks the weights exist and match cfg.json
    metrics = load_metrics(run_dir)
    harvest = load_harvest(run_dir, cfg)
    sae_id = sae_slug(cfg)

    token_ids = harvest.token_ids.numpy().astype("<i4")  # (C, T)
    top_context = harvest.top_context.numpy()  # (n, K)

    sae = {
        "id": sae_id,
        "model": str(cfg.get("model_name") or cfg["model"]),
        "layer": int(cfg["layer"]),
        "d_in": int(cfg["d_in"]),
        "n_latents": int(cfg["n_latents"]),
        "k": int(cfg["k"]),
        "context_length": int(cfg.get("context_length") or harvest.info.get("context_length") or token_ids.shape[1]),
        "fvu": _number(metrics.get("fvu")),
        "l0": _number(metrics.get("l0")),
        "dead_fraction": _number(metrics.get("dead_fraction")),
        "cfg": json.dumps(_finite(cfg), sort_keys=True),
        "metrics": json.dumps(_finite(metrics), sort_keys=True),
        "run_dir": str(run_dir),
        "content_hash": content_hash(run_dir),
    }
    latents = Latents(
        index=np.arange(harvest.n_latents),
        density=_finite_array(harvest.density.numpy()),  # a dead latent's NaN mean is stored as 0
        max_activation=_finite_array(harvest.max_activation.numpy()),
        mean_activation=_finite_array(harvest.mean_activation.numpy()),
    )
    # Examples: the filled slots of top_context in row-major order, i.e. sorted by (latent, slot);
    # an empty slot (-1: the latent fired in fewer than K contexts) is skipped and ranks close up.
    filled = top_context >= 0  # (n, K)
    latent_index, _ = np.nonzero(filled)
    examples = Examples(
        latent_index=latent_index,
        rank=(np.cumsum(filled, axis=1) - 1)[filled],
        context_id=top_context[filled],
        max_activation=_finite_array(harvest.top_max.numpy()[filled]),
        activations=harvest.top_activations.numpy()[filled].astype("<f2"),  # (N, T)
    )
    used = np.unique(examples.context_id)  # only contexts some example shows
    vocab_json = [json.dumps(token, ensure_ascii=False) for token in harvest.vocab]
    contexts = Contexts(
        context_id=used,
        token_ids=np.ascontiguousarray(token_ids[used]),
        tokens=["[" + ", ".join(vocab_json[t] for t in ids) + "]" for ids in token_ids[used].tolist()],
    )
    return RunRows(sae=sae, latents=latents, contexts=contexts, examples=examples)


def write_run(conn: Connection, rows: RunRows, replace: bool = False) -> bool:
    """Insert `rows` inside the caller's transaction (idempotent on the content hash); returns
    False when the same files are already loaded."""
    existing = conn.execute(select(Sae.content_hash).where(Sae.id == rows.sae_id)).scalar_one_or_none()
    if existing == rows.sae["content_hash"]:
        log.info("%s is already loaded from these files: nothing to do", rows.sae_id)
        return False
    if existing is not None:
        if not replace:
            raise LoadError(
                f"SAE {rows.sae_id!r} is already loaded from different files; "
                "pass --replace (replace=True) to overwrite it"
            )
        log.info("replacing %s", rows.sae_id)
        delete_sae(conn, rows.sae_id)
    writer = _copy_table if conn.dialect.name == "postgresql" else _insert_table
    dbapi = conn.connection.dbapi_connection  # the same connection, inside the same transaction
    sae_id = rows.sae_id
    sae = dict(rows.sae)
    conn.execute(Sae.__table__.insert(), [sae])
    latents, contexts, examples = rows.latents, rows.contexts, rows.examples
    tables = (
        (Latent, ("sae_id", "index", "density", "max_activation", "mean_activation"), len(latents),
         lambda s: (sae_id, latents.index[s], latents.density[s], latents.max_activation[s],
                    latents.mean_activation[s])),
        (Context, ("sae_id", "context_id", "token_ids", "tokens"), len(contexts),
         lambda s: (sae_id, contexts.context_id[s], contexts.token_ids[s], contexts.tokens[s])),
        (Example, ("sae_id", "latent_index", "rank", "context_id", "max_activation", "activations"), len(examples),
         lambda s: (sae_id, examples.latent_index[s], examples.rank[s], examples.context_id[s],
                    examples.max_activation[s], examples.activations[s])),
    )
    for table, columns, n, columns_of in tables:
        log.info("writing %s %s rows", f"{n:,}", table.__tablename__)
        for start in range(0, n, BATCH):
            writer(dbapi, table.__tablename__, columns, columns_of(slice(start, start + BATCH)))
    return True


def delete_sae(conn: Connection, sae_id: str) -> bool:
    """Delete one SAE and everything under it, children first (no reliance on cascades);
    False when there was no such SAE."""
    for table in (Example, Context, Latent):
        conn.execute(delete(table).where(table.sae_id == sae_id))
    return conn.execute(delete(Sae).where(Sae.id == sae_id)).rowcount > 0


# ------------------------------------------------------------ the two bulk paths


def _insert_table(dbapi, table: str, columns: tuple[str, ...], values: tuple) -> None:
    """SQLite: one executemany over the raw sqlite3 connection (no per-row ORM objects)."""
    sae_id, *arrays = values
    n = len(arrays[0])
    as_python = [_sqlite_column(array) for array in arrays]
    sql = f'INSERT INTO {table} ({", ".join(_quote(c) for c in columns)}) VALUES ({", ".join("?" * len(columns))})'
    cursor = dbapi.cursor()
    try:
        cursor.executemany(sql, zip(repeat(sae_id, n), *as_python))
    finally:
        cursor.close()


def _sqlite_column(array):
    if isinstance(array, list):
        return array
    if array.ndim == 2:  # one BLOB per row, in the column's byte order
        return [row.tobytes() for row in array]
    return array.tolist()


# PostgreSQL's binary COPY: a header, then per row a field count (int16) and per field its byte
# length (int32) and its bytes, all big-endian; see the COPY page of the PostgreSQL manual.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)
# Our column types (models.py): Integer -> int4, Float -> float8, LargeBinary -> bytea.
COPY_TYPES = {"i": ">i4", "f": ">f8"}


def _copy_table(dbapi, table: str, columns: tuple[str, ...], values: tuple) -> None:
    """PostgreSQL: COPY ... FROM STDIN (FORMAT BINARY), with the rows laid out by numpy.

    Every column but the text one has a fixed width here (sae_id is the same for every row, and a
    BLOB column is a 2-D array), so a chunk is one numpy record array written in one call."""
    sae_id, *arrays = values
    n = len(arrays[0])
    sql = f'COPY {table} ({", ".join(_quote(c) for c in columns)}) FROM STDIN (FORMAT BINARY)'
    with dbapi.cursor() as cursor, cursor.copy(sql) as copy:
        copy.write(COPY_HEADER)
        if any(isinstance(array, list) for array in arrays):  # a variable-width text column
            copy.write(b"".join(_copy_row(sae_id, row) for row in zip(*[_python_column(a) for a in arrays])))
        else:
            copy.write(_copy_records(sae_id.encode(), arrays, n).tobytes())
        copy.write(COPY_TRAILER)


def _copy_records(sae_id: bytes, arrays: list[np.ndarray], n: int) -> np.ndarray:
    fields = [("nfields", ">i2"), ("len0", ">i4"), ("col0", f"S{len(sae_id)}")]
    for i, array in enumerate(arrays, start=1):
        dtype = f"V{array.shape[1] * array.itemsize}" if array.ndim == 2 else COPY_TYPES[array.dtype.kind]
        fields += [(f"len{i}", ">i4"), (f"col{i}", dtype)]
    records = np.empty(n, dtype=np.dtype(fields))  # packed: no padding between fields
    records["nfields"] = 1 + len(arrays)
    records["len0"], records["col0"] = len(sae_id), sae_id
    for i, array in enumerate(arrays, start=1):
        records[f"len{i}"] = records.dtype[f"col{i}"].itemsize
        records[f"col{i}"] = np.ascontiguousarray(array).view(f"V{records.dtype[f'col{i}'].itemsize}")[:, 0] \
            if array.ndim == 2 else array
    return records


def _python_column(array):
    if isinstance(array, list):
        return [s.encode() for s in array]
    if array.ndim == 2:
        return [row.tobytes() for row in array]
    return array.tolist()


def _copy_row(sae_id: str, row: tuple) -> bytes:
    parts = [struct.pack("!h", 1 + len(row)), _copy_field(sae_id.encode())]
    for value in row:
        if isinstance(value, bytes):
            parts.append(_copy_field(value))
        elif isinstance(value, int):
            parts.append(_copy_field(struct.pack("!i", value)))
        else:
            parts.append(_copy_field(struct.pack("!d", value)))
    return b"".join(parts)


def _copy_field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def _quote(column: str) -> str:
    return f'"{column}"'  # "index" and "rank" are SQL keywords


# ------------------------------------------------------------ values


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _finite_array(values: np.ndarray) -> np.ndarray:
    """Finite float64: a dead latent's mean over zero firings (NaN) is stored as 0."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, 0.0)


def _finite(obj):
    """metrics.json may hold NaN/Infinity (Python's json writes them); store valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

