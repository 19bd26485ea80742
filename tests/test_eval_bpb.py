"""Bits per byte: the definition of spec §12 by hand, the uniform model, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bltkit.bytes import encode
from bltkit.checkpoint import init_model, save_model
from bltkit.data import TokenStream
from bltkit.eval.bpb import bpb_of_stream, default_seq_len, evaluate_bpb
from bltkit.presets import entropy_tiny

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n"


def _by_hand(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Σ CE and target count over non-overlapping windows of seq_len+1, one window at a time."""
    nats, n = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        w = ids[start:start + seq_len + 1]
        x, y = torch.tensor([w[:-1]]), torch.tensor(w[1:])
        with torch.no_grad():
            logits = model(x)[0]
        nats += F.cross_entropy(logits.double(), y, reduction="sum").item()
        n += len(y)
    return nats, n


def test_bpb_of_a_tiny_blt_equals_hand_computation(tmp_path, tiny_model):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT[:40])
    result = evaluate_bpb(tiny_model, [tmp_path / "a.txt", tmp_path / "b.txt"], seq_len=24, batch_size=3)
    for f, text in zip(result["files"], [TEXT, TEXT[:40]], strict=True):
        nats, n = _by_hand(tiny_model, encode(text, eos=True), 24)  # the last window is shorter, unpadded
        assert (f["bytes"], f["targets"], f["documents"]) == (len(text), len(text) + 1, 1)
        assert f["nats"] == pytest.approx(nats, rel=1e-5)
        assert f["bpb"] == pytest.approx(nats / (math.log(2) * n), rel=1e-5)
    o = result["overall"]
    assert o["targets"] == sum(f["targets"] for f in result["files"])
    assert o["bpb"] == pytest.approx(sum(f["bpb"] * f["targets"] for f in result["files"]) / o["targets"])
    assert "BOS and EOS targets count" in result["note"]
    assert result["seq_len"] == 24


@pytest.mark.parametrize(("mode", "expected"), [("byte", 1.0), ("static", None)])
def test_mean_patch_length_per_file(tmp_path, make_tiny_model, mode, expected):
    """Bytes per patch over real positions (BOS included, BOE padding not): 1 in byte mode; with
    static patches of 4 it is what the patcher's own starts give."""
    import dataclasses

    from bltkit.presets import tiny

    cfg = tiny()
    model = make_tiny_model(dataclasses.replace(cfg, patcher=dataclasses.replace(cfg.patcher, mode=mode, patch_size=4)))
    (tmp_path / "a.txt").write_text(TEXT * 3)
    r = evaluate_bpb(model, [tmp_path / "a.txt"], seq_len=64, batch_size=2)["files"][0]
    if expected is None:
        from bltkit.data import BatchLoader

        stream = TokenStream.from_documents([(TEXT * 3).encode()])
        loader = BatchLoader(stream, 1, 64, shuffle=False, drop_last=False)
        real = starts = 0
        for _ in range(loader.batches_per_epoch):  # the same windows, patched one by one
            x = loader.next_batch().tokens[:, :-1]
            keep = x[0] != 0
            real += int(keep.sum())
            starts += int(model.patch_starts(x)[0, :-1][keep].sum())
        expected = real / starts
        assert 3.0 < expected < 4.0
    assert r["mean_patch_len"] == pytest.approx(expected, rel=1e-9)


def test_max_bytes_scores_the_first_bytes(tmp_path, tiny_model):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT[:50])
    capped = evaluate_bpb(tiny_model, [tmp_path / "a.txt"], seq_len=24, max_bytes=50)["files"][0]
    assert capped["bytes"] == 50
    assert capped["bpb"] == pytest.approx(evaluate_bpb(tiny_model, [tmp_path / "b.txt"], seq_len=24)["files"][0]["bpb"])
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        evaluate_bpb(tiny_model, [tmp_path / "a.txt"], max_bytes=0)


def test_uniform_model_gives_log2_260(tmp_path):
    model = init_model(entropy_tiny(), seed=0)
    with torch.no_grad():
        model.output.weight.zero_()
    stream = TokenStream.from_documents([TEXT.encode(), b"second document"])
    r = bpb_of_stream(model, stream, seq_len=32, batch_size=2)
    assert r["targets"] == len(stream) - 1
    assert r["windows"] == math.ceil((len(stream) - 1) / 32)
    assert r["bpb"] == pytest.approx(math.log2(260), rel=1e-6)  # ln 260 rounded to fp32 per target


