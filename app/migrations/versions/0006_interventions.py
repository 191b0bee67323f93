"""interventions: shared steerings (steer_shares, /s/{id}) and each latent's ablation effects,
computed on first view (latent_ablations)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Neither has a foreign key: a shared link outlives a reload (as share_links), and the loader
empties latent_ablations with its SAE (as examples).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "steer_shares",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("sae_content_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_steer_shares"),
    )
    op.create_index("ix_steer_shares_sae_id", "steer_shares", ["sae_id"])
    op.create_table(
        "latent_ablations",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("latent", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("effects", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "latent", name="pk_latent_ablations"),
    )


def downgrade() -> None:
    op.drop_table("latent_ablations")
    op.drop_index("ix_steer_shares_sae_id", table_name="steer_shares")
    op.drop_table("steer_shares")
