"""FaceMoE Edge: app."""