def test_stream_sharding_and_max_batches(tiny_model):
    stream = TokenStream.from_documents([TEXT.encode()] * 3)
    full = bpb_of_stream(tiny_model, stream, seq_len=16, batch_size=4)
    shards = [bpb_of_stream(tiny_model, stream, seq_len=16, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert sum(s["targets"] for s in shards) == full["targets"] == len(stream) - 1
    assert sum(s["nats"] for s in shards) == pytest.approx(full["nats"], rel=1e-6)
    part = bpb_of_stream(tiny_model, stream, seq_len=16, batch_size=4, max_batches=2)
    assert (part["windows"], part["targets"]) == (8, 8 * 16)
    assert tiny_model.training is False


def test_precomputed_entropies_place_the_patches(tiny_model):
    from bltkit.model.patching import starts_to_lengths

    stream = TokenStream.from_documents([TEXT.encode()])
    T = len(stream) - 1  # one window
    ids = torch.from_numpy(stream.ids.astype(np.int64))[None]
    with torch.no_grad():  # stored entropies as `prepare` writes them: fp16
        stream.entropies = tiny_model.entropy_model.entropies(ids)[0].half().numpy()
        x, y = ids[:, :-1], ids[0, 1:]
        ent = torch.from_numpy(stream.entropies[:-1].astype(np.float32))[None]
        logits = tiny_model(x, patch_lengths=starts_to_lengths(tiny_model.patch_starts(x, ent)))
    expect = F.cross_entropy(logits[0].double(), y, reduction="sum").item()
    assert bpb_of_stream(tiny_model, stream, seq_len=T)["nats"] == pytest.approx(expect, rel=1e-5)
    stream.entropies[:] = 100.0  # every byte its own patch: another result
    assert bpb_of_stream(tiny_model, stream, seq_len=T)["nats"] != pytest.approx(expect, rel=1e-3)


def test_default_seq_len(tiny_model):
    assert default_seq_len(tiny_model) == min(tiny_model.config.max_bytes, 4096, tiny_model.config.max_patches - 1)
    assert default_seq_len(init_model(entropy_tiny())) == entropy_tiny().max_seqlen


def test_cli_eval_bpb_json_and_table(tmp_path, tiny_model, capsys):
    from bltkit.cli import main

    save_model(tiny_model, tmp_path / "model")
    (tmp_path / "persuasion.txt").write_text(TEXT * 2)
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": TEXT}) + "\n")
    args = ["eval", "bpb", "--model", str(tmp_path / "model"), str(tmp_path / "persuasion.txt"),
            "--seq-len", "64", "--device", "cpu"]
    main([*args, "--json"])
    out = json.loads(capsys.readouterr().out)
    expect = evaluate_bpb(tmp_path / "model", [tmp_path / "persuasion.txt"], seq_len=64)
    assert out["files"][0]["bytes"] == 2 * len(TEXT)
    assert out["overall"]["bpb"] == pytest.approx(expect["overall"]["bpb"], rel=1e-6)
    main([*args[:-4], str(tmp_path / "d.jsonl"), "--text-field", "body", "--seq-len", "64", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(str(tmp_path / "persuasion.txt"))
    assert lines[0].endswith(" bpb")
    assert f"{2 * len(TEXT):,} bytes" in lines[0]
    assert lines[2].startswith("overall")
    assert "BOS and EOS targets count" in lines[3]


def test_cli_eval_errors(tmp_path, capsys):
    from bltkit.cli import main

    model = init_model(entropy_tiny())
    save_model(model, tmp_path / "ent")
    with pytest.raises(SystemExit):
        main(["eval", "bpb", "--model", str(tmp_path / "ent"), str(tmp_path / "missing.txt"), "--device", "cpu"])
    assert "missing.txt does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("kw", "match"), [({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                                           ({"seq_len": -3}, "seq_len must be >= 1, got -3"),
                                           ({"seq_len": 0}, "seq_len must be >= 1, got 0")])
def test_non_positive_sizes_are_refused(tmp_path, tiny_model, kw, match):
    """0 or less is an error, not a ZeroDivisionError, a NaN result or (seq_len=0) the default."""
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(ValueError, match=match):
        evaluate_bpb(tiny_model, [tmp_path / "a.txt"], **kw)
    with pytest.raises(ValueError, match=match):
        bpb_of_stream(tiny_model, TokenStream.from_documents([TEXT.encode()]), **kw)


def test_cli_eval_bad_device(tmp_path, capsys):
    from bltkit.cli import main

    save_model(init_model(entropy_tiny()), tmp_path / "ent")
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(SystemExit):
        main(["eval", "bpb", "--model", str(tmp_path / "ent"), str(tmp_path / "a.txt"), "--device", "tpu"])
    err = capsys.readouterr().err
    assert "device 'tpu' is not a torch device" in err
    assert "truncated" not in err
