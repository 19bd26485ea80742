"""Parameter and FLOP accounting for `blt info`, training MFU and benchmarks.

FLOPs count a multiply-add as 2. Per byte, a linear layer of n weights costs 2n; attention costs
4·D·(mean visible keys) per layer (QKᵀ and AV). Patch-level work (global transformer, the
patch side of both cross-attentions) is divided by the mean patch length. Training counts 3x the
forward of the trained parts (forward + backward) plus the frozen entropy model's forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import BLTConfig, EntropyModelConfig, _StackConfig


def _block_params(c: _StackConfig) -> int:
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    return attn + 3 * c.dim * c.ffn_dim + 2 * c.dim


def _cross_params(dim: int, n_heads: int, n_kv: int) -> int:
    hd = dim // n_heads
    return dim * hd * (2 * n_heads + 2 * n_kv) + 2 * dim


def _mean_keys(T: int, window: int | None) -> float:
    """Mean number of visible keys per query over positions 0..T-1 (causal, optional window)."""
    if window is None or window >= T:
        return (T + 1) / 2
    full = window * (window + 1) / 2 + (T - window) * window
    return full / T


@dataclass
class ParamCounts:
    encoder: int
    global_transformer: int
    decoder: int
    byte_embeddings: int
    hash_embeddings: int
    entropy_model: int

    @property
    def total(self) -> int:
        return (self.encoder + self.global_transformer + self.decoder + self.byte_embeddings
                + self.hash_embeddings)

    @property
    def non_embedding(self) -> int:
        return self.encoder + self.global_transformer + self.decoder


def entropy_params(e: EntropyModelConfig) -> int:
    return e.n_layers * _block_params(e) + 2 * e.vocab_size * e.dim + e.dim


def count_params(cfg: BLTConfig) -> ParamCounts:
    enc, dec, g, K = cfg.encoder, cfg.decoder, cfg.global_transformer, cfg.cross_attn_k
    n_enc_cross = enc.n_layers if enc.cross_attn_all_layers else 1
    n_dec_cross = dec.n_layers if dec.cross_attn_all_layers else 1
    encoder = (enc.n_layers * _block_params(enc) + K * enc.dim * enc.dim
               + n_enc_cross * _cross_params(enc.dim, enc.cross_attn_n_heads, enc.cross_attn_n_kv_heads))
    glob = g.n_layers * _block_params(g) + (K * enc.dim * g.dim if cfg.has_global_projection else 0)
    decoder = (dec.n_layers * _block_params(dec) + g.dim * K * dec.dim + dec.dim + cfg.vocab_size * dec.dim
               + n_dec_cross * _cross_params(dec.dim, dec.cross_attn_n_heads, dec.cross_attn_n_kv_heads))
    return ParamCounts(
        encoder=encoder, global_transformer=glob, decoder=decoder, byte_embeddings=cfg.vocab_size * enc.dim,
        hash_embeddings=cfg.n_hash_tables * cfg.hash_vocab * enc.dim,
        entropy_model=entropy_params(cfg.entropy_model) if cfg.entropy_model else 0,
    )


def _stack_flops_per_pos(c: _StackConfig, mean_keys: float) -> float:
    per_layer = 2 * (_block_params(c) - 2 * c.dim) + 4 * c.n_heads * c.head_dim * mean_keys
    return c.n_layers * per_layer


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 byte, got {seq_len}")


def entropy_flops_per_byte(e: EntropyModelConfig, seq_len: int) -> float:
    _check_seq_len(seq_len)
    return _stack_flops_per_pos(e, _mean_keys(seq_len, e.window)) + 2 * e.vocab_size * e.dim


def flops_per_byte(cfg: BLTConfig, mean_patch_len: float, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per byte, by part, for rows of `seq_len` bytes (default: cfg.max_bytes)."""
    T = cfg.max_bytes if seq_len is None else seq_len
    _check_seq_len(T)
    if not 0 < mean_patch_len < math.inf:
        raise ValueError(f"mean_patch_len must be a positive number of bytes, got {mean_patch_len}")
    P = max(1.0, T / mean_patch_len)
    enc, dec, g, K = cfg.encoder, cfg.decoder, cfg.global_transformer, cfg.cross_attn_k
    n_enc_cross = enc.n_layers if enc.cross_attn_all_layers else 1
    n_dec_cross = dec.n_layers if dec.cross_attn_all_layers else 1
    kv_e = 2 * 2 * enc.dim * enc.dim * enc.cross_attn_n_kv_heads // enc.cross_attn_n_heads
    qo_e = 2 * 2 * enc.dim * enc.dim
    # encoder: byte blocks, K/V of every byte per cross layer, then per patch: pooling projection,
    # K query units with Q/O projections attending to ~mean_patch_len bytes
    encoder = (_stack_flops_per_pos(enc, _mean_keys(T, enc.window)) + n_enc_cross * kv_e
               + (2 * K * enc.dim * enc.dim + n_enc_cross * K * (qo_e + 4 * enc.dim * mean_patch_len))
               / mean_patch_len)
    glob = (_stack_flops_per_pos(g, (P + 1) / 2)
            + (2 * K * enc.dim * g.dim if cfg.has_global_projection else 0)) / mean_patch_len
    kv_d = 2 * 2 * dec.dim * dec.dim * dec.cross_attn_n_kv_heads // dec.cross_attn_n_heads
    decoder = (_stack_flops_per_pos(dec, _mean_keys(T, dec.window))
               + n_dec_cross * (2 * 2 * dec.dim * dec.dim + 4 * dec.dim * K)  # Q/O per byte, K keys
               + (2 * g.dim * K * dec.dim + n_dec_cross * K * kv_d) / mean_patch_len
               + 2 * dec.dim * cfg.vocab_size)
    out = {"encoder": encoder, "global": glob, "decoder": decoder}
    out["blt"] = encoder + glob + decoder
    out["entropy_model"] = entropy_flops_per_byte(cfg.entropy_model, T) if cfg.entropy_model else 0.0
    return out


def train_flops_per_byte(cfg: BLTConfig, mean_patch_len: float, seq_len: int | None = None,
                         patch_on_the_fly: bool = True) -> float:
    """Forward+backward of the BLT (3x forward) plus the frozen entropy model's forward if it runs."""
    f = flops_per_byte(cfg, mean_patch_len, seq_len)
    return 3 * f["blt"] + (f["entropy_model"] if patch_on_the_fly else 0.0)


def inference_flops_per_byte(cfg: BLTConfig, mean_patch_len: float, seq_len: int | None = None) -> float:
    f = flops_per_byte(cfg, mean_patch_len, seq_len)
    return f["blt"] + f["entropy_model"]


# Peak dense bf16 rates used for MFU (vendor figures; the GPU's real ceiling is lower).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None
