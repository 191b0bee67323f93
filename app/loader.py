"""Load a run folder into SQL: read and check everything first, then write in one transaction.

    sae_id = load_run("runs/demo", "sqlite:///saescope.db")

A bad folder raises `RunFolderError` (naming the file) before the database is touched. Loading
the same files twice is a no-op; the same SAE id with different files raises `LoadError` unless
`replace=True`, which swaps the old rows for the new ones in the same transaction.

The rows are built as columns (numpy arrays; lists for text and NULLs), not as one Python object
per row, and written by each backend's bulk path: PostgreSQL's binary `COPY` (psycopg 3), fed one
buffer per table whose fixed-width part numpy lays out in COPY's wire format; SQLite's
`executemany` over the raw connection. Tables: saes, latents (statistics, explanation),
latent_details (the harvest's per-latent arrays as BLOBs), contexts, examples (top and
quantile), for search vocab, token_latents, explanation_terms and latent_search (each latent's
full-text document, app/search_documents.py), the explanations from a language model
(RUN/llm_explanations.jsonl, `saescope explain`) in latent_explanations, and latent_ablations when
the harvest precomputed the feature pages' ablation sections. Either way it is one transaction, so a
process killed at any point (SIGKILL included) leaves the database as it was or with the run
fully loaded. Two loads of the same SAE at once are serialised (an
advisory lock on PostgreSQL, `BEGIN IMMEDIATE` on SQLite): the second sees the first's rows.

The LLM explanations are hashed apart from the rest (saes.llm_explanations_hash): loading a run
again after `saescope explain` added some replaces the SAE's latent_explanations alone, without
--replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, Engine, delete, select, text

from app.ablation import harvest_records
from app.db import make_engine, upgrade
from app.models import (
    LATENT_BLOBS,
    Base,
    Context,
    Example,
    ExplanationTerm,
    Ladder,
    LadderRung,
    Latent,
    LatentAblation,
    LatentDetail,
    LatentExplanation,
    LatentFamily,
    Sae,
    TokenLatent,
    Vocab,
)
from app.models import SEARCH_TABLE
from app.quality import detection_summary, explainability
from app.search import terms
from app.search_documents import ExplanationText, search_documents
from trainer.errors import RunFolderError
from trainer.formats import CFG_FILE, SAE_FILE
from trainer.llm_explanations import LlmExplanations, llm_explanations_path, load_llm_explanations
from trainer.runconfig import RunConfig
from trainer.runfolder import HARVEST_DIR, METRICS_FILE, load_harvest, load_metrics, load_sae_weights
from trainer.thresholds import DENSE_THRESHOLD
from trainer.tokens import VocabBytes

log = logging.getLogger("app.loader")

BATCH = 50_000  # rows per executemany/COPY chunk: flat memory, progress between chunks


class LoadError(ValueError):
    """The run cannot be loaded into this database as asked."""


@dataclass
class Rows:
    """One table's rows as columns, in the table's primary-key order: numpy arrays for fixed-width
    values (a 1-D array of numbers, or a 2-D array whose rows are each one BLOB) and lists for
    text and for values that may be NULL."""

    table: type[Base] | str  # a model, or the name of a table outside the models (SEARCH_TABLE)
    columns: dict[str, np.ndarray | list]

    @property
    def name(self) -> str:
        return self.table if isinstance(self.table, str) else self.table.__tablename__

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, column: str):
        return self.columns[column]


@dataclass
class RunRows:
    """Everything one run puts into the database, read and checked before any write."""

    sae: dict
    tables: dict[str, Rows]  # by table name, in the order they are written
    # latent_explanations' rows (a few per latent at most, written through SQLAlchemy Core: their
    # created_at is a timestamp, which the bulk paths do not write)
    llm_explanations: list[dict] = field(default_factory=list)
    # the harvest's precomputed ablation sections (harvest --ablation-examples), made into
    # `latent_ablations` rows once the SAE's id is final (load --id): HarvestAblations or None
    ablations: "HarvestAblations | None" = None

    @property
    def sae_id(self) -> str:
        return self.sae["id"]


@dataclass
class HarvestAblations:
    """ablations.safetensors, with what its rows show: the top contexts' slots and token strings."""

    arrays: dict[str, np.ndarray]  # runfolder.ABLATION_TENSORS
    top_context: np.ndarray  # (n, K)
    context_tokens: dict[int, str]  # context id -> its tokens as JSON (the contexts table's)
    vocab: list[str]

    @property
    def n_latents(self) -> int:
        return int((self.top_context[:, : self.arrays["ablation_activations"].shape[1]] >= 0).any(1).sum())

    def rows(self, sae_id: str, content_hash: str) -> list[dict]:
        """The `latent_ablations` rows, keyed by the SAE's content hash as the page's own are."""
        shown = self.top_context[:, : self.arrays["ablation_activations"].shape[1]]
        tokens = {context_id: json.loads(self.context_tokens[context_id]) for context_id in np.unique(shown[shown >= 0]).tolist()}
        now = datetime.now(timezone.utc)
        return [{"sae_id": sae_id, "latent": latent, "content_hash": content_hash, "effects": record.model_dump_json(),
                 "created_at": now}
                for latent, record in harvest_records(sae_id, self.arrays, self.top_context, tokens, self.vocab)]


