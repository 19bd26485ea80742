"""Meta's BLT checkpoint layouts <-> bltkit (spec §10-11): the only module that knows Meta's
argument names and folder layouts.

Reads (a) consolidated `params.json` + `consolidated.pth`, (b) hub-mixin `config.json` {"args"} +
`model.safetensors` + `train_args.json` + `entropy_model/`, (c) the entropy hub repo. Our keys are
Meta's except the hash tables, fused into one (style §3). Config fields are mapped strictly: a key
is mapped, checked against the one value bltkit implements, listed as ignorable, or rejected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CheckpointError,
    atomic_dir,
    check_output_dir,
    one_float_dtype,
    save_tensors,
)
from ..config import (
    BLTConfig,
    EntropyModelConfig,
    GlobalTransformerConfig,
    LocalDecoderConfig,
    LocalEncoderConfig,
    PatcherConfig,
    ffn_width,
    to_dict,
)
from ..hub import resolve
from ..model import BLT, EntropyModel

HASH_KEY = "encoder_hash_tok_embedding.weight"
_LEFTOVERS = ("dim", "n_layers", "n_heads")  # top-level ByteLatentTransformerArgs leftovers (§16.19)

# Meta's defaults (ByteLatentTransformerArgs/BaseTransformerArgs) for every BLT field we read.
# `None` for a field in _REQUIRED: Meta's default there is a placeholder (vocab -1, dims 512).
_MODEL_DEFAULTS: dict[str, Any] = {
    "vocab_size": None, "dim_local_encoder": None, "n_layers_local_encoder": None,
    "n_heads_local_encoder": None, "dim_global": None, "n_layers_global": None, "n_heads_global": None,
    "dim_local_decoder": None, "n_layers_local_decoder": None, "n_heads_local_decoder": None,
    "cross_attn_k": None, "cross_attn_nheads": None, "rope_theta": None,
    "n_kv_heads": None, "n_kv_heads_global": None, "head_dim": None, "dim_token": None,
    "max_encoder_seq_length": None, "max_seqlen": 1024, "norm_eps": 1e-5, "local_attention_window_len": None,
    "ffn_dim_multiplier": 1.0, "multiple_of": 256, "cross_attn_all_layers_encoder": False,
    "cross_attn_all_layers_decoder": False, "encoder_hash_byte_group_size": None,
    "encoder_hash_byte_group_vocab": 30000, "encoder_hash_byte_group_nb_functions": 3,
    "patching_mode": None, "patch_size": None, "patching_threshold": None, "patching_threshold_add": None,
    "monotonicity": False, "max_patch_length": None,
}
_REQUIRED = ("vocab_size", "dim_local_encoder", "n_layers_local_encoder", "n_heads_local_encoder", "dim_global",
             "n_layers_global", "n_heads_global", "dim_local_decoder", "n_layers_local_decoder",
             "n_heads_local_decoder", "cross_attn_k", "cross_attn_nheads", "rope_theta")
# Fields whose value selects an architecture: bltkit implements the released one (first value).
# Each entry: (Meta's default, accepted values). A missing key takes Meta's default.
_MODEL_FIXED: dict[str, tuple[Any, tuple]] = {
    "cross_attn_encoder": (False, (True,)), "cross_attn_decoder": (False, (True,)),
    "cross_attn_init_by_pooling": (False, (True,)), "use_local_encoder_transformer": (False, (True,)),
    "downsampling_by_pooling": (None, ("max",)), "cross_attn_window_encoder": (None, (None,)),
    "cross_attn_window_decoder": (None, (None,)), "attn_bias_type": ("causal", ("block_causal", "local_block_causal", "causal")),
    "weight_tying": (False, (False,)), "tie_local_encoder_decoder_logits": (False, (False,)),
    "tie_local_encoder_decoder": (False, (False,)), "encoder_enable_byte_ngrams": (False, (False,)),
    "encoder_ngram_to_size_str": (None, (None,)), "use_rope": (True, (True,)),
    "non_linearity": ("swiglu", ("swiglu",)), "norm_type": ("rmsnorm", ("rmsnorm",)),
    "norm_affine": (True, (True,)), "pre_norm": (True, (True,)), "architecture": ("vanilla", ("vanilla",)),
    "global_local_decoder_residual_layer": (None, (None,)), "conv_kernel_size": (None, (None,)),
    "pm_size": (0, (0,)), "tokenize_with_bpe_delimiter": (False, (False,)),
    "entropy_model_is_ngram_model": (False, (False,)), "eos_id": (2, (2, None)),
}
# Known fields that do not change the weights or the forward pass (training, parallelism, logging,
# initialisation, fields Meta's builders overwrite), plus the leftovers that must never be read.
IGNORED: frozenset[str] = frozenset({
    *_LEFTOVERS, "seed", "patch_in_forward", "patching_batch_size", "patching_device", "encoder_lm_loss",
    "pad_to_max_length", "encoder_enable_byte_group_hash", "ngram_vocab_sizes", "cross_attn_use_flex_attention",
    "log_patch_lengths", "recompute_fc1_out", "recompute_fc3_out", "recompute_attn", "custom_bwd", "layer_ckpt",
    "init_use_gaussian", "init_use_depth", "alpha_depth", "max_length", "dropout", "output_size",
    "share_encoder_decoder_emb", "patching_thresholds_str", "encoder_preds_low_entropy_toks",
    "encoder_preds_random_toks", "dim_token_emb", "dim_patch_emb", "encoder_ngram_table_dir",
    "entropy_model_checkpoint_dir", "sequence_parallel", "loss_parallel", "fuse_sequence_parallel", "use_fsdp",
    "attn_to_keep", "full_logging_n_layers", "rope_use_fp32_in_outer_product", "init_base_std",
    "init_std_factor", "attn_impl", "init_device", "init_dtype",
})
# LMTransformerArgs (the entropy model). Meta's loader hard-codes the mask and window 512 (§3.3).
_ENTROPY_DEFAULTS: dict[str, Any] = {
    "dim": None, "n_layers": None, "n_heads": None, "vocab_size": None, "max_seqlen": None,
    "n_kv_heads": None, "head_dim": None, "ffn_dim_multiplier": None, "multiple_of": 256, "norm_eps": 1e-5,
    "rope_theta": 10000.0, "sliding_window": None, "weight_tying": False,
}
IGNORED_ENTROPY: frozenset[str] = frozenset({
    "seed", "attn_impl", "attn_bias_type", "eos_id", "init_base_std", "init_std_factor", "init_device",
    "init_dtype", "rope_use_fp32_in_outer_product",
})
# PatcherArgs (`data.patcher_args`); the defaults are the released values (spec §4.1).
_PATCHER_DEFAULTS: dict[str, Any] = {
    "patching_mode": "entropy", "threshold": 1.335442066192627, "threshold_add": None, "monotonicity": False,
    "max_patch_length": None, "patch_size": 4.5,
}
IGNORED_PATCHER: frozenset[str] = frozenset({
    "patching_device", "entropy_model", "entropy_model_checkpoint_dir", "realtime_patching",
    "patching_batch_size", "data_loader_patching", "device", "log_time",
})


def _resolve(args: dict, defaults: dict, ignored: frozenset, what: str, allow_unknown: bool,
             checked: tuple = ()) -> dict:
    if not isinstance(args, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(args).__name__}")
    unknown = sorted(set(args) - set(defaults) - set(checked) - ignored)
    if unknown and not allow_unknown:
        raise ValueError(f"unknown {what} field(s): {', '.join(unknown)}; bltkit does not know whether they "
                         "change the model (to skip them: `blt convert ... --allow-unknown`, or allow_unknown=True)")
    return {**defaults, **{k: v for k, v in args.items() if k in defaults}}


def _check_head_dim(head_dim: int | None, parts: dict[str, tuple[int, int]]) -> None:
    for name, (dim, heads) in parts.items():
        if head_dim is not None and head_dim * heads != dim:
            raise ValueError(f"head_dim={head_dim} with {name} dim {dim} / {heads} heads: bltkit always uses "
                             "head_dim = dim / n_heads (spec §6.3)")


def entropy_config_from_meta_args(args: dict, allow_unknown: bool = False) -> EntropyModelConfig:
    """Our EntropyModelConfig from Meta's LMTransformerArgs (the `entropy_model` section)."""
    a = _resolve(args, _ENTROPY_DEFAULTS, IGNORED_ENTROPY, "entropy model args", allow_unknown)
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size", "max_seqlen") if a[k] is None]
    if missing:
        raise ValueError(f"entropy model args miss {', '.join(missing)}")
    if a["weight_tying"]:
        raise ValueError("entropy model with weight_tying=True is not supported (released models untie)")
    _check_head_dim(a["head_dim"], {"entropy model": (a["dim"], a["n_heads"])})
    return EntropyModelConfig(
        dim=a["dim"], n_layers=a["n_layers"], n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"],
        ffn_dim=ffn_width(a["dim"], a["ffn_dim_multiplier"] or 1.0, a["multiple_of"]),
        rope_theta=float(a["rope_theta"]), vocab_size=a["vocab_size"], norm_eps=float(a["norm_eps"]),
        # Meta's loader always runs the entropy model with a 512 window (spec §3.3.4)
        window=a["sliding_window"] if a["sliding_window"] is not None else 512, max_seqlen=a["max_seqlen"])


