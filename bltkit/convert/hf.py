"""bltkit <-> transformers `BltForCausalLM` layout (spec §11.3-11.4). The only module that knows
transformers' key and config names. No transposes or permutations: renames only.

The exported `config.json` also carries a `bltkit` section (our full config), so that
ours -> hf -> ours is exact even for fields transformers has no name for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import (
    BLTConfig,
    EntropyModelConfig,
    GlobalTransformerConfig,
    LocalDecoderConfig,
    LocalEncoderConfig,
    PatcherConfig,
    from_dict,
    to_dict,
)
from . import read_safetensors_dir

_SEGMENTS = {
    "attention": "self_attn", "feed_forward": "mlp", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "tok_embeddings": "embed_tokens", "output": "lm_head",
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
    "cross_attn_norm_q": "q_norm", "cross_attn_norm_kv": "k_norm",
}
_SEGMENTS_BACK = {v: k for k, v in _SEGMENTS.items()}


def _rename(key: str, table: dict[str, str]) -> str:
    return ".".join(table.get(s, s) for s in key.split("."))


def native_key_to_hf(key: str) -> str:
    if key == "local_decoder.output.weight":
        return "lm_head.weight"
    if key.startswith("entropy_model."):
        return "model.patcher." + _rename(key[len("entropy_model."):], _SEGMENTS)
    return "model." + _rename(key, _SEGMENTS)


def hf_key_to_native(key: str) -> str:
    if key == "lm_head.weight":
        return "local_decoder.output.weight"
    if not key.startswith("model."):
        raise ValueError(f"unexpected transformers key {key!r}")
    key = key[len("model."):]
    if key.startswith("patcher."):
        return "entropy_model." + _rename(key[len("patcher."):], _SEGMENTS_BACK)
    return _rename(key, _SEGMENTS_BACK)


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta)}


def _check_exportable(cfg: BLTConfig) -> None:
    for name, part in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        if part.cross_attn_n_heads != part.n_heads or part.cross_attn_n_kv_heads != part.n_kv_heads:
            raise ValueError(f"transformers uses the {name}'s own heads for cross-attention; this model has "
                             f"cross_attn_n_heads={part.cross_attn_n_heads} vs n_heads={part.n_heads}")
    if cfg.encoder.window != cfg.decoder.window:
        raise ValueError("transformers has one local window for encoder and decoder")
    # transformers' patcher: one global entropy threshold (with max_patch_length), or a patch a
    # byte; anything else would load there and run with other patches than ours
    pc = cfg.patcher
    if pc.mode not in ("entropy", "byte"):
        raise ValueError(f"transformers patches by entropy or one byte a patch; this model patches by {pc.mode!r}, "
                         "which it would silently replace: export with --to meta, or keep --to native")
    if pc.mode == "entropy" and (pc.monotonicity or pc.threshold_add is not None):
        raise ValueError("transformers' entropy patching has one global threshold; this model patches "
                         f"{'monotonically' if pc.monotonicity else 'with threshold_add'}, which it would silently "
                         "replace: export with --to meta, or keep --to native")


def to_hf_config(cfg: BLTConfig) -> dict:
    """A transformers `BltConfig` dict. Set every sub-config field explicitly (spec §16.20)."""
    _check_exportable(cfg)
    g = cfg.global_transformer

    def local(part) -> dict:
        return {
            "hidden_size": part.dim, "num_attention_heads": part.n_heads, "num_key_value_heads": part.n_kv_heads,
            "num_hidden_layers": part.n_layers, "intermediate_size": part.ffn_dim,
            "cross_attn_all_layers": part.cross_attn_all_layers, "cross_attn_k": cfg.cross_attn_k,
            "hidden_size_global": g.dim, "max_position_embeddings": cfg.max_bytes,
            "rope_parameters": _rope(part.rope_theta), "rms_norm_eps": cfg.norm_eps,
            "vocab_size": cfg.vocab_size, "sliding_window": part.window,
        }

    out = {
        "model_type": "blt", "architectures": ["BltForCausalLM"], "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_patches,
        "patch_in_forward": cfg.entropy_model is not None,
        "patching_mode": "entropy", "patch_size": int(cfg.patcher.patch_size) if cfg.patcher.mode == "entropy" else None,
        "patching_threshold": cfg.patcher.threshold, "patching_batch_size": 1,
        "max_patch_length": cfg.patcher.max_patch_length,
        "local_attention_window_len": cfg.encoder.window, "cross_attn_k": cfg.cross_attn_k,
        "encoder_hash_byte_group_size": list(cfg.hash_sizes), "encoder_hash_byte_group_vocab": cfg.hash_vocab,
        "encoder_hash_byte_group_nb_functions": cfg.hash_functions, "tie_word_embeddings": False,
        "use_cache": False,  # transformers 5.23's cached path crashes or is wrong (spec §14)
        "rope_parameters": _rope(g.rope_theta),
        "encoder_config": local(cfg.encoder), "decoder_config": local(cfg.decoder),
        "global_config": {
            "hidden_size": g.dim, "num_attention_heads": g.n_heads, "num_key_value_heads": g.n_kv_heads,
            "num_hidden_layers": g.n_layers, "intermediate_size": g.ffn_dim,
            "max_position_embeddings": cfg.max_patches, "rope_parameters": _rope(g.rope_theta),
            "rms_norm_eps": cfg.norm_eps,
        },
        "bltkit": to_dict(cfg),
    }
    e = cfg.entropy_model
    if e is not None:
        out["patcher_config"] = {
            "hidden_size": e.dim, "num_attention_heads": e.n_heads, "num_key_value_heads": e.n_kv_heads,
            "num_hidden_layers": e.n_layers, "intermediate_size": e.ffn_dim, "vocab_size": e.vocab_size,
            "max_position_embeddings": e.max_seqlen, "rope_parameters": _rope(e.rope_theta),
            "rms_norm_eps": e.norm_eps, "sliding_window": e.window,
        }
    return out


def _theta(d: dict, default: float) -> float:
    rp = d.get("rope_parameters") or {}
    return float(rp.get("rope_theta", d.get("rope_theta", default)))


def from_hf_config(d: dict) -> BLTConfig:
    """Our config from a transformers `BltConfig` dict (its `bltkit` section wins when present)."""
    if d.get("model_type") != "blt":
        raise ValueError(f"not a transformers BLT config (model_type={d.get('model_type')!r})")
    if "bltkit" in d:
        return from_dict(BLTConfig, d["bltkit"])
    eps = float(d.get("encoder_config", {}).get("rms_norm_eps", 1e-5))
    window = d.get("local_attention_window_len", 512)

    def local(sub: dict, cls):
        heads = sub["num_attention_heads"]
        kv = sub.get("num_key_value_heads") or heads
        return cls(dim=sub["hidden_size"], n_layers=sub["num_hidden_layers"], n_heads=heads, n_kv_heads=kv,
                   ffn_dim=sub.get("intermediate_size"), rope_theta=_theta(sub, 500000.0), window=window,
                   cross_attn_all_layers=bool(sub.get("cross_attn_all_layers", cls is LocalDecoderConfig)),
                   cross_attn_n_heads=heads, cross_attn_n_kv_heads=kv)

    gd = d["global_config"]
    glob = GlobalTransformerConfig(dim=gd["hidden_size"], n_layers=gd["num_hidden_layers"],
                                   n_heads=gd["num_attention_heads"],
                                   n_kv_heads=gd.get("num_key_value_heads") or gd["num_attention_heads"],
                                   ffn_dim=gd.get("intermediate_size"), rope_theta=_theta(gd, 500000.0))
    entropy = None
    if d.get("patch_in_forward") and d.get("patcher_config"):
        pd = d["patcher_config"]
        entropy = EntropyModelConfig(dim=pd["hidden_size"], n_layers=pd["num_hidden_layers"],
                                     n_heads=pd["num_attention_heads"],
                                     n_kv_heads=pd.get("num_key_value_heads") or pd["num_attention_heads"],
                                     ffn_dim=pd.get("intermediate_size"), vocab_size=pd.get("vocab_size", 260),
                                     rope_theta=_theta(pd, 10000.0), norm_eps=float(pd.get("rms_norm_eps", 1e-5)),
                                     window=pd.get("sliding_window", 512),
                                     max_seqlen=pd.get("max_position_embeddings", 8192))
    mode = "entropy" if entropy is not None and d.get("patch_size") is not None else "byte"
    patcher = PatcherConfig(mode=mode, threshold=float(d.get("patching_threshold", 1.335442066192627)),
                            patch_size=float(d.get("patch_size") or 4.5), max_patch_length=d.get("max_patch_length"))
    enc = d["encoder_config"]
    return BLTConfig(
        encoder=local(enc, LocalEncoderConfig), global_transformer=glob,
        decoder=local(d["decoder_config"], LocalDecoderConfig), patcher=patcher, entropy_model=entropy,
        vocab_size=d.get("vocab_size", 260), cross_attn_k=d.get("cross_attn_k", 2),
        hash_sizes=list(d.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8]),
        hash_functions=d.get("encoder_hash_byte_group_nb_functions", 1),
        hash_vocab=d.get("encoder_hash_byte_group_vocab", 500002), norm_eps=eps,
        max_bytes=enc.get("max_position_embeddings", 24576), max_patches=gd.get("max_position_embeddings", 4096),
    )


def export_hf(model, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (a BLT) in the layout `BltForCausalLM.from_pretrained` reads."""
    from ..checkpoint import atomic_dir, check_output_dir, save_tensors
    from ..model import BLT

    if not isinstance(model, BLT):
        raise ValueError(f"transformers has a BLT class but no class for {type(model).__name__} alone; export "
                         "the BLT that holds it, or this model with --to meta (Meta's entropy-model layout)")
    out = Path(out_dir)
    check_output_dir(out)  # (before the copies to the CPU)
    hf_cfg = to_hf_config(model.config)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[native_key_to_hf(k)] = v.contiguous()
    with atomic_dir(out) as tmp:
        save_tensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out


def import_hf(src: str | os.PathLike, device=None):
    """Load a transformers BLT directory (config.json + model.safetensors[.index.json]) as a BLT."""
    from ..checkpoint import CheckpointError, check_state, one_float_dtype
    from ..hub import resolve
    from ..model import BLT

    src = resolve(src)  # a hub repository id where it is not a local path
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{src} has no config.json")
    cfg = from_hf_config(json.loads(cfg_file.read_text()))
    hf_state = read_safetensors_dir(src)
    state = one_float_dtype({hf_key_to_native(k): v for k, v in hf_state.items()})
    with torch.device("meta"):
        model = BLT(cfg)
    check_state(model, state, src)
    model.load_state_dict(state, strict=True, assign=True)
    if model.entropy_model is not None:
        model.entropy_model.requires_grad_(False)
    return model.to(device or "cpu").eval()
