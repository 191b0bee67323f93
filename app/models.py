"""The database schema as SQLAlchemy 2.0 models. Migrations (not `create_all`) create it.

Binary columns keep the harvest compact: small per-latent arrays (histograms, quantile edges,
logit effects, neighbours) as one little-endian BLOB each in `latent_details` (`LATENT_BLOBS`
gives their dtypes), token ids as int32 and activations as float16; one row per context and one
per (latent, bin, rank) example. Each context's tokens are stored once; examples point at them.
The search tables (`vocab`, `token_latents`, `explanation_terms`) are each read through one
index range per query (tests/app/test_web_explain.py). Like `examples`, they and
`latent_details` have no foreign keys: the loader, their only writer, fills and empties them with
the SAE in one transaction.
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

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # RunConfig.slug, or load --id
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
    # harvest.json as loaded: tokens seen, bins, seed, the positions and tokens left out.
    harvest: Mapped[str] = mapped_column(Text, server_default="{}")
    # The SAE page's log10-density histogram over its latents, with dead and dense counts,
    # computed once at load time (JSON, see app.loader.density_histogram).
    density_histogram: Mapped[str | None] = mapped_column(Text)
    n_explained: Mapped[int] = mapped_column(Integer, server_default="0")  # latents with a scored explanation
    # sha256 of RUN/llm_explanations.jsonl as loaded (NULL: none): a load after `saescope explain`
    # replaces the SAE's latent_explanations alone (the rest has the same content_hash).
    llm_explanations_hash: Mapped[str | None] = mapped_column(String(64))
    # Those explanations summed up per language model (JSON, app.quality.detection_summary), written
    # with them: the SAE page reads this one row, not every explanation of a 65,536-latent SAE.
    detection: Mapped[str] = mapped_column(Text, server_default="[]")
    # The explainability of its latents' explanations (JSON, app.quality.ExplainabilityOut; NULL:
    # none fires on held-out contexts), computed by the loader with them, for the same reason.
    explainability: Mapped[str | None] = mapped_column(Text)


# The dtype of each per-latent BLOB (little-endian): the loader writes them, app.features reads them.
LATENT_BLOBS = {
    "histogram": "<i8", "quantile_edges": "<f4", "quantile_share": "<f4",
    "logit_top_ids": "<i4", "logit_top_values": "<f4", "logit_bottom_ids": "<i4", "logit_bottom_values": "<f4",
    "logit_histogram": "<i8", "neighbour_index": "<i4", "neighbour_cosine": "<f4",
}


class Latent(Base):
    __tablename__ = "latents"
    # The SAE page's sort orders, index breaking ties: a page is one index range scan (no sort),
    # on both backends (tests/app/test_web_explain.py).
    __table_args__ = (
        Index("ix_latents_sae_id_density_index", "sae_id", "density", "index"),
        Index("ix_latents_sae_id_max_activation_index", "sae_id", "max_activation", "index"),
        Index("ix_latents_sae_id_explanation_f1_index", "sae_id", "explanation_f1", "index"),
    )

    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    density: Mapped[float] = mapped_column(Float)
    max_activation: Mapped[float] = mapped_column(Float)
    mean_activation: Mapped[float] = mapped_column(Float)
    # The automatic explanation (trainer/explain.py): a token pattern, scored on held-out text.
    explanation: Mapped[str | None] = mapped_column(Text)  # e.g. "socket.⟦AF⟧ | ⟦AF_⟧"
    explanation_precision: Mapped[float | None] = mapped_column(Float)  # NULL: not scored
    explanation_recall: Mapped[float | None] = mapped_column(Float)
    explanation_f1: Mapped[float | None] = mapped_column(Float)
    explanation_matches: Mapped[int | None] = mapped_column(Integer)  # held-out tokens the pattern matches
    explanation_firings: Mapped[int | None] = mapped_column(Integer)  # held-out tokens the latent fires on


class LatentDetail(Base):
    """What only a latent's own page shows: the harvest's per-latent arrays
    (trainer.runfolder.HARVEST_TENSORS), one BLOB each, and the explanation's token patterns.
    Kept out of `latents` so that its rows stay narrow: PostgreSQL pages through a narrow table
    by its sort indexes, but through a wide one by reading and sorting all of an SAE's rows.
    No foreign key, like `examples`."""

    __tablename__ = "latent_details"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    histogram: Mapped[bytes] = mapped_column(LargeBinary)  # int64 (H,) firings per bin over (0, max]
    quantile_edges: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (Q+1,)
    quantile_share: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (Q,) share of firings per bin
    logit_top_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 (L,)
    logit_top_values: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (L,)
    logit_bottom_ids: Mapped[bytes] = mapped_column(LargeBinary)
    logit_bottom_values: Mapped[bytes] = mapped_column(LargeBinary)
    logit_histogram: Mapped[bytes] = mapped_column(LargeBinary)  # int64 (H,) vocab tokens per bin
    logit_min: Mapped[float] = mapped_column(Float)
    logit_max: Mapped[float] = mapped_column(Float)
    neighbour_index: Mapped[bytes] = mapped_column(LargeBinary)  # int32 (M,) most similar first
    neighbour_cosine: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (M,)
    explanation_patterns: Mapped[str | None] = mapped_column(Text)  # JSON: token-id lists, last = the firing token


class Context(Base):
    __tablename__ = "contexts"

    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    context_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian, (T,)
    tokens: Mapped[str] = mapped_column(Text)  # JSON list of T readable strings


class Example(Base):
    """One example context of a latent: `bin` 0 holds its top contexts (rank 0 = strongest),
    bins 1..Q the contexts sampled from each activation quantile (bin Q = the highest). No foreign keys, on purpose (migration 0003): PostgreSQL
    checks a foreign key with one query per inserted row, which made loading 3 million examples
    three times slower. The loader is the only writer: it writes a run's examples in the same
    transaction as the latents and contexts they point at (built from the same arrays), and
    `loader.delete_sae` removes children explicitly; tests/app/test_web_load_kill.py checks for
    orphans."""

    __tablename__ = "examples"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    latent_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bin: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, server_default="0")
    rank: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    context_id: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer, server_default="0")  # the firing shown: top = argmax, quantile = sampled
    max_activation: Mapped[float] = mapped_column(Float)  # over the whole context
    activations: Mapped[bytes] = mapped_column(LargeBinary)  # float16 little-endian, (T,)


class Vocab(Base):
    """Each SAE's token strings (its model's vocabulary, readable), indexed by text so that a
    search for ` def` finds its id without reading the table."""

    __tablename__ = "vocab"
    __table_args__ = (Index("ix_vocab_sae_id_token", "sae_id", "token"),)

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    token: Mapped[str] = mapped_column(Text)


class TokenLatent(Base):
    """For search by token: the few latents that fire most on each token (tokens.safetensors),
    read by the key's (sae_id, token_id) prefix."""

    __tablename__ = "token_latents"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    latent: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mean_activation: Mapped[float] = mapped_column(Float)  # over every occurrence of the token, zeros included
    fire_rate: Mapped[float] = mapped_column(Float)  # share of the token's occurrences where the latent fires
    occurrences: Mapped[int] = mapped_column(Integer)  # the token's occurrences in the harvest


