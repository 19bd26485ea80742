"""Named model shapes. Released shapes follow spec §10; `tiny` is the parity/test config of spec §15.

A preset is a function returning a fresh config; derive variants with `dataclasses.replace`
or `config.apply_overrides`. `get_preset(name)` accepts the dashed CLI names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .config import (
    BLTConfig,
    EntropyModelConfig,
    GlobalTransformerConfig,
    LocalDecoderConfig,
    LocalEncoderConfig,
    PatcherConfig,
)


def entropy_tiny() -> EntropyModelConfig:
    return EntropyModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64)


def entropy_small() -> EntropyModelConfig:
    """A ~6M-parameter byte LM: a usable patcher trained in minutes on one GPU."""
    return EntropyModelConfig(dim=256, n_layers=6, n_heads=4)


def entropy_100m() -> EntropyModelConfig:
    """Meta's released entropy model shape (blt-entropy, 'transformer_100m')."""
    return EntropyModelConfig(dim=768, n_layers=14, n_heads=12, ffn_dim=2048)


def tiny() -> BLTConfig:
    """~250k parameters: CPU tests, under a second per forward (spec §15 tiny config)."""
    return BLTConfig(
        encoder=LocalEncoderConfig(dim=32, n_layers=1, n_heads=4, ffn_dim=96),
        global_transformer=GlobalTransformerConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=160),
        decoder=LocalDecoderConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=96),
        patcher=PatcherConfig(mode="entropy", patch_size=4),
        entropy_model=entropy_tiny(),
        cross_attn_k=2,
        hash_sizes=[3, 4, 5, 6, 7, 8],
        hash_functions=2,
        hash_vocab=101,
    )


def small() -> BLTConfig:
    """A ~30M-parameter BLT (without hash tables) for single-GPU training runs."""
    return BLTConfig(
        encoder=LocalEncoderConfig(dim=256, n_layers=1, n_heads=4),
        global_transformer=GlobalTransformerConfig(dim=512, n_layers=8, n_heads=8),
        decoder=LocalDecoderConfig(dim=256, n_layers=4, n_heads=4),
        patcher=PatcherConfig(mode="entropy"),
        entropy_model=entropy_small(),
        cross_attn_k=2,
        hash_sizes=[3, 4, 5, 6, 7, 8],
        hash_functions=1,
        hash_vocab=16384,
        max_bytes=8192,
        max_patches=4096,
    )


def blt_1b() -> BLTConfig:
    """facebook/blt-1b (spec §10.1)."""
    return BLTConfig(
        encoder=LocalEncoderConfig(dim=1024, n_layers=1, n_heads=16, cross_attn_n_heads=16),
        global_transformer=GlobalTransformerConfig(dim=2048, n_layers=25, n_heads=16),
        decoder=LocalDecoderConfig(dim=1024, n_layers=9, n_heads=16, cross_attn_n_heads=16),
        patcher=PatcherConfig(),
        entropy_model=entropy_100m(),
        cross_attn_k=2,
        hash_vocab=500002,
        max_bytes=24576,
        max_patches=4096,
    )


def blt_7b() -> BLTConfig:
    """facebook/blt-7b (spec §10.1; cross-attention heads and window presumed)."""
    return BLTConfig(
        encoder=LocalEncoderConfig(dim=1280, n_layers=1, n_heads=20, cross_attn_n_heads=20),
        global_transformer=GlobalTransformerConfig(dim=4096, n_layers=32, n_heads=32),
        decoder=LocalDecoderConfig(dim=1280, n_layers=6, n_heads=20, cross_attn_n_heads=20),
        patcher=PatcherConfig(),
        entropy_model=entropy_100m(),
        cross_attn_k=4,
        hash_vocab=500002,
        max_bytes=24576,
        max_patches=4096,
    )


PRESETS: dict[str, Callable[[], BLTConfig | EntropyModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "blt-1b": blt_1b,
    "blt-7b": blt_7b,
    "entropy-tiny": entropy_tiny,
    "entropy-small": entropy_small,
    "entropy-100m": entropy_100m,
}


def get_preset(name: str) -> BLTConfig | EntropyModelConfig:
    key = name.replace("_", "-")
    if key not in PRESETS:
        near = difflib.get_close_matches(key, PRESETS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown preset {name!r}{hint}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]()
