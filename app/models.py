"""The database schema as SQLAlchemy 2.0 models. Migrations (not `create_all`) create it.

Binary columns keep the harvest compact: token ids as int32 and activations as float16, both
little-endian, one row per context and one per (latent, rank) example. Each context's tokens are
stored once; examples point at them.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Sae(Base):
    __tablename__ = "saes"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # sae_slug(cfg)
    model: Mapped[str] = mapped_column(String(300))
    layer: Mapped[int] = mapped_column(Integer)
    d_in: Mapped[int] = mapped_column(Integer)
    n_latents: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    context_length: Mapped[int | None] = mapped_column(Integer)
    fvu: Mapped[float | None] = mapped_column(Float)
    l0: Mapped[float | None] = mapped_column(Float)
    dead_fraction: Mapped[float | None] = mapped_column(Float)
    cfg: Mapped[str] = mapped_column(Text)  # cfg.json as loaded
    metrics: Mapped[str] = mapped_column(Text)  # metrics.json as loaded
    run_dir: Mapped[str] = mapped_column(String(1000))  # where the probe finds the weights
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256(cfg.json + sae.safetensors)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Latent(Base):
    __tablename__ = "latents"
    # The SAE page's sort orders, index breaking ties: a page is one index range scan (no sort),
    # on both backends (tests/app/test_web_explain.py).
    __table_args__ = (
        Index("ix_latents_sae_id_density_index", "sae_id", "density", "index"),
        Index("ix_latents_sae_id_max_activation_index", "sae_id", "max_activation", "index"),
    )

    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    density: Mapped[float] = mapped_column(Float)
    max_activation: Mapped[float] = mapped_column(Float)
    mean_activation: Mapped[float] = mapped_column(Float)


class Context(Base):
    __tablename__ = "contexts"

    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    context_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian, (T,)
    tokens: Mapped[str] = mapped_column(Text)  # JSON list of T readable strings


class Example(Base):
    """One of a latent's top contexts. No foreign keys, on purpose (migration 0003): PostgreSQL
    checks a foreign key with one query per inserted row, which made loading 3 million examples
    three times slower. The loader is the only writer: it writes a run's examples in the same
    transaction as the latents and contexts they point at (built from the same arrays), and
    `loader.delete_sae` removes children explicitly; tests/app/test_web_load_kill.py checks for
    orphans."""

    __tablename__ = "examples"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    latent_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    context_id: Mapped[int] = mapped_column(Integer)
    max_activation: Mapped[float] = mapped_column(Float)
    activations: Mapped[bytes] = mapped_column(LargeBinary)  # float16 little-endian, (T,)


class ShareLink(Base):
    """A probe someone shared: `/p/{id}` reopens it. The id is derived from the SAE and the text
    (see app.shares.share_digest), so sharing the same probe twice gives the same link.

    No foreign key to `saes` on purpose: reloading an SAE (`saescope load --replace` deletes and
    re-inserts its rows) must not delete the links people have already sent around.
    """

    __tablename__ = "share_links"
    __table_args__ = (Index("ix_share_links_sae_id", "sae_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sae_id: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    sae_content_hash: Mapped[str | None] = mapped_column(String(64))  # the SAE's weights when shared
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