class ExplanationTerm(Base):
    """For search by text: each normalised word of each latent's explanation, read by the key's
    (sae_id, term) prefix."""

    __tablename__ = "explanation_terms"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    term: Mapped[str] = mapped_column(String(200), primary_key=True)
    latent: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # The rank of the match: the explanation's F1, or -1 when it was not scored (kept here so that
    # search needs no join to rank).
    score: Mapped[float] = mapped_column(Float)


# Search by meaning (app/fulltext.py): one full-text document per latent in `latent_search`, an
# FTS5 virtual table on SQLite (with its shadow tables) and a table with a tsvector column on
# PostgreSQL. Migration 0008 makes it; it is not in the models' metadata, which cannot describe
# either shape, and schema comparisons leave these names out (`compared_in_schema`).
SEARCH_TABLE = "latent_search"
SEARCH_TABLES = {SEARCH_TABLE, *(f"{SEARCH_TABLE}_{shadow}" for shadow in ("data", "idx", "content", "docsize", "config"))}


def compared_in_schema(name: str | None, type_: str, parent_names=None) -> bool:
    """Alembic's `include_name`: whether a name is compared with the models (not the search
    tables, nor anything of theirs)."""
    if type_ == "table":
        return name not in SEARCH_TABLES
    return (parent_names or {}).get("table_name") not in SEARCH_TABLES


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


