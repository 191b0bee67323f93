"""share links: probes saved under a short permanent id (/p/{id})

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "share_links",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("sae_id", sa.String(200), nullable=False),  # no foreign key: links outlive a reload
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("sae_content_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_share_links"),
    )
    op.create_index("ix_share_links_sae_id", "share_links", ["sae_id"])


def downgrade() -> None:
    op.drop_index("ix_share_links_sae_id", table_name="share_links")
    op.drop_table("share_links")
