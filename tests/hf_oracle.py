"""Builds the tiny random transformers BltForCausalLM of spec §15 (no hub, no network).

Used by the parity tests only; transformers is the oracle, never a dependency of bltkit.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def tiny_hf_config(window: int = 512, global_dim: int = 64, kv_heads: int = 4, patch_in_forward: bool = True):
    from transformers import BltConfig

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    local = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=96,
                 cross_attn_k=2, hidden_size_global=global_dim, rope_parameters=rope, rms_norm_eps=1e-5,
                 vocab_size=260)
    return BltConfig(
        vocab_size=260, max_position_embeddings=4096, patch_in_forward=patch_in_forward, patch_size=4,
        patching_mode="entropy", patching_threshold=1.335442066192627, patching_batch_size=1,
        max_patch_length=None, local_attention_window_len=window, cross_attn_k=2,
        encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8], encoder_hash_byte_group_vocab=101,
        encoder_hash_byte_group_nb_functions=2, tie_word_embeddings=False, use_cache=False,
        rope_parameters=rope,
        encoder_config=dict(local, num_hidden_layers=1, cross_attn_all_layers=False),
        decoder_config=dict(local, num_hidden_layers=2, cross_attn_all_layers=True),
        global_config=dict(hidden_size=global_dim, num_attention_heads=4, num_key_value_heads=4,
                           num_hidden_layers=2, intermediate_size=160, rope_parameters=rope, rms_norm_eps=1e-5),
        patcher_config=dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=window,
                            max_position_embeddings=8192, vocab_size=260, rms_norm_eps=1e-5),
    )


def tiny_hf_model(seed: int = 0, **kw):
    """Random tiny model; the patcher head is scaled by 8 so entropies spread over ~0-2 nats."""
    from transformers import BltForCausalLM

    torch.manual_seed(seed)
    model = BltForCausalLM(tiny_hf_config(**kw)).eval()
    with torch.no_grad():
        # random weights at the transformers init scale are near-degenerate; widen them a little so
        # that every path (hash tables, cross-attention, global) moves the logits measurably
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2 if "embed" in name else (p.shape[-1] ** -0.5))
        if model.model.patcher is not None:
            model.model.patcher.lm_head.weight.mul_(8.0)
    return model


def hf_logits(model, tokens_BT: torch.Tensor, patch_lengths=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens_BT, patch_lengths=patch_lengths, use_cache=False).logits.float()


def hf_patcher(model, tokens_BT: torch.Tensor):
    """(entropies [B,T], lengths [B,P] summing to T) from the port's patcher submodule."""
    cfg = model.config
    with torch.no_grad():
        ent, lengths, _ = model.model.patcher(tokens_BT, patch_size=cfg.patch_size, threshold=cfg.patching_threshold,
                                              max_patch_length=cfg.max_patch_length)
    return ent.float(), lengths.long()
