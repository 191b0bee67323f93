"""what the SAE and ladder pages summed over every latent or explanation of an SAE on each view,
kept with the SAE: the language models' explanations per model (saes.detection) and the
explainability of its latents' explanations (saes.explainability), both written by the loader

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

SAEs loaded before get theirs here, from the rows they hold, as the loader computes them
(app.quality.detection_summary and explainability).
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
    from app.quality import detection_summary, explainability

    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("detection", sa.Text(), server_default="[]", nullable=False))
        batch.add_column(sa.Column("explainability", sa.Text(), nullable=True))
    conn = op.get_bind()
    sae_ids = list(conn.execute(sa.text("SELECT id FROM saes")).scalars())
    for sae_id, found in explainability(conn, sae_ids).items():
        conn.execute(sa.text("UPDATE saes SET explainability = :kept WHERE id = :id"),
                     {"kept": found.model_dump_json(), "id": sae_id})
    scores: dict[str, list[tuple[str, float]]] = {}
    for sae_id, source, score in conn.execute(sa.text("SELECT sae_id, source, score FROM latent_explanations")):
        scores.setdefault(sae_id, []).append((source, score))
    for sae_id, found in scores.items():
        conn.execute(sa.text("UPDATE saes SET detection = :summary WHERE id = :id"),
                     {"summary": json.dumps(detection_summary(found)), "id": sae_id})


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("explainability")
        batch.drop_column("detection")
