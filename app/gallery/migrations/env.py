"""Alembic environment: migrations run on the connection `app.gallery.schema` hands over (no
URL or ini file of their own), against the gallery's table metadata."""

from __future__ import annotations

from alembic import context

from app.gallery.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=True)  # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
