"""Custom ops of the engine: NumPy references (the truth GPU implementations are tested against)."""

from engine.ops.reference import REFERENCE_OPS, topk_moe_reference

__all__ = ["REFERENCE_OPS", "topk_moe_reference"]
