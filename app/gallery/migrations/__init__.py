"""Alembic migrations of the gallery schema (`app.gallery.schema` runs them)."""
