"""Load a sweep folder (`saescope sweep`) into SQL: every rung as an SAE, the ladder's fits and its
feature families. Checked first, then written in one transaction, like app.loader's runs.

    ladder_id = load_sweep("sweeps/smollm2", "sqlite:///saescope.db")

Checked before the database is touched (RunFolderError, naming the file):
- sweep.json names the rungs; each is a complete, harvested run folder, read in full by
  app.loader.read_run and then dropped, so that one rung at a time is in memory;
- scaling.json has a row per rung with the rung's own FVU (else it predates a rung: rerun the
  sweep, which refits);
- families.safetensors (when the sweep matched families) has trainer/families.py's layout, and
  the first latents' cosines match the rungs' decoders.

Then one transaction: each rung not yet loaded from these files is read again and written by
app.loader's bulk paths, then the ladder, its rungs and one latent_families row per latent of the
n series. A process killed at any point leaves the database as it was or with the whole sweep.
Loading the same folder twice is a no-op. A ladder of the same id from other files, a rung
loaded from other files, or a rung of another ladder (whose record is then unloaded; its SAEs
stay) needs `replace=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from sqlalchemy import Connection, Engine, select

from app.loader import (
    LoadError,
    Rows,
    advisory_lock,
    delete_ladder,
    finite_json,
    lock_sae,
    must_write,
    read_run,
    write_run,
    write_tables,
    write_to_database,
    write_transaction,
)
from app.models import Ladder, LadderRung, LatentFamily, Sae
from trainer.config import run_slug
from trainer.errors import RunFolderError
from trainer.families import FAMILIES_FILE
from trainer.files import read_json, read_tensors
from trainer.runfolder import harvest_is_current, load_sae_weights

log = logging.getLogger("app.loader")

# The sweep folder's names (trainer/sweep.py, trainer/scaling.py), spelled out here: importing
# those modules would bring the training loop into the app.
SWEEP_FILE, SCALING_FILE, RUNS_DIR = "sweep.json", "scaling.json", "runs"
CHECKED_LATENTS = 4  # latents per ordered pair of sizes whose family cosines are recomputed at load


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()


@dataclass
class Rung:
    run: str  # the rung's folder relative to the sweep (runs/n1024-k32), as scaling.json names it
    run_dir: Path
    sae: dict  # app.loader.read_run's SAE row: id, n_latents, k, content_hash, ...


@dataclass
class SweepRows:
    """What a sweep puts into the database besides its rungs' own rows, read and checked."""

    ladder: dict  # the ladders row
    rungs: list[Rung]
    families: dict[str, Rows]  # latent_families rows by SAE id

    @property
    def ladder_id(self) -> str:
        return self.ladder["id"]


def load_sweep(sweep_dir: str | Path, database_url: str, replace: bool = False) -> str:
    """Load `sweep_dir` into the database at `database_url` (migrated first); returns the ladder id."""
    rows = read_sweep(sweep_dir)
    write_to_database(database_url, lambda engine: write_sweep_in_one_transaction(engine, rows, replace=replace))
    return rows.ladder_id


# ------------------------------------------------------------ reading and checking


