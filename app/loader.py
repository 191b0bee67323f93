"""Load a run folder into SQL: read and check everything first, then write in one transaction.

    sae_id = load_run("runs/demo", "sqlite:///saescope.db")

A bad folder raises `RunFolderError` (naming the file) before the database is touched. Loading
the same files twice is a no-op; the same SAE id with different files raises `LoadError` unless
`replace=True`, which swaps the old rows for the new ones in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, delete, insert, select

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

BATCH = 2000  # rows per executemany; keeps memory flat and statements under driver limits


class LoadError(ValueError):
    """The run cannot be loaded into this database as asked."""


@dataclass
class RunRows:
    """Everything one run puts into the database, read and checked before any write."""

    sae: dict
    latents: list[dict]
    contexts: list[dict]
    examples: list[dict]

    @property
    def sae_id(self) -> str:
        return self.sae["id"]


def load_run(run_dir: str | Path, database_url: str, replace: bool = False) -> str:
    """Load `run_dir` into the database at `database_url` (migrated first); returns the SAE id."""
    rows = read_run(run_dir)
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:  # one transaction: all rows or none
            write_run(conn, rows, replace=replace)
    finally:
        engine.dispose()
    return rows.sae_id


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
    """Read and check a run folder (raises RunFolderError) and turn it into table rows."""
    run_dir = Path(run_dir).resolve()
    cfg = load_cfg(run_dir)
    load_sae_weights(run_dir, cfg)  # checks the weights exist and match cfg.json
    metrics = load_metrics(run_dir)
    harvest = load_harvest(run_dir, cfg)
    sae_id = sae_slug(cfg)

    token_ids = harvest.token_ids.numpy().astype("<i4")  # (C, T)
    top_context = harvest.top_context.numpy()  # (n, K)
    top_activations = harvest.top_activations.numpy().astype("<f2")  # (n, K, T)
    top_max = harvest.top_max.numpy()  # (n, K)

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
    latents = [
        {"sae_id": sae_id, "index": i, "density": _float(d), "max_activation": _float(m), "mean_activation": _float(a)}
        for i, (d, m, a) in enumerate(
            zip(harvest.density.tolist(), harvest.max_activation.tolist(), harvest.mean_activation.tolist())
        )
    ]
    examples = []
    for latent_index, slots in enumerate(top_context):
        rank = 0
        for slot, context_id in enumerate(slots):
            if context_id < 0:  # empty slot: the latent fired in fewer than K contexts
                continue
            examples.append({
                "sae_id": sae_id,
                "latent_index": latent_index,
                "rank": rank,
                "context_id": int(context_id),
                "max_activation": _float(top_max[latent_index, slot]),
                "activations": top_activations[latent_index, slot].tobytes(),
            })
            rank += 1
    used = np.unique(top_context[top_context >= 0])  # only contexts some example shows
    vocab = harvest.vocab
    contexts = [
        {
            "sae_id": sae_id,
            "context_id": int(c),
            "token_ids": token_ids[c].tobytes(),
            "tokens": json.dumps([vocab[t] for t in token_ids[c].tolist()], ensure_ascii=False),
        }
        for c in used.tolist()
    ]
    return RunRows(sae=sae, latents=latents, contexts=contexts, examples=examples)


def write_run(conn: Connection, rows: RunRows, replace: bool = False) -> None:
    """Insert `rows` inside the caller's transaction (idempotent on the content hash)."""
    existing = conn.execute(select(Sae.content_hash).where(Sae.id == rows.sae_id)).scalar_one_or_none()
    if existing == rows.sae["content_hash"]:
        return  # the same files are already loaded
    if existing is not None:
        if not replace:
            raise LoadError(
                f"SAE {rows.sae_id!r} is already loaded from different files; "
                "pass --replace (replace=True) to overwrite it"
            )
        delete_sae(conn, rows.sae_id)
    conn.execute(insert(Sae), [rows.sae])
    for table, table_rows in ((Latent, rows.latents), (Context, rows.contexts), (Example, rows.examples)):
        for start in range(0, len(table_rows), BATCH):
            conn.execute(insert(table), table_rows[start : start + BATCH])


def delete_sae(conn: Connection, sae_id: str) -> None:
    """Delete one SAE and everything under it, children first (no reliance on cascades)."""
    for table in (Example, Context, Latent):
        conn.execute(delete(table).where(table.sae_id == sae_id))
    conn.execute(delete(Sae).where(Sae.id == sae_id))


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _float(value) -> float:
    """A finite float: a dead latent's mean over zero firings (NaN) is stored as 0."""
    value = float(value)
    return value if math.isfinite(value) else 0.0


def _finite(obj):
    """metrics.json may hold NaN/Infinity (Python's json writes them); store valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
