"""Dataclass configs for the BLT, its parts and its entropy model; (de)serialisation; overrides.

Model configs hold architecture only (no device, dtype or batch knobs). `to_dict`/`from_dict`
round-trip through JSON; unknown keys raise with the nearest valid name. `apply_overrides` sets
any field from `dotted.path=value` tokens, coerced from the field's annotated type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1
PATCHING_MODES = ("entropy", "space", "static", "byte")


def ffn_width(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """SwiGLU hidden width of the released models (spec §6.6): 1024 -> 2816, 768 -> 2048."""
    hidden = int(multiplier * int(8 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(kw_only=True)
class _StackConfig:
    """Fields shared by every transformer stack."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: same as n_heads (released models)
    ffn_dim: int | None = None  # None: the width rule of spec §6.6
    rope_theta: float = 500000.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check(self.dim > 0 and self.n_layers >= 0 and self.n_heads > 0, f"{name}: sizes must be positive")
        _check(self.dim % self.n_heads == 0, f"{name}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check(self.n_heads % self.n_kv_heads == 0,
               f"{name}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.ffn_dim is None:
            self.ffn_dim = ffn_width(self.dim)
        _check((self.dim // self.n_heads) % 2 == 0, f"{name}: head_dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(kw_only=True)
class EntropyModelConfig(_StackConfig):
    """The small causal byte LM whose next-byte entropy places patch boundaries (spec §3)."""

    dim: int = 768
    n_layers: int = 14
    n_heads: int = 12
    rope_theta: float = 10000.0
    vocab_size: int = 260
    norm_eps: float = 1e-5
    window: int | None = 512  # local attention window, keys including the query
    max_seqlen: int = 8192


@dataclass(kw_only=True)
class _LocalConfig(_StackConfig):
    window: int | None = 512
    cross_attn_n_heads: int | None = None  # Meta's cross_attn_nheads; None: n_heads
    cross_attn_n_kv_heads: int | None = None  # None: cross_attn_n_heads (Meta has no GQA here)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_attn_n_heads is None:
            self.cross_attn_n_heads = self.n_heads
        if self.cross_attn_n_kv_heads is None:
            self.cross_attn_n_kv_heads = self.cross_attn_n_heads
        name = type(self).__name__
        _check(self.dim % self.cross_attn_n_heads == 0,
               f"{name}: dim {self.dim} is not divisible by cross_attn_n_heads {self.cross_attn_n_heads}")
        _check(self.cross_attn_n_heads % self.cross_attn_n_kv_heads == 0,
               f"{name}: cross_attn_n_heads is not a multiple of cross_attn_n_kv_heads")


@dataclass(kw_only=True)
class LocalEncoderConfig(_LocalConfig):
    cross_attn_all_layers: bool = False


@dataclass(kw_only=True)
class LocalDecoderConfig(_LocalConfig):
    cross_attn_all_layers: bool = True


@dataclass(kw_only=True)
class GlobalTransformerConfig(_StackConfig):
    pass


@dataclass(kw_only=True)
class PatcherConfig:
    """How bytes are grouped into patches (spec §4).

    mode: "entropy" (needs an entropy model), "space", "static" (`patch_size` bytes) or "byte".
    threshold: entropy threshold θ in nats; a position t ≥ 2 starts a patch iff H[t-1] > θ.
    threshold_add: if set, also require H[t-1] - H[t-2] > threshold_add (Meta's global+monotonic).
    monotonicity: if true, θ applies to H[t-1] - H[t-2] instead (Meta's approximate monotonic).
    max_patch_length: a patch that reaches this many bytes closes (spec §4.7, Meta's rule).
    doc_boundaries: a patch always starts right after a BOS or an EOS, so patches never straddle
      packed documents (what Meta's training packer produces by patching each document alone).
    """

    mode: str = "entropy"
    threshold: float = 1.335442066192627
    threshold_add: float | None = None
    monotonicity: bool = False
    patch_size: float = 4.5
    max_patch_length: int | None = None
    doc_boundaries: bool = True

    def __post_init__(self) -> None:
        _check(self.mode in PATCHING_MODES,
               f"PatcherConfig.mode {self.mode!r} is not one of {', '.join(PATCHING_MODES)} "
               "(top-k entropy patching is not incremental and is not offered)")
        if self.mode == "static":
            _check(float(self.patch_size).is_integer() and self.patch_size >= 1,
                   f"static patching needs an integer patch_size >= 1, got {self.patch_size}")
        _check(self.max_patch_length is None or self.max_patch_length >= 1,
               "max_patch_length must be None or >= 1")
        # (every comparison with NaN is false: a NaN threshold would start no patch)
        _check(not math.isnan(self.threshold), "PatcherConfig.threshold is NaN; give a number of nats")
        _check(self.threshold_add is None or not math.isnan(self.threshold_add),
               "PatcherConfig.threshold_add is NaN; give a number of nats or None")


def _default_hash_sizes() -> list[int]:
    return [3, 4, 5, 6, 7, 8]


@dataclass(kw_only=True)
class BLTConfig:
    """A whole Byte Latent Transformer (spec §1), with its patcher and optional entropy model."""

    encoder: LocalEncoderConfig
    global_transformer: GlobalTransformerConfig
    decoder: LocalDecoderConfig
    patcher: PatcherConfig = field(default_factory=PatcherConfig)
    entropy_model: EntropyModelConfig | None = None
    vocab_size: int = 260
    cross_attn_k: int = 2
    hash_sizes: list[int] = field(default_factory=_default_hash_sizes)
    hash_functions: int = 1
    hash_vocab: int = 500002
    norm_eps: float = 1e-5
    max_bytes: int = 24576  # longest byte sequence the model accepts
    max_patches: int = 4096  # longest patch sequence the global transformer accepts
    doc_masks: bool = True  # EOS ends a document for every self-attention mask (spec §6.5)

    def __post_init__(self) -> None:
        _check(self.encoder.dim == self.decoder.dim,
               f"encoder.dim {self.encoder.dim} must equal decoder.dim {self.decoder.dim}: "
               "the decoder reads the encoder's byte states (spec §9)")
        _check(self.cross_attn_k >= 1, "cross_attn_k must be >= 1")
        _check(self.hash_functions >= 0 and all(g >= 1 for g in self.hash_sizes),
               "hash_sizes must be >= 1 and hash_functions >= 0")
        _check(self.hash_vocab >= 1, "hash_vocab must be >= 1")
        if self.patcher.mode == "entropy" and self.entropy_model is None:
            raise ValueError("patcher.mode 'entropy' needs an entropy_model config "
                             "(or choose patcher.mode space/static/byte)")
        if self.entropy_model is not None:
            _check(self.entropy_model.vocab_size == self.vocab_size,
                   "entropy_model.vocab_size must equal vocab_size")

    @property
    def n_hash_tables(self) -> int:
        return self.hash_functions * len(self.hash_sizes)

    @property
    def has_global_projection(self) -> bool:
        return self.cross_attn_k * self.encoder.dim != self.global_transformer.dim

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> BLTConfig:
        return from_dict(cls, d, strict=strict)

    def to_json(self) -> str:
        return json.dumps({"config_version": CONFIG_VERSION, **self.to_dict()}, indent=2)


# ---------------------------------------------------------------------------------------------
# Generic (de)serialisation and overrides for any of our dataclasses.

_META_KEYS = {"config_version", "format"}


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (itself or `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls: type, d: dict[str, Any], strict: bool = True, path: str = "") -> Any:
    """Build dataclass `cls` from a dict; unknown keys raise with a suggestion when `strict`."""
    if not isinstance(d, dict):
        raise ValueError(f"config{' at ' + path if path else ''} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in names and not (not path and k in _META_KEYS)]
    if unknown and strict:
        msgs = []
        for k in unknown:
            near = difflib.get_close_matches(k, sorted(names), n=1)
            msgs.append(f"{path + '.' if path else ''}{k}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ValueError(f"unknown config key(s) for {cls.__name__}: {', '.join(msgs)}")
    hints = _hints(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            continue
        key = f"{path + '.' if path else ''}{k}"
        sub = _dataclass_in(hints[k])
        if sub is not None and isinstance(v, dict):
            v = from_dict(sub, v, strict=strict, path=key)
        elif not dataclasses.is_dataclass(v):  # (a dataclass: built by the caller)
            v = _typed(v, hints[k], key)
        kwargs[k] = v
    missing = [f"{path + '.' if path else ''}{f.name}" for f in dataclasses.fields(cls)
               if f.init and f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config key(s) missing for {cls.__name__}: {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad config for {cls.__name__}{' at ' + path if path else ''}: {e}") from None


def _union_member(args: tuple, convert) -> Any:
    """`convert(member)` of the first member type of a Union (None aside) it succeeds for; a
    ValueError when it fails for every one."""
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(arg)
        except ValueError:
            continue
    raise ValueError("no member type fits")


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a JSON object"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) in (list, tuple):
        return f"a list (each {_type_name(args[0]) if args else 'a value'})"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _typed(v: Any, tp: Any, key: str) -> Any:
    """`v` (read from JSON) as a value of type `tp`, or a ValueError naming `key` and the type: a
    string "false" for a bool read as true, 1.5 layers, a null where a section belongs were
    otherwise taken or failed deep inside. Whole floats (2.0) become ints, ints floats."""
    def bad() -> ValueError:
        return ValueError(f"config key {key} must be {_type_name(tp)}, got {v!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        try:
            return _union_member(args, lambda arg: _typed(v, arg, key))
        except ValueError:
            raise bad() from None
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if inner is str and isinstance(v, (str, os.PathLike)):  # one path where a list of them belongs
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise bad()
        return [_typed(x, inner, f"{key}[{i}]") for i, x in enumerate(v)]
    if dataclasses.is_dataclass(tp):
        raise bad()  # (a dict was built above)
    if tp is bool:
        if not isinstance(v, bool):
            raise bad()
        return v
    if tp is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise bad()
        return int(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        try:
            v = float(v)
        except OverflowError:  # a whole number past a float's range
            raise bad() from None
        if math.isnan(v):
            raise bad()
        return v
    if tp is str:
        if isinstance(v, os.PathLike):  # (a path given in Python)
            return os.fspath(v)
        if not isinstance(v, str):
            raise bad()
        return v
    return v


def _coerce(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        try:
            return _union_member(args, lambda arg: _coerce(text, arg, key))
        except ValueError:
            raise ValueError(f"cannot read {text!r} as {tp} for {key}") from None
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [s for s in text.strip("[]()").split(",") if s.strip()]
        return [_coerce(s.strip(), inner, key) for s in items]
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} takes true/false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)  # accept 1e3
            except ValueError:
                f = math.nan
            if not f.is_integer():
                raise ValueError(f"{key} takes an integer, got {text!r}") from None
            return int(f)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} takes a number, got {text!r}") from None
    if tp is str:
        return text
    if tp is Any:
        return json.loads(text) if text[:1] in "[{\"0123456789-" else text
    raise ValueError(f"cannot set {key}: unsupported type {tp}")


def _underive(d: dict, cls: type) -> None:
    """Forget derived values that still equal their rule (n_kv_heads = n_heads, the FFN width rule,
    cross-attention heads = heads), so that overriding `dim` or `n_heads` re-derives them."""
    if issubclass(cls, _StackConfig):
        if d.get("n_kv_heads") == d.get("n_heads"):
            d["n_kv_heads"] = None
        if d.get("ffn_dim") == ffn_width(d["dim"]):
            d["ffn_dim"] = None
        if "cross_attn_n_heads" in d:
            if d.get("cross_attn_n_kv_heads") == d.get("cross_attn_n_heads"):
                d["cross_attn_n_kv_heads"] = None
            if d.get("cross_attn_n_heads") == d.get("n_heads"):
                d["cross_attn_n_heads"] = None
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_in(hints[f.name])
        if sub is not None and isinstance(d.get(f.name), dict):
            _underive(d[f.name], sub)


def apply_overrides(obj: Any, tokens: list[str]) -> Any:
    """Return a copy of dataclass `obj` with `a.b.c=value` tokens applied (validated again).

    Derived fields that were not set to something else (kv heads, FFN width, cross-attention
    heads) are derived again from the new values."""
    d = to_dict(obj)
    cls = type(obj)
    _underive(d, cls)
    for tok in tokens:
        if "=" not in tok:
            raise ValueError(f"override {tok!r} is not of the form key.path=value")
        key, value = tok.split("=", 1)
        parts = key.strip().split(".")
        node_cls, node = cls, d
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in fields:
                near = difflib.get_close_matches(part, sorted(fields), n=1)
                hint = f" (did you mean {'.'.join([*parts[:i], near[0]])!r}?)" if near else ""
                raise ValueError(f"unknown config key {key!r}{hint}")
            tp = _hints(node_cls)[part]
            if i == len(parts) - 1:
                node[part] = _coerce(value.strip(), tp, key)
            else:
                sub = _dataclass_in(tp)
                if sub is None:
                    raise ValueError(f"{'.'.join(parts[: i + 1])} is not a section; cannot set {key}")
                if node.get(part) is None:
                    raise ValueError(f"{'.'.join(parts[: i + 1])} is not set in this config; cannot set {key}")
                node_cls, node = sub, node[part]
    return from_dict(cls, d)
