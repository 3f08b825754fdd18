"""FaceMoE Edge: pipeline, tracking, gallery, matching, events, CLI."""

__version__ = "0.2.0"  # the release; pyproject.toml reads it from here
