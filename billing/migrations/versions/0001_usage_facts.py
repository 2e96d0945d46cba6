"""usage_facts: the append-only table of raw CloudEvents, one row per (source, event id).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_facts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.UniqueConstraint("source", "event_id", name="uq_usage_facts_source_event_id"),
    )
    op.create_index("ix_usage_facts_tenant_occurred_at", "usage_facts", ["tenant", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_facts_tenant_occurred_at", table_name="usage_facts")
    op.drop_table("usage_facts")
