"""The `boxes` table: each daemon's heartbeat (box, started and last seen, state, its cameras'
counters as JSON), for the fleet view of a site of several boxes on one database.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "boxes" in sa.inspect(op.get_bind()).get_table_names():
        return  # a new gallery: made from the models with the table
    op.create_table(
        "boxes",
        sa.Column("box", sa.String(length=64), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("boxes")
