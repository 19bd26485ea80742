"""bltkit: the Byte Latent Transformer toolkit.

Public API: `BLTConfig`, `BLT`, `load_model`, `Generator`, `reference_generate`. Heavy modules
are imported lazily so that `import bltkit` and `blt --help` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BLT", "BLTConfig", "EntropyModel", "Generator", "__version__", "load_model", "reference_generate"]


def __getattr__(name: str):
    if name == "BLTConfig":
        from .config import BLTConfig

        return BLTConfig
    if name in ("BLT", "EntropyModel"):
        from . import model

        return getattr(model, name)
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    if name in ("Generator", "reference_generate"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'bltkit' has no attribute {name!r}")
