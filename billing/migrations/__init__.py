"""Alembic migrations of the usage ledger; `turboflow.billing.ledger.open_ledger` runs them to head on open."""
