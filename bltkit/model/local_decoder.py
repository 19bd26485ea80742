"""Local decoder (spec §9): starts from the encoder's byte states; before each (cross-attending)
layer every byte reads the K units of global patch d(t) with the double residual; then the
output head. Logits are returned in fp32."""

from __future__ import annotations

import torch
from torch import nn

from ..config import LocalDecoderConfig
from .attention import Mask
from .layers import CrossAttention, RMSNorm, init_cross, trunc_normal_
from .transformer import init_layers, make_layers


class LocalDecoder(nn.Module):
    def __init__(self, cfg: LocalDecoderConfig, global_dim: int, vocab_size: int, cross_attn_k: int, eps: float):
        super().__init__()
        self.cfg, self.k = cfg, cross_attn_k
        self.patch_embedding_projection = nn.Linear(global_dim, cross_attn_k * cfg.dim, bias=False)
        n_cross = cfg.n_layers if cfg.cross_attn_all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(cfg.dim, cfg.cross_attn_n_heads, cfg.cross_attn_n_kv_heads, eps) for _ in range(n_cross)
        )
        self.layers = make_layers(cfg, eps)
        self.norm = RMSNorm(cfg.dim, eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)

    def split_units(self, g_BPD: torch.Tensor) -> torch.Tensor:
        """W_dp then split_k -> [B, P*K, D]."""
        B, P, _ = g_BPD.shape
        return self.patch_embedding_projection(g_BPD).reshape(B, P * self.k, self.cfg.dim)

    def cross_index(self, layer_index: int) -> int | None:
        if self.cfg.cross_attn_all_layers:
            return layer_index
        return 0 if layer_index == 0 else None

    def head(self, z_BTD: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(z_BTD)).float()

    def forward(self, h_BTD: torch.Tensor, g_BPD: torch.Tensor, self_mask: Mask, cross_mask: Mask,
                cos: torch.Tensor, sin: torch.Tensor, kv_out: list | None = None) -> torch.Tensor:
        units = self.split_units(g_BPD)
        z = h_BTD
        for i, layer in enumerate(self.layers):
            j = self.cross_index(i)
            if j is not None:
                z = 2 * z + self.cross_attn_layers[j](z, units, cross_mask)  # double residual
            z = layer(z, cos, sin, self_mask, kv_out)
        return self.head(z)

    @torch.no_grad()
    def init_weights(self, generator) -> None:
        dim = self.cfg.dim
        w = self.patch_embedding_projection.weight
        trunc_normal_(w, w.shape[1] ** -0.5, generator)
        for i, layer in enumerate(self.cross_attn_layers):
            init_cross(layer, i, generator)
        init_layers(self.layers, generator)
        self.norm.reset_parameters()
        trunc_normal_(self.output.weight, dim**-0.5, generator)
