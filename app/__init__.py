"""FaceMoE Edge: pipeline, tracking, gallery, matching, events, CLI."""

__version__ = "0.1.0"