SAE_ID = re.compile(r"[a-z0-9][a-z0-9.-]{0,199}")  # what RunConfig.slug makes: one URL path segment, as is


def load_run(run_dir: str | Path, database_url: str, replace: bool = False, sae_id: str | None = None) -> str:
    """Load `run_dir` into the database at `database_url` (migrated first); returns the SAE id,
    `sae_id` or by default one made of the model, layer, size and k (two SAEs alike in those, say
    a SAELens and a sparsify one, need their own)."""
    if sae_id is not None and not SAE_ID.fullmatch(sae_id):
        raise LoadError(f"--id {sae_id!r}: lowercase letters, digits, '.' and '-' (at most 200), starting with a letter or digit")
    log.info("reading %s", run_dir)
    rows = read_run(run_dir)
    if sae_id is not None:
        rows.sae["id"] = sae_id
    write_to_database(database_url, lambda engine: write_in_one_transaction(engine, rows, replace=replace))
    return rows.sae_id


def write_to_database(database_url: str, write: Callable[[Engine], object]) -> None:
    """Migrate the database at `database_url`, then `write(engine)`."""
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        write(engine)
    finally:
        engine.dispose()


def write_in_one_transaction(engine: Engine, rows: RunRows, replace: bool = False) -> bool:
    """One transaction that takes the load lock first; True when rows were written."""
    with write_transaction(engine) as conn:
        lock_sae(conn, rows.sae_id)
        written = write_run(conn, rows, replace=replace)
        if written:
            log.info("committing")
    return written


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction, committed when the block ends. BEGIN IMMEDIATE on SQLite:
    take the write lock before reading, so an "already loaded?" check and the inserts see the same
    database (app.db's begin hook reads this option)."""
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        yield conn


def lock_sae(conn: Connection, sae_id: str) -> None:
    """Serialise writers of one SAE until the transaction ends (a load, a replace, a delete)."""
    advisory_lock(conn, f"saescope.sae:{sae_id}")


def advisory_lock(conn: Connection, key: str) -> None:
    """Hold a PostgreSQL advisory lock on `key` until the transaction ends. SQLite needs nothing:
    a `BEGIN IMMEDIATE` transaction already excludes other writers."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


def unload_sae(engine: Engine, sae_id: str) -> bool:
    """Delete one SAE and all its rows in one transaction; False when there was none."""
    with write_transaction(engine) as conn:
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
    # Hashed before anything is read: a harvest or eval that rewrites the run meanwhile then leaves
    # rows newer than their hash, which the next load sees as changed and loads again (the other
    # order would keep old rows under the new files' hash, "already loaded" for good).
    digest = content_hash(run_dir)
    cfg = RunConfig.load(run_dir)
    load_sae_weights(run_dir, cfg)  # checks the weights exist and match cfg.json
    metrics = load_metrics(run_dir)
    harvest = load_harvest(run_dir, cfg)
    llm = load_llm_explanations(run_dir, cfg.n_latents)
    arrays = {name: tensor.numpy() for name, tensor in harvest.tensors.items()}
    vocab = [clean_text(token) for token in harvest.vocab]
    explanations = [_explanation(e) for e in harvest.explanations]
    check_search_rows(run_dir, arrays)
    llm_rows = llm_explanation_rows(llm)
    # Every explanation that search matches, as (latent, source, text) rows: the harvest's n-gram
    # patterns and the language models' explanations.
    explanation_texts = [ExplanationText(latent, "ngram", e["text"]) for latent, e in enumerate(explanations) if e["text"]]
    explanation_texts += [ExplanationText(row["latent"], row["source"], row["text"]) for row in llm_rows]
    examples = example_rows(arrays)
    contexts = context_rows(arrays["token_ids"], np.unique(examples["context_id"]), vocab, harvest.token_bytes)
    tables = [
        latent_rows(arrays, explanations),
        detail_rows(arrays, explanations),
        contexts,
        examples,
        Rows(Vocab, {"token_id": np.arange(len(vocab)), "token": vocab}),
        token_rows(arrays),
        term_rows(explanations),
        Rows(SEARCH_TABLE, search_documents(arrays, vocab, explanation_texts)),
    ]
    density = _finite_array(arrays["density"])
    sae = {
        "id": cfg.slug,
        "model": cfg.model_name,
        "layer": cfg.layer,
        "d_in": cfg.d_in,
        "n_latents": cfg.n_latents,
        "k": cfg.k,
        "context_length": int(harvest.info.get("context_length") or arrays["token_ids"].shape[1]),
        "fvu": _number(metrics.get("fvu")),
        "l0": _number(metrics.get("l0")),
        "dead_fraction": _number(metrics.get("dead_fraction")),
        "cfg": json.dumps(finite_json(cfg.to_json()), sort_keys=True),
        "metrics": json.dumps(finite_json(metrics), sort_keys=True),
        "harvest": json.dumps(finite_json(harvest.info), sort_keys=True),
        "density_histogram": json.dumps(density_histogram(density)),
        "n_explained": sum(e["f1"] is not None for e in explanations),
        "run_dir": str(run_dir),
        "content_hash": digest,
        "llm_explanations_hash": llm_explanations_hash(run_dir),
    }
    ablations = None
    if harvest.ablations is not None:
        ablations = HarvestAblations({name: t.numpy() for name, t in harvest.ablations.items()}, arrays["top_context"],
                                     dict(zip(contexts["context_id"].tolist(), contexts["tokens"])), vocab)
    return RunRows(sae=sae, tables={rows.name: rows for rows in tables}, llm_explanations=llm_rows, ablations=ablations)


def llm_explanations_hash(run_dir: Path) -> str | None:
    """sha256 of RUN/llm_explanations.jsonl, None when there is none."""
    path = llm_explanations_path(run_dir)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llm_explanation_rows(llm: LlmExplanations) -> list[dict]:
    """latent_explanations' rows: each latent's successful explanation by each model, from its
    latest prompt version (failures are not shown; `saescope explain` tries them again)."""
    latest: dict[tuple[int, str], object] = {}
    for record in llm.ok:  # in (latent, model, prompt_version) order: the latest version last
        latest[record.latent, record.model] = record
    return [{"latent": r.latent, "source": clean_text(r.model)[:300], "url": clean_text(r.url),
             "prompt_version": r.prompt_version, "text": clean_text(r.text), "score": float(r.score),
             "n_scored": r.n_scored, "true_positives": r.true_positives, "false_negatives": r.false_negatives,
             "true_negatives": r.true_negatives, "false_positives": r.false_positives,
             "created_at": _timestamp(r.created_at)} for r in latest.values()]


def _timestamp(text: str) -> datetime:
    """A record's created_at (ISO 8601, as the writer makes it); now for one that does not parse."""
    try:
        found = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return datetime.now(timezone.utc)
    return found if found.tzinfo else found.replace(tzinfo=timezone.utc)


def write_llm_explanations(conn: Connection, sae_id: str, rows: list[dict], digest: str | None) -> None:
    """Put `rows` in place of the SAE's LLM explanations, inside the caller's transaction, and
    record the hash of the file they came from and their sum per model (saes.detection)."""
    conn.execute(delete(LatentExplanation).where(LatentExplanation.sae_id == sae_id))
    if rows:
        conn.execute(LatentExplanation.__table__.insert(), [{"sae_id": sae_id, **row} for row in rows])
    summary = json.dumps(detection_summary((row["source"], row["score"]) for row in rows))
    conn.execute(Sae.__table__.update().where(Sae.id == sae_id).values(llm_explanations_hash=digest, detection=summary))


def latent_rows(arrays: dict[str, np.ndarray], explanations: list[dict]) -> Rows:
    columns = {
        "index": np.arange(len(arrays["density"])),
        "density": _finite_array(arrays["density"]),
        "max_activation": _finite_array(arrays["max_activation"]),
        "mean_activation": _finite_array(arrays["mean_activation"]),  # a dead latent's NaN mean is stored as 0
    }
    for key in ("text", "precision", "recall", "f1", "matches", "firings"):
        columns["explanation" if key == "text" else f"explanation_{key}"] = [e[key] for e in explanations]
    return Rows(Latent, columns)


def detail_rows(arrays: dict[str, np.ndarray], explanations: list[dict]) -> Rows:
    return Rows(LatentDetail, {
        "index": np.arange(len(arrays["density"])),
        **{name: _finite_array(arrays[name]).astype(dtype) for name, dtype in LATENT_BLOBS.items()},
        "logit_min": _finite_array(arrays["logit_range"][:, 0]),
        "logit_max": _finite_array(arrays["logit_range"][:, 1]),
        "explanation_patterns": [e["patterns"] for e in explanations],
    })


def example_rows(arrays: dict[str, np.ndarray]) -> Rows:
    """Top examples (bin 0) and quantile examples (bins 1..Q) of every latent, in key order.

    An empty slot (-1: the latent fired in fewer contexts, or its bin had fewer samples) is
    skipped and the ranks close up. Each row goes straight to its place in (latent, bin, rank)
    order, the primary key's, which inserts fastest: a latent's top rows, then its quantile rows."""
    top = arrays["top_context"] >= 0  # (n, K)
    quantile = arrays["quantile_context"] >= 0  # (n, Q, S)
    n = len(top)
    n_top, n_quantile = top.sum(1), quantile.reshape(n, -1).sum(1)  # (n,)
    first = np.cumsum(n_top + n_quantile) - (n_top + n_quantile)  # each latent's first row
    top_latent, _ = np.nonzero(top)
    top_rank = (np.cumsum(top, axis=1) - 1)[top]
    q_latent, q_bin, _ = np.nonzero(quantile)
    q_order = (np.cumsum(quantile.reshape(n, -1), axis=1) - 1).reshape(quantile.shape)[quantile]  # within the latent
    where = (first[top_latent] + top_rank, first[q_latent] + n_top[q_latent] + q_order)
    top_activations = arrays["top_activations"][top]  # (N1, T)
    quantile_activations = arrays["quantile_activations"][quantile]  # (N2, T)
    parts = {
        "latent_index": (top_latent, q_latent),
        "bin": (0, q_bin + 1),
        "rank": (top_rank, (np.cumsum(quantile, axis=2) - 1)[quantile]),
        "context_id": (arrays["top_context"][top], arrays["quantile_context"][quantile]),
        "position": (top_activations.argmax(1), arrays["quantile_position"][quantile]),
        "max_activation": (_finite_array(arrays["top_max"][top]), _finite_array(quantile_activations.max(1, initial=0))),
        "activations": (top_activations, quantile_activations),
    }
    N, T = len(top_latent) + len(q_latent), arrays["token_ids"].shape[1]
    layouts = {"activations": ("<f2", (N, T)), "max_activation": (np.float64, (N,))}  # the rest: int64 (N,)
    columns = {}
    for name, (top_values, quantile_values) in parts.items():
        dtype, shape = layouts.get(name, (np.int64, (N,)))
        column = columns[name] = np.empty(shape, dtype=dtype)
        column[where[0]], column[where[1]] = top_values, quantile_values
    return Rows(Example, columns)


def context_rows(token_ids: np.ndarray, used: np.ndarray, vocab: list[str], token_bytes: list[str] | None = None) -> Rows:
    """Only the contexts some example shows; each as its token ids and their strings: each token's
    vocab string, or, in a context holding a character split over several byte tokens (an emoji,
    CJK), each token's piece of the context's text (the character on the token that completes it)."""
    vocab_json = [json.dumps(token, ensure_ascii=False) for token in vocab]
    split = VocabBytes(token_bytes)

    def tokens_json(ids: list[int]) -> str:
        if (pieces := split.pieces(ids)) is not None:
            return json.dumps([clean_text(piece.text) for piece in pieces], ensure_ascii=False)
        return "[" + ", ".join(vocab_json[t] for t in ids) + "]"

    return Rows(Context, {
        "context_id": used,
        "token_ids": np.ascontiguousarray(token_ids[used]).astype("<i4"),
        "tokens": [tokens_json(ids) for ids in token_ids[used].tolist()],
    })


def token_rows(arrays: dict[str, np.ndarray]) -> Rows:
    """tokens.safetensors in (token, latent) order, the primary key's."""
    order = np.lexsort((arrays["token_latent"], arrays["token_id"]))
    return Rows(TokenLatent, {
        "token_id": arrays["token_id"][order], "latent": arrays["token_latent"][order],
        "mean_activation": _finite_array(arrays["token_mean_activation"][order]),
        "fire_rate": _finite_array(arrays["token_fire_rate"][order]), "occurrences": arrays["token_occurrences"][order],
    })


def term_rows(explanations: list[dict]) -> Rows:
    """Each latent's explanation words, for search (app.search.terms reads a query the same way);
    sorted by (term, latent), the primary key's order."""
    pairs = sorted({(term, latent) for latent, e in enumerate(explanations) for term in terms(e["text"] or "")})
    score = [-1.0 if explanations[latent]["f1"] is None else explanations[latent]["f1"] for _, latent in pairs]
    return Rows(ExplanationTerm, {"term": [term for term, _ in pairs],
                                  "latent": np.array([latent for _, latent in pairs], dtype=np.int64),
                                  "score": np.array(score, dtype=np.float64)})


def density_histogram(density: np.ndarray, bins_per_decade: int = 4) -> dict:
    """Latents per bin of log10(density), from the rarest live latent's decade to 1; dead latents
    (density 0, no log) and dense ones (above DENSE_THRESHOLD, as in evaluation) are also counted."""
    live = density[density > 0]
    low = math.floor(float(np.log10(live.min()))) if len(live) else -6
    edges = np.linspace(low, 0, -low * bins_per_decade + 1) if low < 0 else np.array([-1.0, 0.0])
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return {"log10_edges": edges.round(4).tolist(), "counts": counts.tolist(), "dead": int((density <= 0).sum()),
            "dense": int((density > DENSE_THRESHOLD).sum()), "dense_threshold": DENSE_THRESHOLD}


def check_search_rows(run_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """tokens.safetensors pairs each token with a latent at most once (the table's key)."""
    n = len(arrays["density"])
    latent = arrays["token_latent"]
    if len(latent) and (latent.min() < 0 or latent.max() >= n):
        raise RunFolderError(f"{run_dir / HARVEST_DIR / 'tokens.safetensors'}: token_latent outside 0..{n - 1}")
    key = arrays["token_id"] * n + latent
    if len(np.unique(key)) != len(key):
        raise RunFolderError(f"{run_dir / HARVEST_DIR / 'tokens.safetensors'}: a (token_id, token_latent) pair repeats")


def write_run(conn: Connection, rows: RunRows, replace: bool = False) -> bool:
    """Insert `rows` inside the caller's transaction (idempotent on the content hash); returns
    False when the same files are already loaded."""
    found = conn.execute(select(Sae.content_hash, Sae.llm_explanations_hash).where(Sae.id == rows.sae_id)).one_or_none()
    existing = found.content_hash if found is not None else None
    if existing == rows.sae["content_hash"]:
        explained = found.llm_explanations_hash != rows.sae["llm_explanations_hash"]
        if explained:
            log.info("%s: loading its %s LLM explanations", rows.sae_id, f"{len(rows.llm_explanations):,}")
            write_llm_explanations(conn, rows.sae_id, rows.llm_explanations, rows.sae["llm_explanations_hash"])
        # The search documents hold the explanations' words; an SAE loaded before they existed
        # (migration 0008) has none: both are written here without reloading the rest.
        if explained or not has_search_documents(conn, rows.sae_id):
            log.info("%s: writing its search documents", rows.sae_id)
            conn.execute(text(f"DELETE FROM {SEARCH_TABLE} WHERE sae_id = :sae_id"), {"sae_id": rows.sae_id})
            write_tables(conn, rows.sae_id, {SEARCH_TABLE: rows.tables[SEARCH_TABLE]})
            return True
    if not must_write(existing, rows.sae["content_hash"], f"SAE {rows.sae_id!r}", replace):
        return False
    if existing is not None:
        log.info("replacing %s", rows.sae_id)
        delete_sae(conn, rows.sae_id)
    twin = conn.execute(select(Sae.id).where(Sae.content_hash == rows.sae["content_hash"])).scalar_one_or_none()
    if twin is not None:  # the same files under another id (load --id): one SAE, one id
        raise LoadError(f"{rows.sae['run_dir']} is already loaded as {twin!r}")
    conn.execute(Sae.__table__.insert(), [dict(rows.sae)])
    write_tables(conn, rows.sae_id, rows.tables)
    write_explainability(conn, rows.sae_id)
    write_llm_explanations(conn, rows.sae_id, rows.llm_explanations, rows.sae["llm_explanations_hash"])
    if rows.ablations is not None:
        write_ablations(conn, rows.ablations.rows(rows.sae_id, rows.sae["content_hash"]))
    return True


def write_explainability(conn: Connection, sae_id: str) -> None:
    """The explainability of the SAE's latents just written (app.quality.explainability), kept
    with the SAE for its pages, inside the caller's transaction."""
    found = explainability(conn, [sae_id]).get(sae_id)
    kept = None if found is None else found.model_dump_json()
    conn.execute(Sae.__table__.update().where(Sae.id == sae_id).values(explainability=kept))


def write_ablations(conn: Connection, records: list[dict]) -> None:
    """The harvest's ablation sections, through SQLAlchemy (a few thousand rows, and a timestamp
    that the bulk paths do not write), in the caller's transaction."""
    log.info("writing %s latent_ablations rows", f"{len(records):,}")
    for start in range(0, len(records), 1000):
        conn.execute(LatentAblation.__table__.insert(), records[start : start + 1000])


def has_search_documents(conn: Connection, sae_id: str) -> bool:
    return conn.execute(text(f"SELECT 1 FROM {SEARCH_TABLE} WHERE sae_id = :sae_id LIMIT 1"), {"sae_id": sae_id}).first() is not None


def must_write(existing_hash: str | None, content_hash: str, what: str, replace: bool) -> bool:
    """Whether a load writes `what`: not when it is loaded from the same files (the same content
    hash); an error when it is loaded from other files and `replace` is off."""
    if existing_hash == content_hash:
        log.info("%s is already loaded from these files: nothing to do", what)
        return False
    if existing_hash is not None and not replace:
        raise LoadError(f"{what} is already loaded from different files; load it with --replace to overwrite it")
    return True


def write_tables(conn: Connection, sae_id: str, tables: dict[str, Rows]) -> None:
    """Bulk-write one SAE's rows of each table, in chunks, inside the caller's transaction."""
    writer = _copy_table if conn.dialect.name == "postgresql" else _insert_table
    dbapi = conn.connection.dbapi_connection  # the same connection, inside the same transaction
    for name, table_rows in tables.items():
        log.info("writing %s %s rows", f"{len(table_rows):,}", name)
        for start in range(0, len(table_rows), BATCH):
            chunk = {column: values[start:start + BATCH] for column, values in table_rows.columns.items()}
            writer(dbapi, name, sae_id, chunk)


def delete_sae(conn: Connection, sae_id: str) -> bool:
    """Delete one SAE and everything under it, children first (no reliance on cascades);
    False when there was no such SAE. A ladder the SAE is a rung of is unloaded too (its fits
    and families; its other SAEs stay): its families point into this SAE's latents."""
    for (ladder_id,) in conn.execute(select(LadderRung.ladder_id).where(LadderRung.sae_id == sae_id)).all():
        delete_ladder(conn, ladder_id)
    for table in (Example, Context, LatentDetail, Latent, Vocab, TokenLatent, ExplanationTerm, LatentAblation,
                  LatentExplanation):
        conn.execute(delete(table).where(table.sae_id == sae_id))
    conn.execute(text(f"DELETE FROM {SEARCH_TABLE} WHERE sae_id = :sae_id"), {"sae_id": sae_id})  # outside the models
    return conn.execute(delete(Sae).where(Sae.id == sae_id)).rowcount > 0


def delete_ladder(conn: Connection, ladder_id: str) -> None:
    """Delete a ladder's record: its families, rungs and fits (not its SAEs)."""
    log.info("unloading ladder %s (its SAEs stay)", ladder_id)
    rungs = select(LadderRung.sae_id).where(LadderRung.ladder_id == ladder_id)
    conn.execute(delete(LatentFamily).where(LatentFamily.sae_id.in_(rungs)))
    conn.execute(delete(LadderRung).where(LadderRung.ladder_id == ladder_id))
    conn.execute(delete(Ladder).where(Ladder.id == ladder_id))


# ------------------------------------------------------------ the two bulk paths


def _insert_table(dbapi, table: str, sae_id: str, columns: dict) -> None:
    """SQLite: one executemany over the raw sqlite3 connection (no per-row ORM objects)."""
    names = ["sae_id", *columns]
    n = len(next(iter(columns.values())))
    as_python = [_sqlite_column(values) for values in columns.values()]
    sql = f'INSERT INTO {table} ({", ".join(_quote(c) for c in names)}) VALUES ({", ".join("?" * len(names))})'
    cursor = dbapi.cursor()
    try:
        cursor.executemany(sql, zip(repeat(sae_id, n), *as_python))
    finally:
        cursor.close()


def _sqlite_column(values):
    if isinstance(values, list):
        return values
    if values.ndim == 2:  # one BLOB per row, in the column's byte order
        return [row.tobytes() for row in values]
    return values.tolist()


# PostgreSQL's binary COPY: a header, then per row a field count (int16) and per field its byte
# length (int32, -1 for NULL) and its bytes, all big-endian; see the COPY page of the manual.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)
COPY_NULL = struct.pack("!i", -1)
# Our column types (models.py): Integer -> int4, Float -> float8, LargeBinary -> bytea.
COPY_TYPES = {"i": ">i4", "f": ">f8"}


def _copy_table(dbapi, table: str, sae_id: str, columns: dict) -> None:
    """PostgreSQL: COPY ... FROM STDIN (FORMAT BINARY), the fixed-width part of every row laid
    out by numpy.

    COPY takes the columns in the order its statement lists them, so the fixed-width ones (sae_id,
    numbers, BLOBs of 2-D arrays) go first, as one numpy record array, and the variable-width ones
    (text, values that may be NULL) after, encoded per row in Python."""
    fixed = {name: values for name, values in columns.items() if isinstance(values, np.ndarray)}
    variable = {name: values for name, values in columns.items() if not isinstance(values, np.ndarray)}
    names = ["sae_id", *fixed, *variable]
    records = _copy_records(sae_id.encode(), list(fixed.values()), len(names))
    sql = f'COPY {table} ({", ".join(_quote(c) for c in names)}) FROM STDIN (FORMAT BINARY)'
    with dbapi.cursor() as cursor, cursor.copy(sql) as copy:
        copy.write(COPY_HEADER)
        if not variable:
            copy.write(records.tobytes())
        else:
            width, data = records.dtype.itemsize, records.tobytes()
            tails = [b"".join(fields) for fields in zip(*[[_copy_field(v) for v in values] for values in variable.values()])]
            copy.write(b"".join(part for i, tail in enumerate(tails) for part in (data[i * width:(i + 1) * width], tail)))
        copy.write(COPY_TRAILER)


def _copy_records(sae_id: bytes, arrays: list[np.ndarray], n_fields: int) -> np.ndarray:
    fields = [("nfields", ">i2"), ("len0", ">i4"), ("col0", f"S{len(sae_id)}")]
    for i, array in enumerate(arrays, start=1):
        dtype = f"V{array.shape[1] * array.itemsize}" if array.ndim == 2 else COPY_TYPES[array.dtype.kind]
        fields += [(f"len{i}", ">i4"), (f"col{i}", dtype)]
    n = len(arrays[0])
    records = np.empty(n, dtype=np.dtype(fields))  # packed: no padding between fields
    records["nfields"] = n_fields
    records["len0"], records["col0"] = len(sae_id), sae_id
    for i, array in enumerate(arrays, start=1):
        records[f"len{i}"] = records.dtype[f"col{i}"].itemsize
        records[f"col{i}"] = np.ascontiguousarray(array).view(f"V{records.dtype[f'col{i}'].itemsize}")[:, 0] \
            if array.ndim == 2 else array
    return records


def _copy_field(value) -> bytes:
    """One variable-width field (the read_run values are already str, int, float or None)."""
    if value is None:
        return COPY_NULL
    if isinstance(value, str):
        data = value.encode()
        return struct.pack("!i", len(data)) + data
    if isinstance(value, float):
        return struct.pack("!id", 8, value)
    return struct.pack("!ii", 4, value)


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


def clean_text(text: str) -> str:
    """Text both databases can store: PostgreSQL's text holds no NUL character (shown instead as
    U+2400 ␀), and neither stores a lone surrogate (U+FFFD instead)."""
    text = text.replace("\x00", "\u2400")
    return text.encode("utf-8", "replace").decode() if _SURROGATE.search(text) else text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _explanation(explanation: dict | None) -> dict:
    """An explanations.json entry with every field present: scores as finite floats or None,
    counts as ints or None, patterns as JSON text."""
    explanation = explanation if isinstance(explanation, dict) else {}
    text = explanation.get("text")
    if not (isinstance(text, str) and text):
        explanation, text = {}, None  # no pattern: scores (if any) would rank a latent by nothing shown
    return {
        "text": None if text is None else clean_text(text),
        "patterns": json.dumps(explanation["patterns"]) if explanation.get("patterns") else None,
        **{key: _number(explanation.get(key)) for key in ("precision", "recall", "f1")},
        **{key: int(explanation[key]) if isinstance(explanation.get(key), int) else None for key in ("matches", "firings")},
    }


def finite_json(obj):
    """metrics.json may hold NaN/Infinity (Python's json writes them); store valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_json(v) for v in obj]
    return obj