def _patcher_config(model: dict, patcher_args: dict | None, allow_unknown: bool) -> PatcherConfig:
    if patcher_args is None:  # no data.patcher_args: the model args' own patching_* fields
        p = {"patching_mode": model["patching_mode"], "threshold": model["patching_threshold"],
             "threshold_add": model["patching_threshold_add"], "monotonicity": model["monotonicity"],
             "max_patch_length": model["max_patch_length"], "patch_size": model["patch_size"]}
        p = {**_PATCHER_DEFAULTS, **{k: v for k, v in p.items() if v is not None}}
    else:
        p = _resolve(patcher_args, _PATCHER_DEFAULTS, IGNORED_PATCHER, "patcher args", allow_unknown)
    mode = getattr(p["patching_mode"], "value", p["patching_mode"])
    if mode not in ("entropy", "space", "static", "byte"):
        raise ValueError(f"patching_mode {mode!r} is not supported (bpe needs an unreleased delimiter model, "
                         "'' is the legacy MegaByte path); use entropy, space, static or byte")
    if mode == "entropy" and p["threshold"] is None:
        raise ValueError("entropy patching without a threshold (top-k) is not incremental and not supported")
    p = {**p, **{k: _PATCHER_DEFAULTS[k] for k in ("threshold", "patch_size") if p[k] is None}}
    return PatcherConfig(mode=mode, threshold=float(p["threshold"]), threshold_add=p["threshold_add"],
                         monotonicity=bool(p["monotonicity"]), patch_size=float(p["patch_size"]),
                         max_patch_length=p["max_patch_length"])


