"""A stack of pre-norm blocks with RoPE: the body of the entropy model, the global transformer
and the local encoder/decoder self-attention layers."""

from __future__ import annotations

import torch
from torch import nn

from ..config import _StackConfig
from .attention import Mask
from .layers import TransformerBlock, init_block, rope_cos_sin


def make_layers(cfg: _StackConfig, eps: float) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, eps) for _ in range(cfg.n_layers)
    )


def positions_cos_sin(T: int, cfg: _StackConfig, device, offset: int = 0):
    """RoPE tables [1, T, H/2] for positions offset..offset+T-1."""
    pos = torch.arange(offset, offset + T, device=device)[None]
    return rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, cos, sin, mask: Mask, kv_out: list | None = None
               ) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cos, sin, mask, kv_out)
    return x


def init_layers(layers: nn.ModuleList, generator) -> None:
    for i, layer in enumerate(layers):
        init_block(layer, i, generator)
