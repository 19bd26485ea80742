"""Building blocks shared by every BLT stack: RMSNorm, interleaved RoPE, SwiGLU, attention, Block.

Module and parameter names follow Meta's checkpoint keys (`attention.wq`, `feed_forward.w1`,
`attention_norm`, ...), so importing Meta weights is the identity mapping (style §3).
Legend: B batch, T queries, S keys, N heads, H head dim, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Mask, attend


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back (spec §6.2)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel on a GPU; on a CPU (torch 2.13, 2 cores) as fast as the plain ops for
        # large inputs and faster for one-byte steps (a [1, 1, 256] norm 24 µs against 37)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for integer `positions` [B or 1, T] (spec §6.4), in the form `apply_rope` uses:
    C = cos [.., T, H/2, 1] and S = (-sin, sin) [.., T, H/2, 2], fp32. Computed on the fly (never in
    checkpoints; positions unbounded) and once per forward, shared by every layer."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    sin = angles.sin()
    return angles.cos()[..., None], torch.stack((-sin, sin), dim=-1)


def apply_rope(x_BTNH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved feature pairs (2i, 2i+1) of every head by the tables of `rope_cos_sin`:
    (a, b) -> (a cos - b sin, b cos + a sin), i.e. x*C + swap(x)*S: a few elementwise kernels."""
    xf = x_BTNH.float().unflatten(-1, (-1, 2))  # B T N H/2 2
    return (xf * cos[:, :, None] + xf.flip(-1) * sin[:, :, None]).flatten(-2).to(x_BTNH.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and optional GQA; the mask decides what is visible."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def qkv(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_qkv: torch.Tensor | None = None):
        """Projected, rotated q [B,T,N,H] and k, v [B,T,Nkv,H] (used by the KV caches too).
        `w_qkv`: wq, wk and wv concatenated (the generator's fused copy): one product for three."""
        B, T, _ = x_BTD.shape
        N, Nk = self.n_heads, self.n_kv_heads
        if w_qkv is None:
            q = self.wq(x_BTD).view(B, T, N, self.head_dim)
            k = self.wk(x_BTD).view(B, T, Nk, self.head_dim)
            v = self.wv(x_BTD).view(B, T, Nk, self.head_dim)
            qk = torch.cat([q, k], dim=2)
        else:
            y = F.linear(x_BTD, w_qkv).view(B, T, N + 2 * Nk, self.head_dim)
            qk, v = y[:, :, :N + Nk], y[:, :, N + Nk:]
        q, k = apply_rope(qk, cos, sin).split([N, Nk], dim=2)  # one rotation for q and k
        return q, k, v

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                kv_out: list | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x_BTD, cos, sin)
        if kv_out is not None:  # the generator's prefill harvests keys/values [B, T, Nkv, H]
            kv_out.append((k, v))
        out_BNTH = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.wo(out_BNTH.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention between bytes and patch units (spec §7.5): separate RMSNorms on the query
    and key/value inputs, no RoPE. Returns A only; callers apply the double residual
    `x <- 2x + A` that the released weights need (spec §16.1)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.cross_attn_norm_q = RMSNorm(dim, eps)
        self.cross_attn_norm_kv = RMSNorm(dim, eps)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def kv(self, kv_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B,Nkv,S,H] of the key/value input (cached per patch in generation)."""
        B, S, _ = kv_BSD.shape
        kvn = self.cross_attn_norm_kv(kv_BSD)
        k = self.wk(kvn).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(kvn).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def heads(self, x_BTD: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """The attention's output [B,T,N*H] before `wo` (the generator folds `wo` and the residual
        into one product)."""
        B, T, _ = x_BTD.shape
        q = self.wq(self.cross_attn_norm_q(x_BTD)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return attend(q, k, v, mask).transpose(1, 2).flatten(2)

    def attend_kv(self, x_BTD: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        return self.wo(self.heads(x_BTD, k, v, mask))

    def forward(self, x_BTD: torch.Tensor, kv_BSD: torch.Tensor, mask: Mask) -> torch.Tensor:
        k, v = self.kv(kv_BSD)
        return self.attend_kv(x_BTD, k, v, mask)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(n1(x)), then + FFN(n2(.)) (spec §6.1)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                kv_out: list | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_out)
        return h + self.feed_forward(self.ffn_norm(h))


def trunc_normal_(w: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """Truncated normal at ±3σ (spec §6.7)."""
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


def init_block(block: TransformerBlock, depth_index: int, generator: torch.Generator | None) -> None:
    """Meta's "current_depth" rule: σ divided by sqrt(2 (layer + 1)) (spec §6.7)."""
    factor = math.sqrt(2 * (depth_index + 1))
    dim = block.attention.wq.in_features
    hidden = block.feed_forward.w1.out_features
    for lin in (block.attention.wq, block.attention.wk, block.attention.wv, block.attention.wo,
                block.feed_forward.w1, block.feed_forward.w3):
        trunc_normal_(lin.weight, dim**-0.5 / factor, generator)
    trunc_normal_(block.feed_forward.w2.weight, hidden**-0.5 / factor, generator)
    block.attention_norm.reset_parameters()
    block.ffn_norm.reset_parameters()


def init_cross(layer: CrossAttention, depth_index: int, generator: torch.Generator | None) -> None:
    factor = math.sqrt(2 * (depth_index + 1))
    dim = layer.wq.in_features
    for lin in (layer.wq, layer.wk, layer.wv, layer.wo):
        trunc_normal_(lin.weight, dim**-0.5 / factor, generator)
    layer.cross_attn_norm_q.reset_parameters()
    layer.cross_attn_norm_kv.reset_parameters()
