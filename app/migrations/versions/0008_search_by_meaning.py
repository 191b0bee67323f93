"""search by meaning: one full-text document per latent (latent_search), ranked by relevance

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Dialect-specific, as each backend's full-text search is (app/fulltext.py queries both):

- SQLite: an FTS5 virtual table with the porter stemmer; its `rank` is configured here as BM25
  with a weight per column (explanation, fires_on, context), so that `ORDER BY rank` is answered
  by the index itself.
- PostgreSQL: a table with the same text columns and a stored tsvector made from them with
  `setweight` (A explanation, B fires_on, C context), under a GIN index.

The loader fills it with the SAE, in the same transaction; loaded SAEs get their documents when
they are loaded again (`saescope load --replace`). The table is outside the models' metadata
(app.models.SEARCH_TABLES): neither shape is a plain table SQLAlchemy can describe.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# BM25 weights of the three indexed columns; the three unindexed ones count for nothing. Kept equal
# to app.fulltext.COLUMN_WEIGHTS (tests/app/test_web_search.py checks).
SQLITE_RANK = "bm25(8.0, 3.0, 1.0, 0.0, 0.0, 0.0)"
POSTGRES_DOCUMENT = ("setweight(to_tsvector('english'::regconfig, explanation), 'A') || "
                     "setweight(to_tsvector('english'::regconfig, fires_on), 'B') || "
                     "setweight(to_tsvector('english'::regconfig, context), 'C')")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("CREATE VIRTUAL TABLE latent_search USING fts5(explanation, fires_on, context, "
                   "sae_id UNINDEXED, latent UNINDEXED, top_tokens UNINDEXED, tokenize='porter unicode61', prefix='3')")
        op.execute(f"INSERT INTO latent_search(latent_search, rank) VALUES ('rank', '{SQLITE_RANK}')")
        return
    op.create_table(
        "latent_search",
        sa.Column("sae_id", sa.String(200), nullable=False),
        sa.Column("latent", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("fires_on", sa.Text(), nullable=False),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("top_tokens", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "latent", name="pk_latent_search"),
    )
    op.execute(f"ALTER TABLE latent_search ADD COLUMN document tsvector GENERATED ALWAYS AS ({POSTGRES_DOCUMENT}) STORED")
    op.execute("CREATE INDEX ix_latent_search_document ON latent_search USING gin (document)")


def downgrade() -> None:
    op.execute("DROP TABLE latent_search")
