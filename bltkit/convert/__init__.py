"""Foreign checkpoint layouts (transformers, Meta) <-> bltkit. Shared file reading lives here."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's model.safetensors, or of the shards its index names."""
    from safetensors.torch import load_file

    from ..checkpoint import CheckpointError

    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        f = src / name
        if not f.is_file():
            raise CheckpointError(f"{src} is missing {name}")
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"{f} is unreadable or truncated ({e})") from None
    return state
