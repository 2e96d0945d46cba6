"""Alembic environment: migrations run only programmatically, on the connection `open_ledger` hands over."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
