"""A unique index on `events.uid` (the event's own id), so that a write retried after a lost
connection, or replayed from the daemon's outbox, stores an event once (`EventStore.add`
inserts with ON CONFLICT DO NOTHING). Copies of one event stored before (the same uid on
several rows: none are expected, ids were random) keep the oldest row; the later copies and
their crops and embeddings are deleted first.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_LATER_COPIES = ("SELECT e.id FROM events e WHERE e.uid IS NOT NULL AND EXISTS "
                 "(SELECT 1 FROM events f WHERE f.uid = e.uid AND f.id < e.id)")


def upgrade() -> None:
    have = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("events")}
    if "ux_events_uid" in have:  # a new gallery: made from the models with the index
        return
    for table in ("event_crops", "event_embeddings"):
        op.execute(f"DELETE FROM {table} WHERE event_id IN ({_LATER_COPIES})")  # noqa: S608
    op.execute(f"DELETE FROM events WHERE id IN ({_LATER_COPIES})")  # noqa: S608
    op.create_index("ux_events_uid", "events", ["uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_events_uid", table_name="events")
