"""bltkit model directories (style §7): round trip, atomic writes, and one clear CheckpointError
for every kind of broken directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bltkit.bytes import encode
from bltkit.checkpoint import (
    CONFIG,
    ENTROPY_DIR,
    SUMS,
    WEIGHTS,
    CheckpointError,
    atomic_dir,
    file_sha256,
    init_model,
    load_entropy_model,
    load_model,
    read_config,
    save_model,
)
from bltkit.model import BLT, EntropyModel
from bltkit.presets import entropy_tiny

X = torch.tensor([encode("Checkpoints keep every tensor, bit for bit: ünïcödé.")])


@pytest.fixture
def saved(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "model")
    return path, tiny_model


def _logits(model, x=X):
    with torch.no_grad():
        return model(x)


def test_round_trip(saved):
    path, model = saved
    assert (path / CONFIG).is_file()
    assert (path / WEIGHTS).is_file()
    assert (path / ENTROPY_DIR / CONFIG).is_file()
    assert (path / ENTROPY_DIR / WEIGHTS).is_file()
    # the BLT file holds no entropy-model tensor: those live in entropy_model/
    assert not any(k.startswith("entropy_model.") for k in load_file(str(path / WEIGHTS)))
    loaded = load_model(path)
    assert isinstance(loaded, BLT)
    assert not loaded.training
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(_logits(loaded), _logits(model))
    assert not any(p.requires_grad for p in loaded.entropy_model.parameters())


def test_config_json_payload(saved):
    path, model = saved
    d = json.loads((path / CONFIG).read_text())
    assert d["format"] == "bltkit"
    assert d["kind"] == "blt"
    assert d["config_version"] >= 1
    assert json.loads((path / ENTROPY_DIR / CONFIG).read_text())["kind"] == "entropy_model"
    assert read_config(path) == model.config


def test_load_bfloat16(saved):
    path, model = saved
    loaded = load_model(path, dtype=torch.bfloat16)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, model.state_dict()[k].to(torch.bfloat16)), k  # a plain cast
    out = _logits(loaded)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_save_bfloat16_and_reload(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_model(path)
    assert all(v.dtype == torch.bfloat16 for v in loaded.state_dict().values())
    assert torch.isfinite(_logits(loaded)).all()


def test_entropy_model_alone(tmp_path, saved):
    path, model = saved
    ent = load_entropy_model(path)  # from a BLT directory's entropy_model/
    assert isinstance(ent, EntropyModel)
    assert all(torch.equal(v, model.entropy_model.state_dict()[k]) for k, v in ent.state_dict().items())
    solo = save_model(init_model(entropy_tiny(), seed=3), tmp_path / "ent")
    assert isinstance(load_model(solo), EntropyModel)
    assert isinstance(load_entropy_model(solo), EntropyModel)


def test_save_replaces_existing(tmp_path, tiny_model, make_tiny_model):
    path = save_model(tiny_model, tmp_path / "m")
    other = make_tiny_model(seed=5)
    save_model(other, path)
    assert torch.equal(_logits(load_model(path)), _logits(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .tmp / .old left behind


# ------------------------------------------------------------------------------------------
# atomicity


def test_atomic_dir_failure_keeps_previous(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")

    def write_then_fail():
        with atomic_dir(target) as tmp:
            (tmp / "keep.txt").write_text("new")
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()
    assert (target / "keep.txt").read_text() == "old"
    assert not (target / "half.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left


def test_atomic_dir_failure_without_previous(tmp_path):
    target = tmp_path / "new"

    def write_then_fail():
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
            raise KeyError("x")

    with pytest.raises(KeyError):
        write_then_fail()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_success_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        assert tmp != target
        assert tmp.parent == target.parent
        (tmp / "fresh.txt").write_text("fresh")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writers_refuse_to_delete_what_is_not_theirs(tmp_path, tiny_model, monkeypatch):
    """A model written over a folder that holds other files (notes, a dataset) or over a file
    replaced them silently (the folder is swapped whole); now each writer refuses before it
    writes, naming what would be lost, and leaves everything as it was. A model's own folder is
    still replaced (re-saving, converting onto itself), and '.' (the current directory, which
    cannot be swapped) is refused without leaving a temporary folder behind."""
    from bltkit.convert.hf import export_hf
    from bltkit.convert.meta import export_meta

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    afile = tmp_path / "afile"
    afile.write_text("also precious")
    for write in (lambda p: save_model(tiny_model, p), lambda p: export_hf(tiny_model, p),
                  lambda p: export_meta(tiny_model, p, layout="hub")):
        with pytest.raises(CheckpointError, match=r"notes\.txt"):
            write(keep)
        with pytest.raises(CheckpointError, match="is a file"):
            write(afile)
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    assert afile.read_text() == "also precious"
    model_dir = save_model(tiny_model, tmp_path / "m")
    save_model(tiny_model, model_dir)  # its own files: replaced
    export_meta(tiny_model, tmp_path / "meta", layout="hub")
    export_meta(tiny_model, tmp_path / "meta", layout="consolidated")  # another layout's files: replaced
    monkeypatch.chdir(tmp_path / "m")
    before = sorted(p.name for p in tmp_path.iterdir())
    for here in (".", "..", ""):
        with pytest.raises(CheckpointError, match="current directory"):
            save_model(tiny_model, here)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_weights_are_readable_as_the_umask_allows(tmp_path, tiny_model):
    """safetensors 0.8 writes its files 0600; a model folder's weights get the mode its other files
    get (shared model folders were unreadable to other users), in every layout."""
    import os
    import stat

    from bltkit.convert.hf import export_hf
    from bltkit.convert.meta import export_meta

    umask = os.umask(0o022)
    try:
        for out in (save_model(tiny_model, tmp_path / "n"), export_hf(tiny_model, tmp_path / "h"),
                    export_meta(tiny_model, tmp_path / "m", layout="hub")):
            for f in out.rglob("*.safetensors"):
                assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    finally:
        os.umask(umask)


def test_save_model_failure_keeps_previous(tmp_path, tiny_model, monkeypatch):
    path = save_model(tiny_model, tmp_path / "m")
    before = (path / WEIGHTS).read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("bltkit.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model, path)
    assert (path / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ------------------------------------------------------------------------------------------
# broken directories


def _edit_config(path, fn, sub: str = ""):
    f = path / sub / CONFIG if sub else path / CONFIG
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")


def test_missing_config(saved):
    path, _ = saved
    (path / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(path)


def test_invalid_json(saved):
    path, _ = saved
    (path / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path)


def test_unknown_config_key(saved):
    path, _ = saved
    _edit_config(path, lambda d: d["encoder"].update(n_layer=1))
    with pytest.raises(CheckpointError, match=r"n_layer.*did you mean 'n_layers'"):
        load_model(path)
    _edit_config(path, lambda d: (d["encoder"].pop("n_layer"), d.update(hash_vocabulary=3)))
    with pytest.raises(CheckpointError, match="hash_vocabulary"):
        load_model(path)


def test_transformers_config_suggests_convert(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / CONFIG).write_text(json.dumps({"model_type": "blt", "architectures": ["BltForCausalLM"]}))
    with pytest.raises(CheckpointError, match="blt convert"):
        load_model(d)


def test_meta_hub_config_suggests_convert(tmp_path):
    d = tmp_path / "meta"
    d.mkdir()
    (d / CONFIG).write_text(json.dumps({"args": {"dim": 512}}))
    with pytest.raises(CheckpointError, match="blt convert"):
        load_model(d)


def test_newer_config_version(saved):
    path, _ = saved
    _edit_config(path, lambda d: d.update(config_version=99))
    with pytest.raises(CheckpointError, match="upgrade bltkit"):
        load_model(path)


def test_malformed_config_json_says_what(saved):
    """A config that is a list, a config_version that is a string, an unknown kind and a value of
    the wrong type: each a CheckpointError naming the file (they were an AttributeError, a
    TypeError, a read as an entropy model with twelve unknown keys, and a bool taken from "false")."""
    path, _ = saved
    (path / CONFIG).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list"):
        load_model(path)
    for change, match in (({"config_version": "1"}, "config_version must be a whole number"),
                          ({"config_version": 0}, "unknown config_version 0"),
                          ({"kind": "weird"}, "unknown kind 'weird'"),
                          ({"doc_masks": "false"}, "doc_masks must be true or false")):
        (path / CONFIG).write_text(json.dumps({**_config_payload_of(saved), **change}))
        with pytest.raises(CheckpointError, match=match) as e:
            load_model(path)
        assert str(path / CONFIG) in str(e.value)


def _config_payload_of(saved) -> dict:
    from bltkit.checkpoint import _config_payload

    return _config_payload(saved[1].config)


def test_missing_weights(saved):
    path, _ = saved
    (path / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(path)


def test_truncated_weights(saved):
    path, _ = saved
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(path)


def test_garbage_weights(saved):
    path, _ = saved
    (path / WEIGHTS).write_bytes(b"\x07" * 64)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(path)


def _write_sums(path):
    files = sorted(p for p in path.rglob("*") if p.is_file())
    (path / SUMS).write_text("".join(f"{file_sha256(p)}  {p.relative_to(path)}\n" for p in files))


def test_sha256sums_checked_when_present(saved):
    path, model = saved
    _write_sums(path)
    torch.testing.assert_close(_logits(load_model(path)), _logits(model), rtol=0, atol=0)
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-1] ^= 1  # one flipped bit in a weight: safetensors still parses it, the sum does not match
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its sha256"):
        load_model(path)


def test_sha256sums_missing_file_and_bad_line(saved):
    path, _ = saved
    _write_sums(path)
    (path / SUMS).write_text((path / SUMS).read_text() + f"{'0' * 64}  notes.txt\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt is listed in .*SHA256SUMS but missing"):
        load_model(path)
    (path / SUMS).write_text("not a sum line\n")
    with pytest.raises(CheckpointError, match="line 1 is not"):
        load_model(path)


def _rewrite_weights(path, fn):
    state = load_file(str(path / WEIGHTS))
    fn(state)
    save_file(state, str(path / WEIGHTS))


def test_wrong_shape(saved):
    path, _ = saved
    key = "local_encoder.tok_embeddings.weight"
    _rewrite_weights(path, lambda s: s.update({key: torch.zeros(260, 16)}))
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {key}: file \(260, 16\) vs config \(260, 32\)"):
        load_model(path)


def test_missing_tensor(saved):
    path, _ = saved
    key = "local_decoder.norm.weight"
    _rewrite_weights(path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {key}"):
        load_model(path)


def test_unexpected_tensor(saved):
    path, _ = saved
    _rewrite_weights(path, lambda s: s.update({"local_decoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): local_decoder\.extra\.weight"):
        load_model(path)


def test_entropy_config_disagrees(saved):
    path, _ = saved
    _edit_config(path, lambda d: d.update(window=256), sub=ENTROPY_DIR)
    with pytest.raises(CheckpointError, match="does not match the entropy_model section"):
        load_model(path)


def test_entropy_dir_missing(saved):
    path, _ = saved
    for f in (path / ENTROPY_DIR).iterdir():
        f.unlink()
    (path / ENTROPY_DIR).rmdir()
    with pytest.raises(CheckpointError, match="entropy_model"):
        load_model(path)


def test_entropy_weights_wrong_shape(saved):
    path, _ = saved
    f = path / ENTROPY_DIR / WEIGHTS
    state = load_file(str(f))
    state["output.weight"] = torch.zeros(260, 8)
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"entropy_model.*output\.weight"):
        load_model(path)


def test_wrong_dtypes_are_named_or_made_one(saved):
    """An integer weight (which cannot be a parameter: a raw traceback in blt convert before) is
    refused at load time, by name; one bf16 weight among fp32 ones (which loaded, then failed in
    the first matrix product) is widened back to fp32, exactly: the model loads and runs."""
    path, model = saved
    key = "local_decoder.norm.weight"
    _rewrite_weights(path, lambda s: s.update({key: s[key].long()}))
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) not floating point: {key} \(torch\.int64\)"):
        load_model(path)
    _rewrite_weights(path, lambda s: s.update({key: s[key].bfloat16()}))
    loaded = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key].bfloat16().float())
    loaded(X)


def test_bad_device_is_not_blamed_on_the_file(saved, monkeypatch):
    path, _ = saved
    with pytest.raises(ValueError, match="device 'tpu' is not a torch device") as e:
        load_model(path, device="tpu")
    assert not isinstance(e.value, CheckpointError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here"):
        load_model(path, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available here"):
        load_entropy_model(path, device="cuda:1")


def test_a_mistyped_local_path_is_not_fetched_from_the_hub(tmp_path, monkeypatch):
    """`runs/exp1/fnal` where runs/ exists is a missing local folder, never a hub repository id
    (bltkit.hub.resolve would otherwise ask the network for the repository runs/exp1), and the
    error says why it was not fetched; an existing folder is itself."""
    from bltkit import hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # (no network asked: the import fails)
    (tmp_path / "runs" / "exp1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"runs/exp1/fnal does not exist.*because runs/ exists"):
        hub.resolve("runs/exp1/fnal")
    assert hub.resolve("runs/exp1") == Path("runs/exp1")
    with pytest.raises(ValueError, match="Hugging Face hub"):  # an id whose first folder is not here is one
        hub.resolve("someorg/somemodel")