def config_from_meta_args(model_args: dict, patcher_args: dict | None, entropy_args: dict | None,
                          allow_unknown: bool = False) -> BLTConfig:
    """Our BLTConfig from Meta's ByteLatentTransformerArgs, PatcherArgs and LMTransformerArgs dicts.

    Raises ValueError for anything bltkit does not implement, a missing size field, or (unless
    `allow_unknown`) a field it does not know. The top-level dim/n_layers/n_heads are never read.
    """
    a = _resolve(model_args, _MODEL_DEFAULTS, IGNORED, "model args", allow_unknown, tuple(_MODEL_FIXED))
    missing = [k for k in _REQUIRED if a[k] is None]
    if missing:
        leftover = [k for k in _LEFTOVERS if k in model_args]
        hint = (f" (only the top-level leftovers {', '.join(leftover)} are set: they never describe a sub-model, "
                "spec §16.19)") if leftover and "dim_local_encoder" in missing else ""
        raise ValueError(f"model args miss {', '.join(missing)}{hint}")
    for key, (default, accepted) in _MODEL_FIXED.items():
        value = model_args.get(key, default)
        if value not in accepted:
            raise ValueError(f"{key}={value!r} is not supported: bltkit implements the released architecture "
                             f"({key}={accepted[0]!r}){' (key missing, Meta default)' if key not in model_args else ''}")
    De, Dg, Dd = a["dim_local_encoder"], a["dim_global"], a["dim_local_decoder"]
    if a["dim_token"] not in (None, De):
        raise ValueError(f"dim_token={a['dim_token']} != dim_local_encoder={De} is not supported")
    if Dg == Dd:  # Meta builds the decoder's patch projection only when the widths differ (spec §9.5)
        raise ValueError(f"dim_global == dim_local_decoder ({Dg}): Meta's decoder then has no patch projection")
    _check_head_dim(a["head_dim"], {"encoder": (De, a["n_heads_local_encoder"]), "global": (Dg, a["n_heads_global"]),
                                    "decoder": (Dd, a["n_heads_local_decoder"])})
    mult, multiple_of, theta = a["ffn_dim_multiplier"] or 1.0, a["multiple_of"], float(a["rope_theta"])
    window, kv, heads_x = a["local_attention_window_len"], a["n_kv_heads"], a["cross_attn_nheads"]

    def local(cls, dim: int, layers: int, heads: int, all_layers: bool):
        return cls(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn_width(dim, mult, multiple_of),
                   rope_theta=theta, window=window, cross_attn_n_heads=heads_x, cross_attn_n_kv_heads=heads_x,
                   cross_attn_all_layers=bool(all_layers))  # Meta's cross-attention has no GQA (spec §7.6)

    sizes = a["encoder_hash_byte_group_size"]
    if isinstance(sizes, str):  # Meta also accepts "3,4,5"
        sizes = [int(s) for s in sizes.split(",") if s]
    if sizes and ("encoder_hash_byte_group_vocab" not in model_args
                  or "encoder_hash_byte_group_nb_functions" not in model_args):
        raise ValueError("hash n-gram tables need explicit encoder_hash_byte_group_vocab and "
                         "encoder_hash_byte_group_nb_functions (Meta's defaults 30000/3 are not the released "
                         "500002/1, spec §16.19)")
    patcher = _patcher_config(a, patcher_args, allow_unknown)
    if patcher.mode == "entropy" and entropy_args is None:
        raise ValueError("patching_mode 'entropy' needs the entropy model's args (its params.json/config.json)")
    return BLTConfig(
        encoder=local(LocalEncoderConfig, De, a["n_layers_local_encoder"], a["n_heads_local_encoder"],
                      a["cross_attn_all_layers_encoder"]),
        global_transformer=GlobalTransformerConfig(dim=Dg, n_layers=a["n_layers_global"], n_heads=a["n_heads_global"],
                                                   n_kv_heads=a["n_kv_heads_global"], rope_theta=theta,
                                                   ffn_dim=ffn_width(Dg, mult, multiple_of)),
        decoder=local(LocalDecoderConfig, Dd, a["n_layers_local_decoder"], a["n_heads_local_decoder"],
                      a["cross_attn_all_layers_decoder"]),
        patcher=patcher,
        entropy_model=entropy_config_from_meta_args(entropy_args, allow_unknown) if entropy_args is not None else None,
        vocab_size=a["vocab_size"], cross_attn_k=a["cross_attn_k"], hash_sizes=list(sizes or []),
        hash_functions=a["encoder_hash_byte_group_nb_functions"], hash_vocab=a["encoder_hash_byte_group_vocab"],
        norm_eps=float(a["norm_eps"]), max_patches=a["max_seqlen"],
        # Meta's local RoPE tables have max_encoder_seq_length rows; transformers falls back to max_seqlen
        max_bytes=a["max_encoder_seq_length"] or a["max_seqlen"],
        doc_masks=model_args.get("attn_bias_type", "causal") != "causal")  # plain "causal": no EOS documents


