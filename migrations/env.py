"""Alembic environment: migrates the database `pipeline.ledger.migrate` passes in."""

from alembic import context
from sqlalchemy import create_engine

from pipeline.schema import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("run migrations with `pipeline migrate`, which sets the database URL")

connectable = create_engine(url)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