class Ladder(Base):
    """A scaling sweep (`saescope sweep`, loaded by app.sweep_loader): its scaling.json, and in
    `ladder_rungs` the SAEs it trained."""

    __tablename__ = "ladders"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # e.g. smollm2-135m-instruct-l6-1024to32768-k32
    model: Mapped[str] = mapped_column(String(300))
    layer: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)  # k of the n series
    sweep: Mapped[str] = mapped_column(Text)  # sweep.json as loaded: the sweep's and the training's options
    scaling: Mapped[str] = mapped_column(Text)  # scaling.json as loaded (trainer/scaling.py documents it)
    # The sizes that feature families match, in latent_families' order: JSON {"neighbours": m,
    # "rungs": [{"sae_id", "n_latents"}], smallest first}; NULL when the sweep matched none.
    families: Mapped[str | None] = mapped_column(Text)
    sweep_dir: Mapped[str] = mapped_column(String(1000))
    content_hash: Mapped[str] = mapped_column(String(64))  # sweep.json, scaling.json, families, every rung's hash
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LadderRung(Base):
    """One SAE of a ladder. An SAE is a rung of at most one ladder (the unique index, which also
    finds an SAE's ladder for its pages)."""

    __tablename__ = "ladder_rungs"
    __table_args__ = (Index("ix_ladder_rungs_sae_id", "sae_id", unique=True),)

    ladder_id: Mapped[str] = mapped_column(ForeignKey("ladders.id", ondelete="CASCADE"), primary_key=True)
    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    run: Mapped[str] = mapped_column(String(300))  # the rung's folder in the sweep (runs/n1024-k32): scaling.json's key
    n_latents: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)


class LatentFamily(Base):
    """A latent's nearest latents by decoder cosine in every other size of its ladder's n series
    (families.safetensors, trainer/families.py): row r of each BLOB is the r-th of the ladder's
    `families` rungs other than this latent's own SAE, most similar first, padded with index -1
    where that SAE has fewer latents than `neighbours`. One row per latent: the feature page reads
    it by primary key. No foreign key, like `examples`: the loader is its only writer."""

    __tablename__ = "latent_families"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    latent: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    nearest_index: Mapped[bytes] = mapped_column(LargeBinary)  # int32 (R-1, m) little-endian
    nearest_cosine: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (R-1, m)


class SteerShare(Base):
    """A steering someone shared: `/s/{id}` reopens it. The request (SAE, prompt, latents,
    strengths, mode, sampler) and its result are stored together, so the link shows the exact
    texts it was made with, on any server, with or without the model. The id is derived from the
    SAE and the request (app.steer_shares), as a probe's share link is; no foreign key, for the
    same reason as share_links."""

    __tablename__ = "steer_shares"
    __table_args__ = (Index("ix_steer_shares_sae_id", "sae_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sae_id: Mapped[str] = mapped_column(String(200))
    request: Mapped[str] = mapped_column(Text)  # JSON: the SteerRequest's fields
    result: Mapped[str] = mapped_column(Text)  # JSON: the SteerOut as it was shown
    sae_content_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LatentAblation(Base):
    """What removing a latent changes over its first top examples (trainer.interventions
    .ablation_effects), computed on the feature page's first view and kept: JSON, keyed by the
    SAE's weights (content_hash) too, so that a reloaded SAE computes it again. No foreign key,
    like `examples`; the loader deletes an SAE's rows with it."""

    __tablename__ = "latent_ablations"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    latent: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    content_hash: Mapped[str] = mapped_column(String(64))
    effects: Mapped[str] = mapped_column(Text)  # JSON: the feature page's AblationOut
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LatentExplanation(Base):
    """An explanation of a latent by a language model (`saescope explain`,
    trainer/llm_explanations.py), scored by detection: `score` is the balanced accuracy of the
    model's guesses of which of `n_scored` held-out contexts make the latent fire (0.5 = chance).
    One row per (latent, source): a source is the model's name (a run explained by two models
    has both). The n-gram explanation stays in `latents`. No foreign key, like `examples`: the
    loader is its only writer and deletes an SAE's rows with it."""

    __tablename__ = "latent_explanations"

    sae_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    latent: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    source: Mapped[str] = mapped_column(String(300), primary_key=True)  # the model's name (--llm-model)
    url: Mapped[str] = mapped_column(Text)  # the chat-completions endpoint that answered
    prompt_version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)  # detection balanced accuracy, 0..1
    n_scored: Mapped[int] = mapped_column(Integer)  # held-out contexts scored, half of them firing
    true_positives: Mapped[int] = mapped_column(Integer)
    false_negatives: Mapped[int] = mapped_column(Integer)
    true_negatives: Mapped[int] = mapped_column(Integer)
    false_positives: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)  # when it was made
