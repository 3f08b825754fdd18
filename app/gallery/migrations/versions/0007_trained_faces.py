"""The `trained_faces` table: which models were fine-tuned on which identities' faces, and
which of those identities were erased since (`app.gallery.training`).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "trained_faces" in sa.inspect(op.get_bind()).get_table_names():
        return  # a new gallery: made from the models with the table
    op.create_table(
        "trained_faces",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_dir", sa.String(length=1024), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("tracks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_trained_faces_model", "trained_faces", ["model"])
    op.create_index("ix_trained_faces_identity_id", "trained_faces", ["identity_id"])


def downgrade() -> None:
    op.drop_table("trained_faces")
