"""The event record's own fields (release 0.3): uid, time, snapshot, candidate,
candidate_score, zones on `events`, nullable. Galleries created by this release already have
them (the tables are made from the models), so only the missing ones are added.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (
    sa.Column("uid", sa.String(length=64), nullable=True),
    sa.Column("time", sa.String(length=40), nullable=True),
    sa.Column("snapshot", sa.String(length=1024), nullable=True),
    sa.Column("candidate", sa.String(length=256), nullable=True),
    sa.Column("candidate_score", sa.Float(), nullable=True),
    sa.Column("zones", sa.String(length=1024), nullable=True),
)


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("events")}
    missing = [c for c in COLUMNS if c.name not in have]
    if missing:
        with op.batch_alter_table("events") as batch:
            for column in missing:
                batch.add_column(column.copy())


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        for column in COLUMNS:
            batch.drop_column(column.name)
