"""Alembic environment: the URL comes from the caller (app.db.upgrade) or from Settings."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from app.db import make_engine
from app.models import Base, compared_in_schema
from app.settings import Settings

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True, include_name=compared_in_schema)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table,
                # drops the old one and renames the copy. With foreign keys enforced, dropping
                # `saes` would delete every latent, context and rung of every SAE (ON DELETE
                # CASCADE), so they are off while migrating (the pragma is a no-op inside a
                # transaction: set on the driver's connection before it begins) and checked after.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            context.configure(connection=connection, target_metadata=target_metadata,
                              render_as_batch=True, include_name=compared_in_schema)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").first()) is not None:
                    raise RuntimeError(f"the migration left a row of {broken[0]} without its {broken[2]} row")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
