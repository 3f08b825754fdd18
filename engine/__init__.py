"""FaceMoE Edge: engine."""
