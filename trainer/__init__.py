"""FaceMoE Edge: trainer."""
