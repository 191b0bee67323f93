"""explanations from a language model: latent_explanations (`saescope explain`, loaded with the
run), and the hash of the file they were loaded from (saes.llm_explanations_hash)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

No foreign key, as examples: the loader writes and deletes an SAE's rows with it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "latent_explanations",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("latent", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("source", sa.String(300), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("prompt_version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("n_scored", sa.Integer(), nullable=False),
        sa.Column("true_positives", sa.Integer(), nullable=False),
        sa.Column("false_negatives", sa.Integer(), nullable=False),
        sa.Column("true_negatives", sa.Integer(), nullable=False),
        sa.Column("false_positives", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "latent", "source", name="pk_latent_explanations"),
    )
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("llm_explanations_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("llm_explanations_hash")
    op.drop_table("latent_explanations")
