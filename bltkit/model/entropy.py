"""The entropy model: a small causal byte LM whose next-byte entropy places patch boundaries
(spec §3). Entropies are always computed in fp32 from its logits (spec §16.12)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import EntropyModelConfig
from .attention import document_ids, local_mask
from .layers import RMSNorm, trunc_normal_
from .transformer import init_layers, make_layers, positions_cos_sin, run_layers


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -Σ p log p in nats over the last axis, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyModel(nn.Module):
    def __init__(self, config: EntropyModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = make_layers(config, config.norm_eps)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens_BT: torch.Tensor, impl: str = "sdpa", doc_masks: bool = True,
                kv_out: list | None = None) -> torch.Tensor:
        """Next-byte logits [B, T, V] in fp32 (`kv_out` collects each layer's keys/values)."""
        B, T = tokens_BT.shape
        doc = document_ids(tokens_BT) if doc_masks else None
        mask = local_mask(T, self.config.window, doc, B, tokens_BT.device, impl)
        cos, sin = positions_cos_sin(T, self.config, tokens_BT.device)
        h = run_layers(self.layers, self.tok_embeddings(tokens_BT), cos, sin, mask, kv_out)
        return self.output(self.norm(h)).float()

    @torch.no_grad()
    def entropies(self, tokens_BT: torch.Tensor, impl: str = "sdpa", doc_masks: bool = True,
                  kv_out: list | None = None) -> torch.Tensor:
        """H[t] in nats (fp32): the uncertainty about byte t+1 given bytes 0..t."""
        return entropy_from_logits(self(tokens_BT, impl=impl, doc_masks=doc_masks, kv_out=kv_out))

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> None:
        g = torch.Generator(device=self.output.weight.device).manual_seed(seed)
        trunc_normal_(self.tok_embeddings.weight, self.config.dim**-0.5, g)
        init_layers(self.layers, g)
        self.norm.reset_parameters()
        trunc_normal_(self.output.weight, self.config.dim**-0.5, g)
