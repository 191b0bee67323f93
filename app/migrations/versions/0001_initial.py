"""initial schema: saes, latents, contexts, examples

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saes",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=False),
        sa.Column("n_latents", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=True),
        sa.Column("fvu", sa.Float(), nullable=True),
        sa.Column("l0", sa.Float(), nullable=True),
        sa.Column("dead_fraction", sa.Float(), nullable=True),
        sa.Column("cfg", sa.Text(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("run_dir", sa.String(1000), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_saes"),
        sa.UniqueConstraint("content_hash", name="uq_saes_content_hash"),
    )
    op.create_table(
        "latents",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("density", sa.Float(), nullable=False),
        sa.Column("max_activation", sa.Float(), nullable=False),
        sa.Column("mean_activation", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name="fk_latents_sae_id_saes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sae_id", "index", name="pk_latents"),
    )
    op.create_index("ix_latents_sae_id_density", "latents", ["sae_id", "density"])
    op.create_index("ix_latents_sae_id_max_activation", "latents", ["sae_id", "max_activation"])
    op.create_table(
        "contexts",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("context_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("tokens", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name="fk_contexts_sae_id_saes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sae_id", "context_id", name="pk_contexts"),
    )
    op.create_table(
        "examples",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("latent_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("rank", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("context_id", sa.Integer(), nullable=False),
        sa.Column("max_activation", sa.Float(), nullable=False),
        sa.Column("activations", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sae_id", "latent_index"], ["latents.sae_id", "latents.index"],
            name="fk_examples_sae_id_latents", ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sae_id", "context_id"], ["contexts.sae_id", "contexts.context_id"],
            name="fk_examples_sae_id_contexts", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sae_id", "latent_index", "rank", name="pk_examples"),
    )


def downgrade() -> None:
    op.drop_table("examples")
    op.drop_table("contexts")
    op.drop_index("ix_latents_sae_id_max_activation", table_name="latents")
    op.drop_index("ix_latents_sae_id_density", table_name="latents")
    op.drop_table("latents")
    op.drop_table("saes")
