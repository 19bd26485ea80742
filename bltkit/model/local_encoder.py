"""Local encoder (spec §7): byte blocks, then max-pooled patch queries refined by cross-attention
to the bytes of their own patch, with the double residual of the released models."""

from __future__ import annotations

import torch
from torch import nn

from ..config import LocalEncoderConfig
from .attention import Mask
from .layers import CrossAttention, init_cross, trunc_normal_
from .transformer import init_layers, make_layers


class LocalEncoder(nn.Module):
    def __init__(self, cfg: LocalEncoderConfig, vocab_size: int, cross_attn_k: int, eps: float):
        super().__init__()
        self.cfg, self.k = cfg, cross_attn_k
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.layers = make_layers(cfg, eps)
        self.patch_embedding_projection = nn.Linear(cfg.dim, cross_attn_k * cfg.dim, bias=False)
        n_cross = cfg.n_layers if cfg.cross_attn_all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(cfg.dim, cfg.cross_attn_n_heads, cfg.cross_attn_n_kv_heads, eps) for _ in range(n_cross)
        )

    def pool(self, h_BTD: torch.Tensor, pid_BT: torch.Tensor, P: int) -> torch.Tensor:
        """Element-wise max over each patch's bytes; 0 for a patch with no byte."""
        B, T, D = h_BTD.shape
        out = torch.zeros(B, P, D, dtype=h_BTD.dtype, device=h_BTD.device)
        return out.scatter_reduce(1, pid_BT[:, :, None].expand(B, T, D), h_BTD, reduce="amax", include_self=False)

    def split_units(self, pooled_BPD: torch.Tensor) -> torch.Tensor:
        """W_pe then split_k: unit p*K + r is slice r of patch p -> [B, P*K, D]."""
        B, P, D = pooled_BPD.shape
        return self.patch_embedding_projection(pooled_BPD).reshape(B, P * self.k, D)

    def cross_index(self, layer_index: int) -> int | None:
        last = layer_index == len(self.layers) - 1
        if self.cfg.cross_attn_all_layers:
            return layer_index
        return 0 if last else None

    def forward(self, e_BTD: torch.Tensor, pid_BT: torch.Tensor, P: int, self_mask: Mask, cross_mask: Mask,
                cos: torch.Tensor, sin: torch.Tensor, kv_out: list | None = None, h_out: list | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Byte states h [B, T, D] and patch units [B, P*K, D] (`h_out` collects h after each layer)."""
        h, units = e_BTD, None
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, self_mask, kv_out)
            if h_out is not None:
                h_out.append(h)
            j = self.cross_index(i)
            if j is not None:
                if units is None:  # Meta pools once, at the first cross-attention layer (spec §7.8)
                    units = self.split_units(self.pool(h, pid_BT, P))
                units = 2 * units + self.cross_attn_layers[j](units, h, cross_mask)  # double residual
        return h, units

    @torch.no_grad()
    def init_weights(self, generator) -> None:
        dim = self.cfg.dim
        trunc_normal_(self.tok_embeddings.weight, dim**-0.5, generator)
        init_layers(self.layers, generator)
        trunc_normal_(self.patch_embedding_projection.weight, dim**-0.5, generator)
        for i, layer in enumerate(self.cross_attn_layers):
            init_cross(layer, i, generator)
