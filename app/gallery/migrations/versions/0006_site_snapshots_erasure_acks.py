"""A site of boxes: event snapshots in the database (`event_snapshots`: the JPEG, sealed when
the gallery is encrypted), so a review UI on any machine shows them; `events.snapshot` keeps the
box-local path of the events stored before (still shown where that file is readable) and is
not written any more. Erasures reach every box: `erasures.done_at` (the erasing machine's part
finished) and `erasure_acks` (which boxes have erased their own copies); a tombstone stays until
every box has.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    if "done_at" not in {c["name"] for c in inspector.get_columns("erasures")}:
        with op.batch_alter_table("erasures") as batch:
            batch.add_column(sa.Column("done_at", sa.DateTime(timezone=True), nullable=True))
    if "erasure_acks" not in tables:
        op.create_table(
            "erasure_acks",
            sa.Column("erasure_id", sa.Integer(),
                      sa.ForeignKey("erasures.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("box", sa.String(length=64), primary_key=True),
            sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False),
        )
    if "event_snapshots" not in tables:
        op.create_table(
            "event_snapshots",
            sa.Column("event_id", sa.Integer(), sa.ForeignKey("events.id", ondelete="CASCADE"),
                      primary_key=True),
            sa.Column("jpeg", sa.LargeBinary(), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("event_snapshots")
    op.drop_table("erasure_acks")
    with op.batch_alter_table("erasures") as batch:
        batch.drop_column("done_at")
