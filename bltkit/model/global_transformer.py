"""Global (latent) transformer over patch positions (spec §8): optional input projection,
no final norm, no head; its raw residual stream goes to the decoder."""

from __future__ import annotations

import torch
from torch import nn

from ..config import GlobalTransformerConfig
from .attention import Mask
from .layers import trunc_normal_
from .transformer import init_layers, make_layers, run_layers


class GlobalTransformer(nn.Module):
    def __init__(self, cfg: GlobalTransformerConfig, in_dim: int, eps: float):
        super().__init__()
        self.cfg = cfg
        self.token_embedding_projection = nn.Linear(in_dim, cfg.dim, bias=False) if in_dim != cfg.dim else None
        self.layers = make_layers(cfg, eps)

    def project(self, x_BPD: torch.Tensor) -> torch.Tensor:
        return x_BPD if self.token_embedding_projection is None else self.token_embedding_projection(x_BPD)

    def forward(self, x_BPD: torch.Tensor, mask: Mask, cos: torch.Tensor, sin: torch.Tensor,
                kv_out: list | None = None) -> torch.Tensor:
        return run_layers(self.layers, self.project(x_BPD), cos, sin, mask, kv_out)

    @torch.no_grad()
    def init_weights(self, generator) -> None:
        if self.token_embedding_projection is not None:
            w = self.token_embedding_projection.weight
            trunc_normal_(w, w.shape[1] ** -0.5, generator)
        init_layers(self.layers, generator)