def read_sweep(sweep_dir: str | Path) -> SweepRows:
    sweep_dir = Path(sweep_dir).resolve()
    sweep = read_json(sweep_dir / SWEEP_FILE)
    names = sweep.get("rungs") if isinstance(sweep, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        raise RunFolderError(f"{sweep_dir / SWEEP_FILE}: expected a non-empty list of rung names under 'rungs'")
    rungs = [read_rung(sweep_dir, name) for name in names]
    scaling = read_json(sweep_dir / SCALING_FILE)
    check_scaling(sweep_dir / SCALING_FILE, scaling, rungs)
    families, family_rungs = read_families(sweep_dir, rungs)
    first = rungs[0].sae
    if len({(rung.sae["model"], rung.sae["layer"]) for rung in rungs}) > 1:
        raise RunFolderError(f"{sweep_dir / SWEEP_FILE}: the rungs are not all of one model and layer")
    k = int(sweep.get("sweep", {}).get("k", scaling.get("k", first["k"])))
    sizes = [rung.sae["n_latents"] for rung in rungs if rung.sae["k"] == k] or [rung.sae["n_latents"] for rung in rungs]
    ladder = {
        "id": run_slug(first["model"], first["layer"], f"{min(sizes)}to{max(sizes)}", k),
        "model": first["model"],
        "layer": first["layer"],
        "k": k,
        "sweep": json.dumps(finite_json(sweep), sort_keys=True),
        "scaling": json.dumps(finite_json(scaling), sort_keys=True),
        "families": family_rungs,
        "sweep_dir": str(sweep_dir),
        "content_hash": sweep_hash(sweep_dir, rungs),
    }
    return SweepRows(ladder=ladder, rungs=rungs, families=families)


def read_rung(sweep_dir: Path, name: str) -> Rung:
    run_dir = sweep_dir / RUNS_DIR / name
    if not harvest_is_current(run_dir):
        raise RunFolderError(f"{run_dir}: not harvested; run the same `saescope sweep` command again "
                             "(it harvests every rung, skipping finished ones)")
    log.info("checking %s", run_dir)
    return Rung(run=f"{RUNS_DIR}/{name}", run_dir=run_dir, sae=read_run(run_dir).sae)


def check_scaling(path: Path, scaling: dict, rungs: list[Rung]) -> None:
    """scaling.json has a row per rung, with the FVU of the rung's metrics.json."""
    rows = {row.get("run"): row for row in scaling.get("rungs", [])} if isinstance(scaling, dict) else {}
    if not rows or not isinstance(scaling.get("fits"), dict):
        raise RunFolderError(f"{path}: expected 'rungs' and 'fits' (trainer/scaling.py)")
    for rung in rungs:
        fvu = json.loads(rung.sae["metrics"]).get("fvu")
        row = rows.get(rung.run)
        if row is None or fvu is None or not math.isclose(row.get("fvu") or math.nan, fvu, rel_tol=1e-9):
            raise RunFolderError(f"{path}: does not describe {rung.run} as its metrics.json does "
                                 "(a rung changed since the fit); run the same `saescope sweep` command again to refit")


def read_families(sweep_dir: Path, rungs: list[Rung]) -> tuple[dict[str, Rows], str | None]:
    """families.safetensors as latent_families rows per SAE, and the ladder's `families` JSON
    (None when the sweep matched no families)."""
    path = sweep_dir / FAMILIES_FILE
    if not path.exists():
        return {}, None  # --family-neighbours 0
    metadata = _metadata(path)
    by_run = {rung.run: rung for rung in rungs}
    try:
        order = [by_run[run] for run in json.loads(metadata["rungs"])]
        m = int(metadata["neighbours"])
    except (KeyError, ValueError, TypeError):
        raise RunFolderError(f"{path}: its rungs are not this sweep's (or its metadata is damaged); "
                             "run the same `saescope sweep` command again") from None
    sizes = [rung.sae["n_latents"] for rung in order]
    if len(order) < 2:
        return {}, None  # one size: no families
    names = [f"{i}->{j}.{part}" for i in range(len(order)) for j in range(len(order)) if i != j for part in ("index", "cosine")]
    tensors = read_tensors(path, tuple(names))
    for i, n_i in enumerate(sizes):
        for j, n_j in enumerate(sizes):
            if i != j:
                _check_pair(path, tensors, i, j, (n_i, min(m, n_j)), n_j)
    check_family_cosines(path, tensors, order)
    rows = {rung.sae["id"]: family_rows(tensors, i, sizes, m) for i, rung in enumerate(order)}
    record = {"neighbours": m, "rungs": [{"sae_id": rung.sae["id"], "n_latents": rung.sae["n_latents"]} for rung in order]}
    return rows, json.dumps(record)


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RunFolderError(f"{path}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != "saescope-families" or metadata.get("version") != "1":
        raise RunFolderError(f"{path}: not a saescope families file of version 1")
    return metadata


def _check_pair(path: Path, tensors: dict, i: int, j: int, shape: tuple[int, int], n_j: int) -> None:
    index, cosine = tensors[f"{i}->{j}.index"], tensors[f"{i}->{j}.cosine"]
    if tuple(index.shape) != shape or tuple(cosine.shape) != shape:
        raise RunFolderError(f"{path}: {i}->{j} has shape {tuple(index.shape)}, expected {shape}")
    if len(index) and (index.min() < 0 or index.max() >= n_j):
        raise RunFolderError(f"{path}: {i}->{j}.index outside 0..{n_j - 1}")


def check_family_cosines(path: Path, tensors: dict, order: list[Rung]) -> None:
    """The first latents' nearest cosines, recomputed from the decoders: families computed before a
    rung was retrained do not match. Only the rows needed are kept, one decoder read at a time."""
    wanted = {i: set(range(min(CHECKED_LATENTS, rung.sae["n_latents"]))) for i, rung in enumerate(order)}
    pairs = [(i, j) for i in wanted for j in wanted if i != j]
    for i, j in pairs:
        wanted[j] |= set(tensors[f"{i}->{j}.index"][:CHECKED_LATENTS, 0].tolist())
    rows = {}
    for i, rung in enumerate(order):
        W_dec = load_sae_weights(rung.run_dir)["W_dec"]
        rows[i] = {r: F.normalize(W_dec[r].float(), dim=0) for r in wanted[i]}
    for i, j in pairs:
        for latent, (nearest, cosine) in enumerate(zip(tensors[f"{i}->{j}.index"][:CHECKED_LATENTS, 0].tolist(),
                                                       tensors[f"{i}->{j}.cosine"][:CHECKED_LATENTS, 0].tolist())):
            if abs(float(rows[i][latent] @ rows[j][nearest]) - cosine) > 1e-3:
                raise RunFolderError(f"{path}: does not match the decoders of {order[i].run} and {order[j].run} "
                                     "(made before a rung changed); run the same `saescope sweep` command again")


def family_rows(tensors: dict[str, torch.Tensor], i: int, sizes: list[int], m: int) -> Rows:
    """Rung i's latent_families rows: per latent, the other rungs' nearest (R-1, m), padded to m."""
    index, cosine = [], []
    for j in range(len(sizes)):
        if j == i:
            continue
        found_index, found_cosine = tensors[f"{i}->{j}.index"].numpy(), tensors[f"{i}->{j}.cosine"].numpy()
        pad = ((0, 0), (0, m - found_index.shape[1]))
        index.append(np.pad(found_index, pad, constant_values=-1))
        cosine.append(np.pad(found_cosine, pad, constant_values=0))
    n = sizes[i]
    return Rows(LatentFamily, {
        "latent": np.arange(n),
        "nearest_index": np.stack(index, 1).reshape(n, -1).astype("<i4"),
        "nearest_cosine": np.stack(cosine, 1).reshape(n, -1).astype("<f4"),
    })


def sweep_hash(sweep_dir: Path, rungs: list[Rung]) -> str:
    """sha256 over the sweep's own files and every rung's content hash."""
    digest = hashlib.sha256()
    for name in (SWEEP_FILE, SCALING_FILE, FAMILIES_FILE):
        if (sweep_dir / name).is_file():
            digest.update(name.encode() + (sweep_dir / name).read_bytes())
    for rung in rungs:
        digest.update(rung.run.encode() + rung.sae["content_hash"].encode())
    return digest.hexdigest()


# ------------------------------------------------------------ writing


def write_sweep_in_one_transaction(engine: Engine, rows: SweepRows, replace: bool = False) -> bool:
    with write_transaction(engine) as conn:
        advisory_lock(conn, f"saescope.ladder:{rows.ladder_id}")
        written = write_sweep(conn, rows, replace=replace)
        if written:
            log.info("committing ladder %s", rows.ladder_id)
    return written


def write_sweep(conn: Connection, rows: SweepRows, replace: bool = False) -> bool:
    """Insert the sweep inside the caller's transaction; False when these files are loaded."""
    existing = conn.execute(select(Ladder.content_hash).where(Ladder.id == rows.ladder_id)).scalar_one_or_none()
    if not must_write(existing, rows.ladder["content_hash"], f"ladder {rows.ladder_id!r}", replace):
        return False
    if existing is not None:
        delete_ladder(conn, rows.ladder_id)
    for rung in rows.rungs:
        write_rung(conn, rung, rows.ladder_id, replace)
    conn.execute(Ladder.__table__.insert(), [rows.ladder])
    conn.execute(LadderRung.__table__.insert(), [
        {"ladder_id": rows.ladder_id, "sae_id": rung.sae["id"], "run": rung.run, "n_latents": rung.sae["n_latents"],
         "k": rung.sae["k"]} for rung in rows.rungs])
    for sae_id, family in rows.families.items():
        write_tables(conn, sae_id, {LatentFamily.__tablename__: family})
    return True


def write_rung(conn: Connection, rung: Rung, ladder_id: str, replace: bool) -> None:
    """The rung's SAE, unless it is loaded from these files; a rung of another ladder leaves it."""
    sae_id = rung.sae["id"]
    lock_sae(conn, sae_id)
    other = conn.execute(select(LadderRung.ladder_id).where(LadderRung.sae_id == sae_id)).scalar_one_or_none()
    if other is not None:
        if not replace:
            raise LoadError(f"SAE {sae_id!r} is a rung of ladder {other!r}; pass --replace to make it a rung of "
                            f"{ladder_id!r} (ladder {other!r} is unloaded, its SAEs stay)")
        delete_ladder(conn, other)
    loaded = conn.execute(select(Sae.content_hash, Sae.llm_explanations_hash).where(Sae.id == sae_id)).one_or_none()
    if loaded is not None and tuple(loaded) == (rung.sae["content_hash"], rung.sae["llm_explanations_hash"]):
        return
    run_rows = read_run(rung.run_dir)  # read again: only one rung's rows are in memory at a time
    if run_rows.sae["content_hash"] != rung.sae["content_hash"]:
        raise LoadError(f"{rung.run_dir} changed while loading; load again")
    write_run(conn, run_rows, replace=replace)