# ---------------------------------------------------------------------------------------------
# Import


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable or not JSON: {e}") from None


def _drop_rope(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # RoPE tables are recomputed on the fly (spec §6.4); some files carry them (facebookresearch/blt#133)
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] != "freqs_cis"}


def _read_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(params-like dict with `model`/`entropy_model`/`data`, state dict with its floating tensors
    in one dtype, weights file) of a Meta folder."""
    params, state, weights = _read_files(path)
    return params, one_float_dtype(state), weights


def _read_files(path: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    if (path / "params.json").is_file() and (path / "consolidated.pth").is_file():
        weights = path / "consolidated.pth"
        try:  # a pickle: never without weights_only (spec §16.23); mmap keeps the hash tables lazy
            obj = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{weights} is unreadable ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
            raise CheckpointError(f"{weights} has no 'model' state dict entry")
        return _json(path / "params.json"), _drop_rope(obj["model"]), weights
    if (path / "config.json").is_file():
        from . import read_safetensors_dir

        cfg = _json(path / "config.json")
        if not isinstance(cfg.get("args"), dict):
            if cfg.get("model_type") == "blt":
                fmt = "a transformers BLT: use --from hf"
            elif cfg.get("format") == "bltkit":
                fmt = "a bltkit model: use --from native"
            else:
                fmt = "nor a transformers or bltkit config"
            raise CheckpointError(f"{path / 'config.json'} has no 'args' object: not a Meta hub checkpoint ({fmt})")
        state = _drop_rope(read_safetensors_dir(path))
        if _is_blt(state):
            train = path / "train_args.json"
            return {**(_json(train) if train.is_file() else {}), "model": cfg["args"]}, state, path / "model.safetensors"
        return {"entropy_model": cfg["args"]}, state, path / "model.safetensors"
    raise CheckpointError(f"{path} is not a Meta checkpoint folder (needs params.json + consolidated.pth, "
                          "or config.json + model.safetensors)")


def _is_blt(state: dict) -> bool:
    return any(k.startswith("local_encoder.") for k in state)


def _check_keys(expected: dict[str, tuple], state: dict[str, torch.Tensor], where: Path) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshapen tensor (Meta's names)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {expected[k]}" for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != expected[k]]
    problems = ([f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}"] if missing else []) + \
        ([f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"] if unexpected else []) + \
        (["shape mismatch: " + "; ".join(shapes[:8])] if shapes else [])
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + " | ".join(problems))


def _expected_blt(model: BLT) -> dict[str, tuple]:
    c, out = model.config, {}
    for k, v in model.blt_state_dict().items():
        if k == HASH_KEY:  # Meta: one table per (function, size), n = f*len(sizes) + gi (spec §5.2)
            out.update({f"encoder_hash_tok_embedding.{n}.weight": (c.hash_vocab, c.encoder.dim)
                        for n in range(c.n_hash_tables)})
        else:
            out[k] = tuple(v.shape)
    return out


def _find_entropy_dir(src: Path, given: str | os.PathLike | None) -> Path | None:
    if given is not None:
        if not Path(given).is_dir():
            raise CheckpointError(f"entropy_dir {given} is not a directory")
        return Path(given)
    for cand in (src / "entropy_model", src.parent / "entropy_model"):  # hub (b) / facebook/blt (a)
        if cand.is_dir() and cand.resolve() != src.resolve():
            return cand
    return None


def _load_entropy(path: Path, params: dict, state: dict, allow_unknown: bool) -> EntropyModel:
    if _is_blt(state) or not isinstance(params.get("entropy_model"), dict):
        raise CheckpointError(f"{path} is not a Meta entropy model folder (no entropy_model args or BLT weights)")
    try:
        cfg = entropy_config_from_meta_args(params["entropy_model"], allow_unknown)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = EntropyModel(cfg)
    _check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def import_meta(src: str | os.PathLike, device: str | torch.device | None = None,
                entropy_dir: str | os.PathLike | None = None, allow_unknown: bool = False) -> BLT | EntropyModel:
    """Load a Meta BLT folder (layout a or b) as a BLT, or an entropy folder (a or c) as an EntropyModel.

    The entropy model is looked up in `entropy_dir`, else `SRC/entropy_model`, else a sibling
    `entropy_model/` (Meta's facebook/blt repo). Every key and shape is checked before loading.
    `src` and `entropy_dir` may be hub repository ids (`bltkit.hub`): facebook/blt-1b, say, or
    facebook/blt/blt_1b.
    """
    src = resolve(src)
    params, state, weights = _read_dir(src)
    if not _is_blt(state):
        return _load_entropy(weights, params, state, allow_unknown).to(device or "cpu").eval()
    ent_path = _find_entropy_dir(src, resolve(entropy_dir) if entropy_dir is not None else None)
    ent_params, ent_state, ent_weights = _read_dir(ent_path) if ent_path is not None else (None, None, None)
    patcher_args = ((params.get("data") or {}).get("patcher_args")
                    or ((ent_params or {}).get("data") or {}).get("patcher_args"))
    # The BLT's own `entropy_model` section may be a default leftover; the entropy folder is authoritative.
    ent_args = (ent_params or {}).get("entropy_model")
    if not isinstance(params.get("model"), dict):
        raise CheckpointError(f"{src} has no BLT model args")
    try:
        cfg = config_from_meta_args(params["model"], patcher_args, ent_args, allow_unknown)
    except ValueError as e:
        hint = f"; no entropy model found next to {src} (`blt convert ... --entropy-model DIR`, or entropy_dir=)" if ent_path is None else ""
        raise CheckpointError(f"{src}: {e}{hint}") from None
    with torch.device("meta"):
        model = BLT(cfg)
    _check_keys(_expected_blt(model), state, weights)
    tables = [state.pop(f"encoder_hash_tok_embedding.{n}.weight") for n in range(cfg.n_hash_tables)]
    if tables:
        state[HASH_KEY] = torch.cat(tables, 0)  # table n at rows n*V .. (n+1)*V-1
    if model.entropy_model is not None:
        ent = _load_entropy(ent_weights, ent_params, ent_state, allow_unknown)
        state.update({f"entropy_model.{k}": v for k, v in ent.state_dict().items()})
    model.load_state_dict(state, strict=True, assign=True)
    if model.entropy_model is not None:
        model.entropy_model.requires_grad_(False)  # frozen patcher (spec §3)
    return model.to(device or "cpu").eval()


def import_meta_entropy(src: str | os.PathLike, device: str | torch.device | None = None,
                        allow_unknown: bool = False) -> EntropyModel:
    """An entropy model from its own Meta folder, or from a BLT folder's entropy model."""
    src = resolve(src)
    params, state, weights = _read_dir(src)
    if _is_blt(state):
        ent_path = _find_entropy_dir(src, None)
        if ent_path is None:
            raise CheckpointError(f"{src} is a BLT folder without an entropy_model/ next to it")
        params, state, weights = _read_dir(ent_path)
    return _load_entropy(weights, params, state, allow_unknown).to(device or "cpu").eval()


# ---------------------------------------------------------------------------------------------
# Export


def _ffn_rule(stacks: list[tuple[int, int]]) -> tuple[float, int]:
    """(ffn_dim_multiplier, multiple_of) giving every (dim, ffn_dim) by Meta's one rule (spec §6.6)."""
    for mo in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if any(w % mo for _, w in stacks):
            continue
        # ffn_width(d, m, mo) == w  <=>  w - mo + 1 <= m * int(8d/3) < w + 1
        lo = max((w - mo + 1) / int(8 * d / 3) for d, w in stacks)
        hi = min((w + 1) / int(8 * d / 3) for d, w in stacks)
        for mult in (1.0, *(round((lo + hi) / 2, n) for n in range(1, 10))):
            if all(ffn_width(d, mult, mo) == w for d, w in stacks):
                return mult, mo
    raise ValueError(f"FFN widths {stacks} (dim, ffn_dim) cannot be written with Meta's single "
                     "ffn_dim_multiplier/multiple_of rule")


def entropy_args_from_config(e: EntropyModelConfig) -> dict:
    """LMTransformerArgs dict for `e`; raises if Meta's loader would not read it back as `e`."""
    mult, mo = _ffn_rule([(e.dim, e.ffn_dim)])
    args = {"dim": e.dim, "n_layers": e.n_layers, "n_heads": e.n_heads, "n_kv_heads": e.n_kv_heads,
            "vocab_size": e.vocab_size, "max_seqlen": e.max_seqlen, "norm_eps": e.norm_eps, "rope_theta": e.rope_theta,
            "ffn_dim_multiplier": mult, "multiple_of": mo, "sliding_window": e.window,
            "attn_bias_type": "local_block_causal", "attn_impl": "xformers", "weight_tying": False}
    if (back := entropy_config_from_meta_args(args)) != e:  # e.g. no window: Meta's loader uses 512
        raise ValueError(f"this entropy model cannot be written in Meta's layout: {_diff(to_dict(e), to_dict(back))}")
    return args


def meta_args_from_config(cfg: BLTConfig) -> tuple[dict, dict]:
    """(ByteLatentTransformerArgs dict, PatcherArgs dict) for `cfg`; raises if Meta cannot express it."""
    e, g, d, p = cfg.encoder, cfg.global_transformer, cfg.decoder, cfg.patcher
    mult, mo = _ffn_rule([(e.dim, e.ffn_dim), (g.dim, g.ffn_dim), (d.dim, d.ffn_dim)])
    patching = {"patching_mode": p.mode, "threshold": p.threshold, "threshold_add": p.threshold_add,
                "monotonicity": p.monotonicity, "max_patch_length": p.max_patch_length, "patch_size": p.patch_size}
    args = {
        "vocab_size": cfg.vocab_size, "dim_local_encoder": e.dim, "n_layers_local_encoder": e.n_layers,
        "n_heads_local_encoder": e.n_heads, "dim_global": g.dim, "n_layers_global": g.n_layers,
        "n_heads_global": g.n_heads, "dim_local_decoder": d.dim, "n_layers_local_decoder": d.n_layers,
        "n_heads_local_decoder": d.n_heads, "n_kv_heads": e.n_kv_heads, "n_kv_heads_global": g.n_kv_heads,
        "ffn_dim_multiplier": mult, "multiple_of": mo, "norm_eps": cfg.norm_eps, "rope_theta": e.rope_theta,
        "max_seqlen": cfg.max_patches, "max_encoder_seq_length": cfg.max_bytes, "local_attention_window_len": e.window,
        "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_init_by_pooling": True,
        "use_local_encoder_transformer": True, "downsampling_by_pooling": "max", "cross_attn_k": cfg.cross_attn_k,
        "cross_attn_nheads": e.cross_attn_n_heads, "cross_attn_all_layers_encoder": e.cross_attn_all_layers,
        "cross_attn_all_layers_decoder": d.cross_attn_all_layers,
        "encoder_hash_byte_group_size": list(cfg.hash_sizes) or None,
        "encoder_hash_byte_group_vocab": cfg.hash_vocab, "encoder_hash_byte_group_nb_functions": cfg.hash_functions,
        "attn_bias_type": "block_causal" if cfg.doc_masks else "causal", "eos_id": 2, "use_rope": True,
        "weight_tying": False, "patch_in_forward": cfg.entropy_model is not None, "patching_mode": p.mode,
        "patch_size": p.patch_size, "patching_threshold": p.threshold, "patching_threshold_add": p.threshold_add,
        "monotonicity": p.monotonicity, "max_patch_length": p.max_patch_length,
    }
    ent = entropy_args_from_config(cfg.entropy_model) if cfg.entropy_model is not None else None
    # One args dict holds one window, one θ, one kv count and one cross-attention head count for
    # the encoder and decoder: re-read what we wrote and refuse anything that did not survive.
    try:
        back = config_from_meta_args(args, patching, ent)
    except ValueError as err:
        raise ValueError(f"this model cannot be written in Meta's layout: {err}") from None
    if back != cfg:
        diff = _diff(to_dict(cfg), to_dict(back))
        raise ValueError(f"this model cannot be written in Meta's layout; Meta's args cannot express {diff}")
    return args, patching


def _diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        return ", ".join(x for k in a if (x := _diff(a[k], b.get(k), f"{path}{k}.")))
    return "" if a == b else f"{path.rstrip('.')}={a!r} (would read back as {b!r})"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}  # plain tensors, no Parameters


