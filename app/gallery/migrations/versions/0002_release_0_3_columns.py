"""Release 0.3's columns, all nullable: the event record's own fields on `events` (uid, time,
snapshot, candidate, candidate_score, zones) and a per-template checksum on `templates`.
Galleries created by this release already have them (the tables are made from the models)
and are stamped at the head, so this runs on older galleries; only missing ones are added.
The columns are `app.gallery.db`'s `RELEASE_0_3_*_COLUMNS` (one source).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.gallery.db import RELEASE_0_3_EVENT_COLUMNS, RELEASE_0_3_TEMPLATE_COLUMNS

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

EVENT_COLUMNS, TEMPLATE_COLUMNS = RELEASE_0_3_EVENT_COLUMNS, RELEASE_0_3_TEMPLATE_COLUMNS


def _add(table: str, columns: tuple[sa.Column, ...]) -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}
    missing = [c for c in columns if c.name not in have]
    if missing:
        with op.batch_alter_table(table) as batch:
            for column in missing:
                batch.add_column(column.copy())


def upgrade() -> None:
    _add("events", EVENT_COLUMNS)
    _add("templates", TEMPLATE_COLUMNS)


def downgrade() -> None:
    for table, columns in (("events", EVENT_COLUMNS), ("templates", TEMPLATE_COLUMNS)):
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.drop_column(column.name)
