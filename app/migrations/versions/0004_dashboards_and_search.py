"""feature dashboards and search: explanations on latents, the harvest's per-latent arrays in
latent_details, quantile examples, the SAE's vocabulary, token and explanation search tables

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

Examples gain `bin` (0 = top contexts, 1..Q = activation quantiles) in their primary key and the
`position` of the firing they show. Rows loaded before this revision keep working: they are top
examples (bin 0), without explanations or details until the run is harvested and loaded again.
latent_details and the three search tables have no foreign keys, like examples (0003 says why).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EXPLANATION_COLUMNS = (
    ("explanation", sa.Text), ("explanation_precision", sa.Float), ("explanation_recall", sa.Float),
    ("explanation_f1", sa.Float), ("explanation_matches", sa.Integer), ("explanation_firings", sa.Integer),
)
LATENT_BLOBS = ("histogram", "quantile_edges", "quantile_share", "logit_top_ids", "logit_top_values",
                "logit_bottom_ids", "logit_bottom_values", "logit_histogram", "neighbour_index", "neighbour_cosine")


def upgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("harvest", sa.Text(), server_default="{}", nullable=False))
        batch.add_column(sa.Column("density_histogram", sa.Text(), nullable=True))
        batch.add_column(sa.Column("n_explained", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("latents") as batch:
        for name, type_ in EXPLANATION_COLUMNS:
            batch.add_column(sa.Column(name, type_(), nullable=True))
    op.create_index("ix_latents_sae_id_explanation_f1_index", "latents", ["sae_id", "explanation_f1", "index"])
    op.create_table(
        "latent_details",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        *(sa.Column(name, sa.LargeBinary(), nullable=False) for name in LATENT_BLOBS),
        sa.Column("logit_min", sa.Float(), nullable=False),
        sa.Column("logit_max", sa.Float(), nullable=False),
        sa.Column("explanation_patterns", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("sae_id", "index", name="pk_latent_details"),
    )
    with op.batch_alter_table("examples") as batch:  # SQLite: batch mode rebuilds the table with the new key
        batch.add_column(sa.Column("bin", sa.Integer(), server_default="0", autoincrement=False, nullable=False))
        batch.add_column(sa.Column("position", sa.Integer(), server_default="0", nullable=False))
        batch.drop_constraint("pk_examples", type_="primary")
        batch.create_primary_key("pk_examples", ["sae_id", "latent_index", "bin", "rank"])
    op.create_table(
        "vocab",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("token_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "token_id", name="pk_vocab"),
    )
    op.create_index("ix_vocab_sae_id_token", "vocab", ["sae_id", "token"])
    op.create_table(
        "token_latents",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("token_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("latent", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("mean_activation", sa.Float(), nullable=False),
        sa.Column("fire_rate", sa.Float(), nullable=False),
        sa.Column("occurrences", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "token_id", "latent", name="pk_token_latents"),
    )
    op.create_table(
        "explanation_terms",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("term", sa.String(200), nullable=False),
        sa.Column("latent", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "term", "latent", name="pk_explanation_terms"),
    )


def downgrade() -> None:
    op.drop_table("explanation_terms")
    op.drop_table("token_latents")
    op.drop_index("ix_vocab_sae_id_token", table_name="vocab")
    op.drop_table("vocab")
    # Quantile examples have no place in the old key: only the top contexts (bin 0) stay.
    op.execute("DELETE FROM examples WHERE bin <> 0")
    with op.batch_alter_table("examples") as batch:
        batch.drop_constraint("pk_examples", type_="primary")
        batch.create_primary_key("pk_examples", ["sae_id", "latent_index", "rank"])
        batch.drop_column("position")
        batch.drop_column("bin")
    op.drop_table("latent_details")
    op.drop_index("ix_latents_sae_id_explanation_f1_index", table_name="latents")
    with op.batch_alter_table("latents") as batch:
        for name, _ in reversed(EXPLANATION_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("n_explained")
        batch.drop_column("density_histogram")
        batch.drop_column("harvest")
