"""bulk loading and page indexes: examples without per-row foreign keys; latents indexed in the
SAE page's sort orders

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-27

PostgreSQL checks a foreign key with one query per inserted row: loading 3.3 million examples
spent two thirds of its time there. The loader writes a run's examples in the same transaction
as the latents and contexts they point at, and deletes children explicitly, so the constraints
go (app/models.py says why). The latents indexes gain `index`, the SAE page's tie-breaker, so a
page of any sort order is one index range scan.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("examples") as batch:  # SQLite: batch mode rebuilds the table
        batch.drop_constraint("fk_examples_sae_id_latents", type_="foreignkey")
        batch.drop_constraint("fk_examples_sae_id_contexts", type_="foreignkey")
    op.drop_index("ix_latents_sae_id_density", table_name="latents")
    op.drop_index("ix_latents_sae_id_max_activation", table_name="latents")
    op.create_index("ix_latents_sae_id_density_index", "latents", ["sae_id", "density", "index"])
    op.create_index("ix_latents_sae_id_max_activation_index", "latents", ["sae_id", "max_activation", "index"])


def downgrade() -> None:
    op.drop_index("ix_latents_sae_id_max_activation_index", table_name="latents")
    op.drop_index("ix_latents_sae_id_density_index", table_name="latents")
    op.create_index("ix_latents_sae_id_max_activation", "latents", ["sae_id", "max_activation"])
    op.create_index("ix_latents_sae_id_density", "latents", ["sae_id", "density"])
    with op.batch_alter_table("examples") as batch:
        batch.create_foreign_key("fk_examples_sae_id_latents", "latents", ["sae_id", "latent_index"],
                                 ["sae_id", "index"], ondelete="CASCADE")
        batch.create_foreign_key("fk_examples_sae_id_contexts", "contexts", ["sae_id", "context_id"],
                                 ["sae_id", "context_id"], ondelete="CASCADE")
