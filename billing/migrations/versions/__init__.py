"""Alembic revisions of the usage ledger, oldest first (`down_revision` chains them)."""
