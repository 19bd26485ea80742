"""Configs (style §5): serialisation round trips, unknown keys, overrides, the FFN width rule,
presets built on the meta device with the parameter counts of spec §10.2, invalid configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bltkit.config import (
    BLTConfig,
    EntropyModelConfig,
    LocalDecoderConfig,
    LocalEncoderConfig,
    PatcherConfig,
    apply_overrides,
    ffn_width,
    from_dict,
    to_dict,
)
from bltkit.model import BLT, EntropyModel
from bltkit.presets import PRESETS, get_preset, tiny


def _count(module: torch.nn.Module, prefix_filter=lambda k: True) -> int:
    return sum(p.numel() for k, p in module.named_parameters() if prefix_filter(k))


# ------------------------------------------------------------------------------------------
# serialisation


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_and_json_round_trip(name):
    cfg = get_preset(name)
    cls = type(cfg)
    d = to_dict(cfg)
    assert from_dict(cls, d) == cfg
    assert from_dict(cls, json.loads(json.dumps(d))) == cfg
    if isinstance(cfg, BLTConfig):
        assert cfg.to_dict() == d
        assert BLTConfig.from_dict(d) == cfg
        payload = json.loads(cfg.to_json())
        assert payload["config_version"] >= 1
        assert BLTConfig.from_dict(payload) == cfg  # config_version is accepted at top level


def test_get_preset_accepts_underscores_and_suggests():
    assert get_preset("blt_1b") == get_preset("blt-1b")
    with pytest.raises(ValueError, match="did you mean 'blt-1b'"):
        get_preset("blt-1bb")


def test_unknown_top_level_key_suggests():
    d = tiny().to_dict()
    d["hash_vocb"] = 7
    with pytest.raises(ValueError, match=r"hash_vocb.*did you mean 'hash_vocab'"):
        BLTConfig.from_dict(d)


def test_unknown_nested_key_suggests():
    d = tiny().to_dict()
    d["encoder"]["n_layer"] = 1
    with pytest.raises(ValueError, match=r"encoder\.n_layer.*did you mean 'n_layers'"):
        BLTConfig.from_dict(d)
    d = tiny().to_dict()
    d["patcher"]["treshold"] = 1.0
    with pytest.raises(ValueError, match=r"patcher\.treshold.*did you mean 'threshold'"):
        BLTConfig.from_dict(d)


def test_non_strict_ignores_unknown_keys():
    d = tiny().to_dict()
    d["leftover"] = 1
    assert BLTConfig.from_dict(d, strict=False) == tiny()


def test_entropy_model_none_round_trip():
    cfg = dataclasses.replace(tiny(), entropy_model=None, patcher=PatcherConfig(mode="space"))
    assert BLTConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ------------------------------------------------------------------------------------------
# overrides


def test_override_types():
    base = tiny()
    cfg = apply_overrides(base, [
        "hash_vocab=77",  # int
        "patcher.threshold=0.25",  # float
        "patcher.monotonicity=true",  # bool
        "doc_masks=off",  # bool, other spelling
        "patcher.mode=space",  # str
        "hash_sizes=[3,5]",  # list[int]
        "encoder.window=8",  # nested int | None
        "entropy_model.n_layers=3",  # optional section
        "patcher.max_patch_length=6",
    ])
    assert cfg.hash_vocab == 77
    assert isinstance(cfg.hash_vocab, int)
    assert cfg.patcher.threshold == 0.25
    assert cfg.patcher.monotonicity is True
    assert cfg.doc_masks is False
    assert cfg.patcher.mode == "space"
    assert cfg.hash_sizes == [3, 5]
    assert cfg.encoder.window == 8
    assert cfg.entropy_model.n_layers == 3
    assert cfg.patcher.max_patch_length == 6
    assert base == tiny()  # the input is not modified


def test_override_list_without_brackets_and_int_from_exponent():
    cfg = apply_overrides(tiny(), ["hash_sizes=3,4,5", "max_bytes=1e3"])
    assert cfg.hash_sizes == [3, 4, 5]
    assert cfg.max_bytes == 1000


def test_override_none_for_optional_fields():
    cfg = apply_overrides(tiny(), ["patcher.max_patch_length=5"])
    cfg = apply_overrides(cfg, ["patcher.max_patch_length=None", "encoder.window=none",
                                "patcher.threshold_add=null"])
    assert cfg.patcher.max_patch_length is None
    assert cfg.encoder.window is None
    assert cfg.patcher.threshold_add is None
    cfg = apply_overrides(tiny(), ["patcher.mode=byte", "entropy_model=none"])
    assert cfg.entropy_model is None


def test_override_revalidates():
    with pytest.raises(ValueError, match="entropy_model"):
        apply_overrides(tiny(), ["entropy_model=none"])  # entropy patching needs it
    with pytest.raises(ValueError, match=r"decoder\.dim"):
        apply_overrides(tiny(), ["encoder.dim=64"])


def test_override_unknown_path_suggests():
    with pytest.raises(ValueError, match=r"did you mean 'encoder\.window'"):
        apply_overrides(tiny(), ["encoder.windw=8"])
    with pytest.raises(ValueError, match=r"did you mean 'patcher'"):
        apply_overrides(tiny(), ["patchr.mode=byte"])
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides(tiny(), ["hash_vocab.x=1"])
    with pytest.raises(ValueError, match=r"key\.path=value"):
        apply_overrides(tiny(), ["hash_vocab"])


@pytest.mark.parametrize(("token", "key"), [
    ("hash_vocab=abc", "hash_vocab"),
    ("cross_attn_k=1.5", "cross_attn_k"),
    ("patcher.monotonicity=maybe", "patcher.monotonicity"),
    ("patcher.threshold=high", "patcher.threshold"),
    ("encoder.window=wide", "encoder.window"),
    ("hash_sizes=[3,x]", "hash_sizes"),
])
def test_override_bad_value_names_the_key(token, key):
    with pytest.raises(ValueError, match=r"\S") as exc:  # any message; the key is checked below
        apply_overrides(tiny(), [token])
    assert key in str(exc.value), f"error for {token!r} does not name the key: {exc.value}"


# ------------------------------------------------------------------------------------------
# FFN width rule (spec §6.6)


@pytest.mark.parametrize(("dim", "hidden"), [(768, 2048), (1024, 2816), (1280, 3584), (2048, 5632), (4096, 11008)])
def test_ffn_width_rule(dim, hidden):
    assert ffn_width(dim) == hidden
    assert LocalEncoderConfig(dim=dim, n_layers=1, n_heads=dim // 64).ffn_dim == hidden


def test_ffn_width_is_not_the_unrounded_value():
    assert ffn_width(1024) != 2730  # spec §16.11


# ------------------------------------------------------------------------------------------
# presets on the meta device


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = BLT(cfg) if isinstance(cfg, BLTConfig) else EntropyModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert _count(model) > 0


def _blt_counts(cfg: BLTConfig) -> tuple[int, int]:
    """(parameters of the BLT proper, of which hash tables); the entropy model is counted apart."""
    with torch.device("meta"):
        model = BLT(cfg)
    total = _count(model, lambda k: not k.startswith("entropy_model."))
    hashed = _count(model, lambda k: k.startswith("encoder_hash_tok_embedding."))
    return total, hashed


def test_blt_1b_parameter_count():
    # spec §10.2 (derived): encoder layer 12.8M + cross-attn/projection 6.3M + global 1.285B
    # + decoder blocks 115.6M + 9 cross-attns 37.7M + projection 4.2M + byte embedding/head
    # 0.27M each ≈ 1.46B without hash tables; hash tables 6 x 500002 x 1024 = 3.072B, ≈ 4.53B with.
    total, hashed = _blt_counts(get_preset("blt-1b"))
    assert hashed == 6 * 500002 * 1024
    # ±0.5%: the spec rounds its per-part figures to 3 significant digits
    assert total - hashed == pytest.approx(1.46e9, rel=5e-3)
    assert total == pytest.approx(4.53e9, rel=5e-3)


def test_blt_7b_parameter_count():
    # spec §10.2: ≈ 10.55B including 6 x 500002 x 1280 ≈ 3.84B of hash tables; the global
    # token_embedding_projection 5120 -> 4096 exists (k·De = 4·1280 ≠ 4096).
    cfg = get_preset("blt-7b")
    assert cfg.has_global_projection
    total, hashed = _blt_counts(cfg)
    assert hashed == 6 * 500002 * 1280
    # ±0.5%: the spec gives 3-4 significant digits
    assert hashed == pytest.approx(3.84e9, rel=5e-3)
    assert total == pytest.approx(10.55e9, rel=5e-3)


def test_entropy_100m_parameter_count():
    # spec §3.1: 14 blocks x 7.08M (4·768² attention + 3·768·2048 FFN + 2 norms) + embedding
    # and head 2 x 260 x 768 + final norm ≈ 99.5M
    with torch.device("meta"):
        model = EntropyModel(get_preset("entropy-100m"))
    per_block = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert _count(model) == 14 * per_block + 2 * 260 * 768 + 768
    assert _count(model) == pytest.approx(99.5e6, rel=5e-3)  # ±0.5%: spec rounds to 3 digits


def test_blt_1b_has_no_global_projection_and_released_shapes():
    cfg = get_preset("blt-1b")
    assert not cfg.has_global_projection
    assert cfg.encoder.ffn_dim == 2816
    assert cfg.global_transformer.ffn_dim == 5632
    assert cfg.entropy_model.ffn_dim == 2048
    assert cfg.entropy_model.rope_theta == 10000.0
    assert cfg.patcher.threshold == 1.335442066192627


# ------------------------------------------------------------------------------------------
# invalid configs


def test_encoder_decoder_dim_mismatch():
    cfg = tiny()
    with pytest.raises(ValueError, match=r"decoder\.dim"):
        dataclasses.replace(cfg, decoder=LocalDecoderConfig(dim=64, n_layers=2, n_heads=4))


def test_entropy_mode_needs_entropy_model():
    with pytest.raises(ValueError, match="entropy_model"):
        dataclasses.replace(tiny(), entropy_model=None)


def test_static_mode_needs_integer_patch_size():
    with pytest.raises(ValueError, match="integer patch_size"):
        PatcherConfig(mode="static", patch_size=4.5)
    assert PatcherConfig(mode="static", patch_size=4.0).patch_size == 4.0


@pytest.mark.parametrize("mode", ["topk", "bpe", "", "Entropy"])
def test_unknown_patching_mode(mode):
    with pytest.raises(ValueError, match="not one of"):
        PatcherConfig(mode=mode)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(dim=30, n_layers=1, n_heads=4), "not divisible by n_heads"),
    (dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=3), "not a multiple of n_kv_heads"),
    (dict(dim=24, n_layers=1, n_heads=8), "head_dim must be even"),  # no RoPE pairs
    (dict(dim=32, n_layers=1, n_heads=4, cross_attn_n_heads=3), "cross_attn_n_heads"),
    (dict(dim=0, n_layers=1, n_heads=4), "positive"),
])
def test_invalid_stack_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalEncoderConfig(**kwargs)


def test_invalid_entropy_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        dataclasses.replace(tiny(), entropy_model=EntropyModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=256))


def test_from_dict_bad_type_is_value_error():
    d = tiny().to_dict()
    del d["encoder"]["dim"]
    with pytest.raises(ValueError, match=r"missing for LocalEncoderConfig: encoder\.dim"):
        BLTConfig.from_dict(d)
    with pytest.raises(ValueError, match="JSON object"):
        BLTConfig.from_dict([1, 2])


@pytest.mark.parametrize(("path", "value", "match"), [
    ("doc_masks", "false", "doc_masks must be true or false"),  # a string "false" was read as true
    ("patcher.monotonicity", 0, "patcher.monotonicity must be true or false"),
    ("encoder.n_layers", 1.5, "encoder.n_layers must be a whole number"),
    ("encoder.dim", "32", "encoder.dim must be a whole number"),
    ("hash_vocab", None, "hash_vocab must be a whole number"),
    ("hash_sizes", "345", r"hash_sizes must be a list \(each a whole number\)"),
    ("hash_sizes", [3, "4"], r"hash_sizes\[1\] must be a whole number"),
    ("patcher", None, "patcher must be a JSON object"),
    ("patcher", 3, "patcher must be a JSON object"),
    ("patcher.threshold", float("nan"), "patcher.threshold must be a number"),
    ("patcher.mode", 1, "patcher.mode must be a string"),
])
def test_from_dict_checks_each_value_against_its_field(path, value, match):
    """A config read from JSON is checked field by field against the dataclasses' types, naming
    the key: before, a string "false" for a bool counted as true, and 1.5 layers, a null section
    or a string size failed later with a TypeError or AttributeError that named nothing."""
    d = tiny().to_dict()
    *parents, last = path.split(".")
    inner = d
    for k in parents:
        inner = inner[k]
    inner[last] = value
    with pytest.raises(ValueError, match=match):
        BLTConfig.from_dict(d)


def test_from_dict_takes_whole_floats_as_ints():
    d = tiny().to_dict()
    d["encoder"]["n_layers"] = 2.0
    d["patcher"]["threshold"] = 1  # an int where a float belongs
    cfg = BLTConfig.from_dict(d)
    assert cfg.encoder.n_layers == 2
    assert isinstance(cfg.encoder.n_layers, int)
    assert isinstance(cfg.patcher.threshold, float)


def test_overrides_rederive_derived_fields():
    """Changing dim/n_heads re-derives kv heads and the FFN width unless they were set apart."""
    from bltkit.config import apply_overrides, ffn_width
    from bltkit.presets import small, tiny

    cfg = apply_overrides(small(), ["global_transformer.dim=384", "global_transformer.n_heads=6"])
    assert cfg.global_transformer.n_kv_heads == 6
    assert cfg.global_transformer.ffn_dim == ffn_width(384)
    kept = apply_overrides(tiny(), ["encoder.dim=64", "decoder.dim=64"])  # tiny's FFN 96 is explicit
    assert kept.encoder.ffn_dim == 96
    assert apply_overrides(tiny(), ["encoder.n_kv_heads=2"]).encoder.n_kv_heads == 2


def test_typed_fields_take_what_the_dataclasses_take():
    """The JSON type checks accept what the config classes themselves accept: one path where a list
    belongs (DataConfig takes a lone path), paths as os.PathLike from Python. Numbers past a float's
    range: a whole number where an int belongs is that int (the check read it as a float first:
    OverflowError), where a float belongs a config error, not an OverflowError; JSON's 1e400 (inf)
    is no whole number."""
    from pathlib import Path

    from bltkit.data import DataConfig

    assert from_dict(DataConfig, {"paths": "corpus.txt"}).paths == ["corpus.txt"]
    assert apply_overrides(DataConfig(paths=[Path("a")]), ["seed=1"]).paths == ["a"]
    with pytest.raises(ValueError, match="config key seed must be a whole number"):
        from_dict(DataConfig, {"seed": 1e400})
    huge = json.loads("1" + "0" * 400)
    assert from_dict(DataConfig, {"paths": "c.txt", "seed": huge}).seed == huge
    with pytest.raises(ValueError, match="config key val_fraction"):
        from_dict(DataConfig, {"paths": "c.txt", "val_fraction": huge})
