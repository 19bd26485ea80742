"""The dtype names the commands and `bltkit.eval.harness` take (light: no torch import until used)."""

from __future__ import annotations

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def torch_dtype(name: str | None):
    """The torch dtype of a name in DTYPES (None: None); a ValueError naming the choices otherwise."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose from {', '.join(DTYPES)}")
    import torch

    return getattr(torch, DTYPES[name])
