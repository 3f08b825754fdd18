"""Erasure by stable id: `identity_names` (every name an identity carried, filled from the
identities and the audit log's renames and merges) and `erasures` (tombstones of erasures
that have not finished); templates of release 0.2 get their checksum, and every template a
crop checksum and a binding to its identity (`templates.crop_checksum`, `.binding`).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import hashlib
import re

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# the vector checksum tied to the identity (codec.binding_checksum) and the crop's checksum
TEMPLATE_COLUMNS = (sa.Column("crop_checksum", sa.String(length=64), nullable=True),
                    sa.Column("binding", sa.String(length=64), nullable=True))
_RENAMED = re.compile(r"renamed to '(.*)'$", re.S)
_MERGED = re.compile(r"^'(.*)' merged in:", re.S)


def _tables() -> set[str]:
    return set(sa.inspect(op.get_bind()).get_table_names())


def _create_tables() -> None:
    have = _tables()
    if "identity_names" not in have:
        op.create_table(
            "identity_names",
            sa.Column("identity_id", sa.Integer(), primary_key=True),
            sa.Column("name", sa.String(length=256), primary_key=True, index=True),
        )
    if "erasures" not in have:
        op.create_table(
            "erasures",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("identity_id", sa.Integer(), index=True, nullable=False),
            sa.Column("name", sa.String(length=256), nullable=False),
            sa.Column("names", sa.Text(), nullable=False),
            sa.Column("event_uids", sa.Text(), nullable=False),
            sa.Column("snapshots", sa.Text(), nullable=False),
            sa.Column("events_deleted", sa.Integer(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("last_error", sa.String(length=2048), nullable=True),
        )


def _names(conn: sa.Connection) -> set[tuple[int, str]]:
    """(identity id, name) for every name an identity carried: its name now, and walking
    the audit log backwards, the names it had before each rename and merge."""
    holder = dict(conn.execute(sa.text("SELECT name, id FROM identities")).all())
    pairs = {(iid, name) for name, iid in holder.items()}
    audit = conn.execute(sa.text(
        "SELECT action, identity, detail FROM audit WHERE action IN ('rename', 'merge') "
        "ORDER BY id DESC")).all()
    for action, identity, detail in audit:
        if action == "rename" and identity and (m := _RENAMED.search(detail or "")):
            iid = holder.pop(m.group(1), None)
            if iid is not None:
                holder[identity] = iid
                pairs.add((iid, identity))
        elif action == "merge" and identity and (m := _MERGED.search(detail or "")):
            iid = holder.get(identity)
            if iid is not None:
                pairs.add((iid, m.group(1)))  # the merged-in identity's events carry its name
    return pairs


def upgrade() -> None:
    _create_tables()
    conn = op.get_bind()
    have = set(conn.execute(sa.text("SELECT identity_id, name FROM identity_names")).all())
    new = [{"i": i, "n": n} for i, n in sorted(_names(conn) - have)]
    if new:
        conn.execute(sa.text("INSERT INTO identity_names (identity_id, name) VALUES (:i, :n)"),
                     new)
    have = {c["name"] for c in sa.inspect(conn).get_columns("templates")}
    missing = [c for c in TEMPLATE_COLUMNS if c.name not in have]
    if missing:
        with op.batch_alter_table("templates") as batch:
            for column in missing:
                batch.add_column(sa.Column(column.name, column.type, nullable=True))
    rows = conn.execute(sa.text("SELECT id, vector FROM templates WHERE checksum IS NULL")).all()
    if rows:
        conn.execute(sa.text("UPDATE templates SET checksum = :c WHERE id = :i"),
                     [{"i": i, "c": _sha(v)} for i, v in rows])
    rows = conn.execute(sa.text("SELECT id, identity_id, checksum, crop FROM templates "
                                "WHERE binding IS NULL")).all()
    if rows:
        conn.execute(sa.text("UPDATE templates SET binding = :b, crop_checksum = :c "
                             "WHERE id = :i"),
                     [{"i": i, "b": hashlib.sha256(f"{int(iid)}:{checksum}".encode()).hexdigest(),
                       "c": _sha(crop) if crop is not None else None}
                      for i, iid, checksum, crop in rows])


def _sha(blob: bytes) -> str:
    return hashlib.sha256(bytes(blob)).hexdigest()


def downgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        for column in TEMPLATE_COLUMNS:
            batch.drop_column(column.name)
    op.drop_table("erasures")
    op.drop_table("identity_names")