def _split_hash(state: dict[str, torch.Tensor], cfg: BLTConfig) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if k != HASH_KEY}
    if HASH_KEY in state:
        for n, table in enumerate(state[HASH_KEY].split(cfg.hash_vocab, 0)):
            out[f"encoder_hash_tok_embedding.{n}.weight"] = table.clone()  # own storage
    return out


def _write(folder: Path, state: dict[str, torch.Tensor], layout: str, params: dict, hub_args: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(state)
    if layout == "consolidated":
        torch.save({"model": tensors}, folder / "consolidated.pth")
        (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    else:
        save_tensors(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"args": hub_args}, indent=2) + "\n")


def export_meta(model: BLT | EntropyModel, out_dir: str | os.PathLike, layout: str = "consolidated") -> Path:
    """Write `model` in Meta's layout: "consolidated" (params.json + consolidated.pth) or "hub"
    (config.json {"args"} + model.safetensors + train_args.json); a BLT's entropy model goes to
    `entropy_model/` as params.json + consolidated.pth, as in facebook/blt-1b."""
    if layout not in ("consolidated", "hub"):
        raise ValueError(f"layout must be 'consolidated' or 'hub', got {layout!r}")
    out = Path(out_dir)
    check_output_dir(out)
    if isinstance(model, EntropyModel):
        ent = entropy_args_from_config(model.config)
        with atomic_dir(out) as tmp:
            _write(tmp, model.state_dict(), layout, {"entropy_model": ent}, ent)
        return out
    cfg = model.config
    args, patching = meta_args_from_config(cfg)
    ent = entropy_args_from_config(cfg.entropy_model) if cfg.entropy_model is not None else None
    params = {"model": args, "entropy_model": ent, "data": {"patcher_args": patching}}
    with atomic_dir(out) as tmp:
        _write(tmp, _split_hash(model.blt_state_dict(), cfg), layout, params, args)
        if layout == "hub":
            (tmp / "train_args.json").write_text(json.dumps(params, indent=2) + "\n")
        if model.entropy_model is not None:
            _write(tmp / "entropy_model", model.entropy_model.state_dict(), "consolidated",
                   {"entropy_model": ent, "data": {"patcher_args": patching}}, ent)
    return out
