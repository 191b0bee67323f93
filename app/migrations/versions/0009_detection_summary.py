"""the language models' explanations of each SAE summed up per model (saes.detection), written by
the loader with them, so that the SAE page reads one row instead of every explanation

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

SAEs loaded before get theirs here, from the explanations they hold, with the loader's own sum
(app.quality.detection_summary).
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from app.quality import detection_summary

    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("detection", sa.Text(), server_default="[]", nullable=False))
    conn = op.get_bind()
    scores: dict[str, list[tuple[str, float]]] = {}
    for sae_id, source, score in conn.execute(sa.text("SELECT sae_id, source, score FROM latent_explanations")):
        scores.setdefault(sae_id, []).append((source, score))
    for sae_id, found in scores.items():
        conn.execute(sa.text("UPDATE saes SET detection = :summary WHERE id = :id"),
                     {"summary": json.dumps(detection_summary(found)), "id": sae_id})


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("detection")
