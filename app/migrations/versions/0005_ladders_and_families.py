"""scaling ladders: a sweep's fits (ladders), its SAEs (ladder_rungs), and each latent's nearest
latents in the other sizes (latent_families)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

latent_families has no foreign keys, like examples (0003 says why); the two small tables have.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ladders",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("sweep", sa.Text(), nullable=False),
        sa.Column("scaling", sa.Text(), nullable=False),
        sa.Column("families", sa.Text(), nullable=True),
        sa.Column("sweep_dir", sa.String(1000), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ladders"),
    )
    op.create_table(
        "ladder_rungs",
        sa.Column("ladder_id", sa.String(200), nullable=False),
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("run", sa.String(300), nullable=False),
        sa.Column("n_latents", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["ladder_id"], ["ladders.id"], name="fk_ladder_rungs_ladder_id_ladders", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name="fk_ladder_rungs_sae_id_saes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("ladder_id", "sae_id", name="pk_ladder_rungs"),
    )
    op.create_index("ix_ladder_rungs_sae_id", "ladder_rungs", ["sae_id"], unique=True)
    op.create_table(
        "latent_families",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("latent", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("nearest_index", sa.LargeBinary(), nullable=False),
        sa.Column("nearest_cosine", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "latent", name="pk_latent_families"),
    )


def downgrade() -> None:
    op.drop_table("latent_families")
    op.drop_index("ix_ladder_rungs_sae_id", table_name="ladder_rungs")
    op.drop_table("ladder_rungs")
    op.drop_table("ladders")
