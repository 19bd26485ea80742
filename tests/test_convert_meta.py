"""Meta layouts -> bltkit (spec §11): synthetic checkpoints with the released key names.

The Meta-layout files are written here by a small writer of our own (not `export_meta`), so the
importer is tested independently of the exporter. No real weights, no network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bltkit import presets
from bltkit.bytes import encode
from bltkit.checkpoint import CheckpointError, init_model
from bltkit.convert.meta import (
    config_from_meta_args,
    entropy_config_from_meta_args,
    export_meta,
    import_meta,
    import_meta_entropy,
)
from bltkit.model import BLT, EntropyModel

TEXT = "Daenerys Targaryen is in Game of Thrones, a fantasy epic by George R.R. Martin — café, 東京."
TOKENS = torch.tensor([encode(TEXT)])  # BOS + bytes + 4, no EOS
N = TOKENS.shape[1]
LENGTHS = torch.tensor([[1] + [4] * ((N - 1) // 4) + ([(N - 1) % 4] if (N - 1) % 4 else [])])

# Hand-written Meta args for presets.tiny() (ByteLatentTransformerArgs field names).
TINY_ARGS = {
    "dim": 512, "n_layers": 8, "n_heads": 8,  # top-level leftovers: must never be read (spec §16.19)
    "seed": 42, "vocab_size": 260, "dim_local_encoder": 32, "n_layers_local_encoder": 1, "n_heads_local_encoder": 4,
    "dim_global": 64, "n_layers_global": 2, "n_heads_global": 4, "dim_local_decoder": 32,
    "n_layers_local_decoder": 2, "n_heads_local_decoder": 4, "n_kv_heads": None, "n_kv_heads_global": None,
    "ffn_dim_multiplier": 0.9, "multiple_of": 32,  # Meta's width rule: 32 -> 96, 64 -> 160
    "norm_eps": 1e-5, "rope_theta": 500000.0, "max_seqlen": 4096, "max_encoder_seq_length": 24576,
    "local_attention_window_len": 512, "cross_attn_encoder": True, "cross_attn_decoder": True,
    "cross_attn_init_by_pooling": True, "use_local_encoder_transformer": True, "downsampling_by_pooling": "max",
    "cross_attn_window_encoder": None, "cross_attn_window_decoder": None, "cross_attn_k": 2, "cross_attn_nheads": 4,
    "cross_attn_all_layers_encoder": False, "cross_attn_all_layers_decoder": True,
    "encoder_hash_byte_group_size": [3, 4, 5, 6, 7, 8], "encoder_hash_byte_group_vocab": 101,
    "encoder_hash_byte_group_nb_functions": 2, "attn_bias_type": "block_causal", "attn_impl": "xformers",
    "patch_in_forward": True, "patching_mode": "entropy", "patch_size": 4.5, "patching_threshold": None,
    "dropout": 0.0, "init_std_factor": "current_depth", "max_length": 256, "eos_id": 2,
}
TINY_ENTROPY = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 260, "max_seqlen": 8192,
                "ffn_dim_multiplier": 0.75, "multiple_of": 32, "rope_theta": 10000.0, "sliding_window": 512,
                "norm_eps": 1e-5, "attn_bias_type": "local_block_causal", "attn_impl": "xformers", "seed": 42}
TINY_PATCHER = {"patching_mode": "entropy", "threshold": 1.335442066192627, "threshold_add": None,
                "monotonicity": False, "max_patch_length": None, "patch_size": 4, "patching_batch_size": 1,
                "realtime_patching": True, "patching_device": "cuda"}
LEFTOVER_ENTROPY = {"dim": 512, "n_layers": 8, "n_heads": 8, "vocab_size": -1, "max_seqlen": 1024}


@pytest.fixture(scope="module")
def model() -> BLT:
    m = init_model(presets.tiny(), seed=3)
    with torch.no_grad():
        m.entropy_model.output.weight.mul_(8.0)  # entropies around the threshold (spec §15.3)
    return m


# -- our own writer of Meta's layouts -----------------------------------------------------------


def meta_states(m: BLT) -> tuple[dict, dict]:
    """(BLT, entropy) state dicts under Meta's released key names (spec §11.2): one hash table per
    (function, size), `encoder_hash_tok_embedding.{n}.weight`, entropy keys without a prefix."""
    blt = {k: v.detach().clone() for k, v in m.state_dict().items() if not k.startswith("entropy_model.")}
    fused, V = blt.pop("encoder_hash_tok_embedding.weight"), m.config.hash_vocab
    for n in range(fused.shape[0] // V):
        blt[f"encoder_hash_tok_embedding.{n}.weight"] = fused[n * V:(n + 1) * V].clone()
    ent = {k.removeprefix("entropy_model."): v.detach().clone() for k, v in m.state_dict().items()
           if k.startswith("entropy_model.")}
    return blt, ent


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_entropy_consolidated(folder: Path, ent: dict, rope: bool = False) -> None:
    write_json(folder / "params.json", {"entropy_model": TINY_ENTROPY, "data": {"patcher_args": TINY_PATCHER}})
    if rope:  # consolidated_with_rope-style extra buffer (facebookresearch/blt#133)
        ent = {**ent, "rope.freqs_cis": torch.zeros(8, 4, 2, 2)}
    torch.save({"model": ent, "optim": {}}, folder / "consolidated.pth")


def write_consolidated(root: Path, m: BLT) -> Path:
    """facebook/blt style: root/blt_tiny/ and a sibling root/entropy_model/."""
    blt, ent = meta_states(m)
    write_json(root / "blt_tiny" / "params.json", {
        "model": TINY_ARGS, "entropy_model": LEFTOVER_ENTROPY, "data": {"patcher_args": TINY_PATCHER},
        "distributed": {"model_dtype": "bf16"}, "dump_dir": "/checkpoint/x"})
    torch.save({"model": blt}, root / "blt_tiny" / "consolidated.pth")
    write_entropy_consolidated(root / "entropy_model", ent, rope=True)
    return root / "blt_tiny"


def write_hub(root: Path, m: BLT) -> Path:
    """facebook/blt-1b style: config.json {"args"} + model.safetensors + train_args.json + entropy_model/."""
    blt, ent = meta_states(m)
    write_json(root / "config.json", {"args": TINY_ARGS})
    write_json(root / "train_args.json", {"model": TINY_ARGS, "data": {"patcher_args": TINY_PATCHER}})
    save_file(blt, str(root / "model.safetensors"))
    write_entropy_consolidated(root / "entropy_model", ent)
    return root


def assert_same_model(a: BLT | EntropyModel, b: BLT | EntropyModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert a.config == b.config
    with torch.no_grad():
        assert torch.equal(a(TOKENS), b(TOKENS))  # the entropy model, or the BLT with its own patcher
        if isinstance(a, BLT):
            assert torch.equal(a(TOKENS, LENGTHS), b(TOKENS, LENGTHS))


# -- import ------------------------------------------------------------------------------------


def test_config_from_hand_written_args():
    assert config_from_meta_args(TINY_ARGS, TINY_PATCHER, TINY_ENTROPY) == presets.tiny()
    assert entropy_config_from_meta_args(TINY_ENTROPY) == presets.entropy_tiny()


@pytest.mark.parametrize("writer", [write_consolidated, write_hub])
def test_import_layouts(tmp_path, model, writer):
    loaded = import_meta(writer(tmp_path, model))
    assert isinstance(loaded, BLT)
    assert not loaded.training
    assert_same_model(loaded, model)


def test_import_entropy_hub_repo(tmp_path, model):
    """facebook/blt-entropy: config.json {"args": entropy args} + model.safetensors."""
    _, ent = meta_states(model)
    write_json(tmp_path / "config.json", {"args": TINY_ENTROPY})
    save_file(ent, str(tmp_path / "model.safetensors"))
    for loaded in (import_meta(tmp_path), import_meta_entropy(tmp_path)):
        assert isinstance(loaded, EntropyModel)
        assert_same_model(loaded, model.entropy_model)


def test_entropy_dir_argument(tmp_path, model):
    src = write_consolidated(tmp_path, model)
    moved = tmp_path / "elsewhere"
    (tmp_path / "entropy_model").rename(moved)
    with pytest.raises(CheckpointError, match=r"entropy model.*--entropy-model DIR.*entropy_dir="):
        import_meta(src)
    assert_same_model(import_meta(src, entropy_dir=moved), model)
    assert_same_model(import_meta_entropy(moved), model.entropy_model)


def test_import_by_hub_repository_id(model, hub_cache):
    """A source that is no local path and reads as a hub id is taken from huggingface_hub's cache
    (offline here): facebook/blt-1b's layout by its id, facebook/blt's by id and folder (the
    entropy model beside it); a repository neither local nor cached says so and what to do."""
    write_hub(hub_cache("fakeorg/blt-tiny"), model)
    assert_same_model(import_meta("fakeorg/blt-tiny"), model)
    write_consolidated(hub_cache("fakeorg/blt"), model)
    assert_same_model(import_meta("fakeorg/blt/blt_tiny"), model)
    assert_same_model(import_meta_entropy("fakeorg/blt/entropy_model"), model.entropy_model)
    with pytest.raises(ValueError, match=r"neither a local path nor a hub repository.*huggingface-cli download"):
        import_meta("fakeorg/absent")
    with pytest.raises(ValueError, match="has no folder blt_huge"):
        import_meta("fakeorg/blt/blt_huge")


@pytest.mark.parametrize("layout", ["consolidated", "hub"])
def test_export_import_roundtrip(tmp_path, model, layout):
    out = export_meta(model, tmp_path / "meta", layout=layout)
    weights = "consolidated.pth" if layout == "consolidated" else "model.safetensors"
    assert (out / weights).is_file()
    assert (out / "entropy_model" / "consolidated.pth").is_file()
    if layout == "hub":
        state = load_file(str(out / "model.safetensors"))
        assert json.loads((out / "config.json").read_text())["args"]["dim_global"] == 64
        assert (out / "train_args.json").is_file()
    else:
        state = torch.load(out / weights, weights_only=True)["model"]
    assert {f"encoder_hash_tok_embedding.{n}.weight" for n in range(12)} <= state.keys()
    assert "encoder_hash_tok_embedding.weight" not in state
    assert_same_model(import_meta(out), model)
    ent_out = export_meta(model.entropy_model, tmp_path / "ent", layout=layout)
    assert_same_model(import_meta(ent_out), model.entropy_model)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("local_decoder.norm.weight"), r"missing 1 tensor\(s\): local_decoder\.norm\.weight"),
    (lambda s: s.pop("encoder_hash_tok_embedding.11.weight"),
     r"missing 1 tensor\(s\): encoder_hash_tok_embedding\.11\.weight"),
    (lambda s: s.update({"local_encoder.extra.weight": torch.zeros(2)}),
     r"unexpected 1 tensor\(s\): local_encoder\.extra\.weight"),
    (lambda s: s.update({"encoder_hash_tok_embedding.3.weight": torch.zeros(100, 32)}),
     r"shape mismatch: encoder_hash_tok_embedding\.3\.weight: file \(100, 32\) vs config \(101, 32\)"),
])
def test_bad_weights(tmp_path, model, edit, message):
    src = write_hub(tmp_path, model)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        import_meta(src)


def test_bad_entropy_weights(tmp_path, model):
    src = write_consolidated(tmp_path, model)
    _, ent = meta_states(model)
    ent["layers.0.attention.wq.weight"] = torch.zeros(32, 16)
    torch.save({"model": ent}, tmp_path / "entropy_model" / "consolidated.pth")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wq\.weight: file \(32, 16\) vs config \(32, 32\)"):
        import_meta(src)


def test_leftover_only_config():
    with pytest.raises(ValueError, match=r"miss dim_local_encoder.*only the top-level leftovers dim, n_layers, n_heads"):
        config_from_meta_args({"dim": 512, "n_layers": 8, "n_heads": 8, "vocab_size": 260}, TINY_PATCHER, TINY_ENTROPY)


def test_unknown_args_key():
    args = {**TINY_ARGS, "dim_local_encodr": 64}
    with pytest.raises(ValueError, match=r"unknown model args field.*dim_local_encodr.*allow_unknown"):
        config_from_meta_args(args, TINY_PATCHER, TINY_ENTROPY)
    assert config_from_meta_args(args, TINY_PATCHER, TINY_ENTROPY, allow_unknown=True) == presets.tiny()
    with pytest.raises(ValueError, match=r"unknown patcher args field.*thresh"):
        config_from_meta_args(TINY_ARGS, {**TINY_PATCHER, "thresh": 1.0}, TINY_ENTROPY)
    with pytest.raises(ValueError, match=r"unknown entropy model args field.*n_layer\b"):
        entropy_config_from_meta_args({**TINY_ENTROPY, "n_layer": 3})


@pytest.mark.parametrize(("model_edit", "patcher_edit", "entropy", "message"), [
    ({}, {"patching_mode": "bpe"}, TINY_ENTROPY, "patching_mode 'bpe' is not supported"),
    ({}, {"threshold": None}, TINY_ENTROPY, "top-k"),
    ({"downsampling_by_pooling": "avg"}, {}, TINY_ENTROPY, "downsampling_by_pooling='avg' is not supported"),
    ({"cross_attn_window_encoder": 8}, {}, TINY_ENTROPY, "cross_attn_window_encoder=8 is not supported"),
    ({"cross_attn_encoder": None}, {}, TINY_ENTROPY, "cross_attn_encoder"),
    ({"head_dim": 16}, {}, TINY_ENTROPY, "head_dim=16"),
    ({"dim_global": 32}, {}, TINY_ENTROPY, "no patch projection"),
    ({"encoder_hash_byte_group_vocab": None}, {}, TINY_ENTROPY, "explicit encoder_hash_byte_group_vocab"),
    ({}, {}, None, "needs the entropy model's args"),
    ({}, {}, {**TINY_ENTROPY, "weight_tying": True}, "weight_tying"),
])
def test_unsupported_values(model_edit, patcher_edit, entropy, message):
    args = {k: v for k, v in {**TINY_ARGS, **model_edit}.items() if v is not None or k not in model_edit}
    with pytest.raises(ValueError, match=message):
        config_from_meta_args(args, {**TINY_PATCHER, **patcher_edit}, entropy)


def test_export_refuses_what_meta_cannot_express(tmp_path):
    import dataclasses

    cfg = presets.tiny()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, window=64))
    with pytest.raises(ValueError, match=r"decoder\.window=64"):
        export_meta(init_model(cfg, seed=0), tmp_path / "x")


# -- released shapes (spec §10.1), on the meta device only ---------------------------------------

BLT_1B_ARGS = {
    "dim": 512, "n_layers": 8, "n_heads": 8, "max_length": 256,  # leftovers in the released dump
    "vocab_size": 260, "dim_local_encoder": 1024, "n_layers_local_encoder": 1, "n_heads_local_encoder": 16,
    "dim_global": 2048, "n_layers_global": 25, "n_heads_global": 16, "dim_local_decoder": 1024,
    "n_layers_local_decoder": 9, "n_heads_local_decoder": 16, "n_kv_heads": None, "n_kv_heads_global": None,
    "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_k": 2, "cross_attn_nheads": 16,
    "cross_attn_all_layers_encoder": False, "cross_attn_all_layers_decoder": True,
    "cross_attn_init_by_pooling": True, "cross_attn_window_encoder": None, "cross_attn_window_decoder": None,
    "use_local_encoder_transformer": True, "downsampling_by_pooling": "max",
    "encoder_hash_byte_group_size": [3, 4, 5, 6, 7, 8], "encoder_hash_byte_group_vocab": 500002,
    "encoder_hash_byte_group_nb_functions": 1, "rope_theta": 500000.0, "norm_eps": 1e-5, "max_seqlen": 4096,
    "max_encoder_seq_length": 24576, "local_attention_window_len": 512, "ffn_dim_multiplier": 1.0,
    "multiple_of": 256, "attn_bias_type": "block_causal", "patch_size": 4.5, "patching_mode": "entropy",
    "patching_threshold": 1.335442066192627, "monotonicity": False, "dropout": 0.0, "weight_tying": False,
}
ENTROPY_100M_ARGS = {"dim": 768, "n_layers": 14, "n_heads": 12, "max_seqlen": 8192, "vocab_size": 260,
                     "ffn_dim_multiplier": 1.0, "rope_theta": 10000.0, "sliding_window": 512,
                     "attn_bias_type": "local_block_causal"}
PATCHER_DEFAULTS = {"patching_mode": "entropy", "threshold": 1.335442066192627, "threshold_add": None,
                    "monotonicity": False, "max_patch_length": None, "patch_size": 4.5}


def _meta_keys(m: BLT) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.blt_state_dict().items()}


def test_blt_1b_preset_matches_meta_args():
    cfg = config_from_meta_args(BLT_1B_ARGS, PATCHER_DEFAULTS, ENTROPY_100M_ARGS)
    assert cfg == presets.blt_1b()
    # the patcher falls back to the model args' patching_* fields without data.patcher_args
    assert config_from_meta_args(BLT_1B_ARGS, None, ENTROPY_100M_ARGS) == cfg
    with torch.device("meta"):
        keys = _meta_keys(BLT(cfg))
    assert "global_transformer.token_embedding_projection.weight" not in keys  # 2*1024 == 2048
    assert keys["local_encoder.layers.0.feed_forward.w1.weight"] == (2816, 1024)
    assert keys["global_transformer.layers.24.feed_forward.w2.weight"] == (2048, 5632)
    assert keys["local_decoder.patch_embedding_projection.weight"] == (2048, 2048)
    assert keys["encoder_hash_tok_embedding.weight"] == (6 * 500002, 1024)
    assert sum(k.startswith("local_decoder.cross_attn_layers.") for k in keys) == 9 * 6
    assert sum(k.startswith("local_encoder.cross_attn_layers.") for k in keys) == 6


def test_blt_7b_gets_the_global_projection():
    args = {**BLT_1B_ARGS, "dim_local_encoder": 1280, "n_heads_local_encoder": 20, "dim_global": 4096,
            "n_layers_global": 32, "n_heads_global": 32, "dim_local_decoder": 1280, "n_heads_local_decoder": 20,
            "n_layers_local_decoder": 6, "cross_attn_k": 4, "cross_attn_nheads": 20}
    cfg = config_from_meta_args(args, PATCHER_DEFAULTS, ENTROPY_100M_ARGS)
    assert cfg == presets.blt_7b()
    assert cfg.has_global_projection
    with torch.device("meta"):
        keys = _meta_keys(BLT(cfg))
    assert keys["global_transformer.token_embedding_projection.weight"] == (4096, 5120)
    assert keys["global_transformer.layers.0.feed_forward.w1.weight"] == (11008, 4096)
    assert keys["local_decoder.layers.0.feed_forward.w1.weight"] == (3584, 1280)


# -- independent check of the Meta layout against transformers (spec §11.3-11.4, §15) -----------

# transformers 5.23.0 does not ship convert_blt_weights_to_hf.py, so the Meta -> transformers
# conversion is re-derived here from the spec §11.3 table, independently of bltkit.convert.
_HF_RENAMES = [(".attention.", ".self_attn."), (".feed_forward.", ".mlp."), (".attention_norm.", ".input_layernorm."),
               (".ffn_norm.", ".post_attention_layernorm."), (".tok_embeddings.", ".embed_tokens."),
               (".output.", ".lm_head."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."),
               (".wq.", ".q_proj."), (".wk.", ".k_proj."), (".wv.", ".v_proj."), (".wo.", ".o_proj."),
               (".cross_attn_norm_q.", ".q_norm."), (".cross_attn_norm_kv.", ".k_norm.")]


def _hf_key(key: str) -> str:
    if key == "local_decoder.output.weight":
        return "lm_head.weight"
    for old, new in _HF_RENAMES:
        key = key.replace(old, new)
    return "model." + key


def meta_to_hf_state(blt: dict, ent: dict) -> dict:
    n_tables = sum(k.startswith("encoder_hash_tok_embedding.") for k in blt)
    out = {_hf_key(k): v for k, v in blt.items() if not k.startswith("encoder_hash_tok_embedding.")}
    out.update({_hf_key("patcher." + k): v for k, v in ent.items()})
    out["model.encoder_hash_tok_embedding.weight"] = torch.cat(
        [blt[f"encoder_hash_tok_embedding.{n}.weight"] for n in range(n_tables)])
    return out


def hf_config_from_meta(a: dict, e: dict, p: dict):
    from transformers import BltConfig

    def width(dim: int, mult: float, multiple_of: int) -> int:  # spec §6.6
        return multiple_of * math.ceil(int(mult * int(8 * dim / 3)) / multiple_of)

    mult, mo, rope = a["ffn_dim_multiplier"], a["multiple_of"], {"rope_type": "default", "rope_theta": a["rope_theta"]}

    def local(dim: int, heads: int, layers: int, all_layers: bool) -> dict:
        return dict(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=a["n_kv_heads"] or heads,
                    num_hidden_layers=layers, intermediate_size=width(dim, mult, mo), cross_attn_k=a["cross_attn_k"],
                    cross_attn_all_layers=all_layers, hidden_size_global=a["dim_global"], rope_parameters=rope,
                    rms_norm_eps=a["norm_eps"], vocab_size=a["vocab_size"],
                    max_position_embeddings=a["max_encoder_seq_length"])

    return BltConfig(
        vocab_size=a["vocab_size"], max_position_embeddings=a["max_seqlen"], patch_in_forward=True,
        patch_size=int(p["patch_size"]), patching_mode=p["patching_mode"], patching_threshold=p["threshold"],
        patching_batch_size=1, max_patch_length=p["max_patch_length"],
        local_attention_window_len=a["local_attention_window_len"], cross_attn_k=a["cross_attn_k"],
        encoder_hash_byte_group_size=a["encoder_hash_byte_group_size"],
        encoder_hash_byte_group_vocab=a["encoder_hash_byte_group_vocab"],
        encoder_hash_byte_group_nb_functions=a["encoder_hash_byte_group_nb_functions"], tie_word_embeddings=False,
        use_cache=False, rope_parameters=rope,
        encoder_config=local(a["dim_local_encoder"], a["n_heads_local_encoder"], a["n_layers_local_encoder"],
                             a["cross_attn_all_layers_encoder"]),
        decoder_config=local(a["dim_local_decoder"], a["n_heads_local_decoder"], a["n_layers_local_decoder"],
                             a["cross_attn_all_layers_decoder"]),
        global_config=dict(hidden_size=a["dim_global"], num_attention_heads=a["n_heads_global"],
                           num_key_value_heads=a["n_kv_heads_global"] or a["n_heads_global"],
                           num_hidden_layers=a["n_layers_global"],
                           intermediate_size=width(a["dim_global"], mult, mo), rope_parameters=rope,
                           rms_norm_eps=a["norm_eps"], max_position_embeddings=a["max_seqlen"]),
        patcher_config=dict(hidden_size=e["dim"], num_attention_heads=e["n_heads"],
                            num_key_value_heads=e["n_kv_heads"] or e["n_heads"], num_hidden_layers=e["n_layers"],
                            intermediate_size=width(e["dim"], e["ffn_dim_multiplier"], e["multiple_of"]),
                            rope_parameters={"rope_type": "default", "rope_theta": e["rope_theta"]},
                            sliding_window=e["sliding_window"], max_position_embeddings=e["max_seqlen"],
                            vocab_size=e["vocab_size"], rms_norm_eps=e["norm_eps"]),
    )


@pytest.mark.hf
def test_meta_layout_matches_transformers(tmp_path, model):
    pytest.importorskip("transformers")
    from transformers import BltForCausalLM

    torch.set_num_threads(1)
    out = export_meta(model, tmp_path / "meta", layout="hub")
    args = json.loads((out / "config.json").read_text())["args"]
    patcher = json.loads((out / "train_args.json").read_text())["data"]["patcher_args"]
    ent_args = json.loads((out / "entropy_model" / "params.json").read_text())["entropy_model"]
    blt = load_file(str(out / "model.safetensors"))
    ent = torch.load(out / "entropy_model" / "consolidated.pth", weights_only=True)["model"]
    hf = BltForCausalLM(hf_config_from_meta(args, ent_args, patcher)).eval()
    hf.load_state_dict(meta_to_hf_state(blt, ent), strict=True)
    with torch.no_grad():
        H = model.entropy_model.entropies(TOKENS)
        assert (H[:, 1:] - patcher["threshold"]).abs().min() > 1e-3  # robust boundaries (spec §15.3)
        lengths = model.patch(TOKENS)
        assert 2 < lengths.shape[1] < N  # the patcher really groups bytes
        for patch_lengths in (LENGTHS, None):
            ours = model(TOKENS, patch_lengths)
            theirs = hf(input_ids=TOKENS, patch_lengths=patch_lengths, use_cache=False).logits.float()
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
