"""Model code: tensor math only (no files, devices from the environment, or distributed)."""

from .blt import BLT, PatchLayout
from .entropy import EntropyModel, entropy_from_logits

__all__ = ["BLT", "EntropyModel", "PatchLayout", "entropy_from_logits"]
