"""The `blt` command end to end on tiny models in tmp_path (init, info, patch, calibrate, convert)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bltkit.bytes import encode
from bltkit.checkpoint import load_model
from bltkit.cli import COMMANDS, main
from bltkit.config import PatcherConfig
from bltkit.flops import count_params
from bltkit.presets import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "m"
    main(["init", "tiny", str(d), "--seed", "3"])
    return d


def test_help_is_torch_free():
    """`blt --help` must not import torch (it would take seconds): handlers import lazily."""
    code = "import sys; from bltkit.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: blt" in capsys.readouterr().out


def test_init_and_info(model_dir, capsys):
    main(["info", str(model_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    pc = count_params(tiny())
    assert info["params"]["total"] == pc.total
    assert info["params"]["hash_embeddings"] == 12 * 101 * 32
    model = load_model(model_dir)
    real = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("entropy_model."))
    assert real == pc.total  # the count is the model's, not an estimate
    main(["info", str(model_dir)])
    assert "hash tables" in capsys.readouterr().out
    main(["info", "blt-1b"])  # a preset name works too
    assert "4.53B" in capsys.readouterr().out


def test_patch_json_matches_the_model(model_dir, capsys):
    text = "Patches start where the entropy is high."
    main(["patch", "--model", str(model_dir), text, "--json"])
    r = json.loads(capsys.readouterr().out)
    model = load_model(model_dir)
    starts = model.patch_starts(torch.tensor([encode(text)]))[0]
    assert r["starts"] == [t for t in range(len(r["tokens"])) if starts[t]]
    assert sum(r["patch_lengths"]) == len(r["tokens"])
    main(["patch", "--model", str(model_dir), text, "--mode", "space"])
    out = capsys.readouterr().out
    assert "mode space" in out
    assert "▶" in out
    # an entropy model's directory: every mode is applied (entropy patching was shown under any)
    for where in (model_dir, model_dir / "entropy_model"):
        main(["patch", "--model", str(where), text, "--mode", "space", "--json"])
        r = json.loads(capsys.readouterr().out)
        assert r["patches"][1:] == ["Patches ", "start ", "where ", "the ", "entropy ", "is ", "high."]
        main(["patch", "--model", str(where), text, "--mode", "static", "--patch-size", "4", "--json"])
        assert set(json.loads(capsys.readouterr().out)["patch_lengths"][1:-1]) == {4}


def test_patch_html_shows_every_patch(model_dir, tmp_path, capsys):
    """--html writes a page with one box per patch (BOS's aside), the text escaped and in order,
    and each box's tooltip naming its bytes and the entropy that opened it."""
    import html as html_lib
    import re

    text = "Patches <start> where & the entropy is high."
    page = tmp_path / "p.html"
    main(["patch", "--model", str(model_dir), text, "--json", "--html", str(page)])
    r = json.loads(capsys.readouterr().out)
    boxes = re.findall(r'<span class="p[01]"[^>]*title="([^"]*)">([^<]*)</span>', page.read_text())
    assert len(boxes) == r["n_patches"]
    assert "".join(html_lib.unescape(t) for _, t in boxes) == text
    assert all(f"{n} bytes" in tip for (tip, _), n in zip(boxes, r["patch_lengths"][1:], strict=True))
    assert sum("opened at H" in tip for tip, _ in boxes) == r["n_patches"] - 1  # byte 1 opens by rule
    for bad in (tmp_path, tmp_path / "no" / "p.html"):  # refused before the model loads, not a traceback
        with pytest.raises(SystemExit):
            main(["patch", "--model", str(model_dir), text, "--html", str(bad)])
        assert "give a file in an existing folder" in capsys.readouterr().err


def test_patch_html_with_every_entropy_zero():
    """A report whose entropies are all 0 (a confident model) still makes a page: no shade to
    scale, where the scale divided by the largest entropy."""
    from bltkit.bytes import BOS_ID
    from bltkit.inspect import render_patch_html

    tokens = [BOS_ID, *encode("abcd", bos=False, eos=False)]
    r = {"entropies": [0.0] * 5, "threshold": 1.0, "starts": [0, 1, 3], "patches": ["", "ab", "cd"],
         "patch_lengths": [1, 2, 2], "tokens": tokens, "n_bytes": 4, "n_patches": 2, "mean_patch_length": 2.0,
         "mode": "entropy"}
    page = render_patch_html(r)
    assert page.count('<span class="p') == 2


def test_nan_threshold_is_refused_by_the_config():
    """A NaN threshold starts no patch (every comparison with NaN is false): the patcher's config
    refuses it wherever it is made, not only `blt patch`."""
    with pytest.raises(ValueError, match="threshold is NaN"):
        PatcherConfig(threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold_add is NaN"):
        PatcherConfig(threshold_add=float("nan"))


def test_calibrate_hits_the_target(model_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("Some English prose to calibrate on, repeated with variations. " * 30)
    main(["calibrate", "--model", str(model_dir), str(f), "--target", "3", "--json", "--device", "cpu"])
    r = json.loads(capsys.readouterr().out)
    assert abs(r["mean_patch"] - 3.0) < 0.2  # a quantile of ~1.9k entropies: within a few starts


def test_calibrate_and_patch_compute_entropies_in_fp32(model_dir, tmp_path, capsys):
    """A model stored in bf16 (as the bundled one is) calibrates and patches exactly as its fp32
    copy does: the entropies come from fp32 compute (spec §3.3), not from the stored dtype."""
    f = tmp_path / "t.txt"
    f.write_text("Some English prose to calibrate on, repeated with variations. " * 30)
    main(["convert", str(model_dir), str(tmp_path / "bf16"), "--dtype", "bf16"])
    main(["convert", str(tmp_path / "bf16"), str(tmp_path / "fp32"), "--dtype", "fp32"])
    capsys.readouterr()
    theta = {}
    for name in ("bf16", "fp32"):
        main(["calibrate", "--model", str(tmp_path / name), str(f), "--target", "3", "--json", "--device", "cpu"])
        theta[name] = json.loads(capsys.readouterr().out)["threshold"]
    assert theta["bf16"] == theta["fp32"]
    starts = {}
    for name in ("bf16", "fp32"):
        main(["patch", "--model", str(tmp_path / name), f.read_text()[:400], "--threshold", str(theta["fp32"]),
              "--json"])
        r = json.loads(capsys.readouterr().out)
        starts[name] = r["starts"], r["entropies"]
    assert starts["bf16"] == starts["fp32"]


@pytest.mark.parametrize("foreign", ["hf", "meta"])
def test_convert_round_trip(model_dir, tmp_path, foreign, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / foreign
    back = tmp_path / f"{foreign}_back"
    main(["convert", str(model_dir), str(out), "--to", foreign])
    main(["convert", str(out), str(back), "--from", foreign])
    a, b = load_model(model_dir).state_dict(), load_model(back).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "converted" in capsys.readouterr().out


def test_convert_meta_flags(model_dir, tmp_path, capsys):
    """--allow-unknown reaches the Meta importer (an args field bltkit does not know is an error
    without it, skipped with it); flags that do not apply to the formats asked for are refused,
    not ignored."""
    out = tmp_path / "meta"
    main(["convert", str(model_dir), str(out), "--to", "meta", "--meta-layout", "hub"])
    cfg = json.loads((out / "config.json").read_text())
    cfg["args"]["some_new_field"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        main(["convert", str(out), str(tmp_path / "back"), "--from", "meta"])
    assert "some_new_field" in capsys.readouterr().err
    main(["convert", str(out), str(tmp_path / "back"), "--from", "meta", "--allow-unknown"])
    assert load_model(tmp_path / "back").config == load_model(model_dir).config
    for extra in (["--entropy-model", str(model_dir)], ["--allow-unknown"], ["--meta-layout", "hub"]):
        with pytest.raises(SystemExit):
            main(["convert", str(model_dir), str(tmp_path / "x"), *extra])
        assert "applies only with --from meta" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("blt info: error:")
    assert "is neither a model directory nor a preset" in err
    with pytest.raises(SystemExit):
        main(["init", "tiny", str(tmp_path / "x"), "encoder.dimm=4"])
    assert "did you mean 'encoder.dim'" in capsys.readouterr().err


def test_info_takes_the_preset_spellings_of_init(capsys):
    for name in ("entropy_tiny", "blt_1b"):
        main(["info", name])
        assert "parameters" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "blt1b"])
    err = capsys.readouterr().err
    assert "blt1b is neither a model directory nor a preset" in err
    assert "did you mean 'blt-1b'?" in err


@pytest.mark.parametrize(("argv", "match"), [
    (["tiny", "--mean-patch-len", "0"], "mean_patch_len must be a positive number of bytes, got 0.0"),
    (["tiny", "--mean-patch-len", "-3"], "mean_patch_len must be a positive"),
    (["tiny", "--seq-len", "-5"], "seq_len must be >= 1 byte, got -5"),
    (["tiny", "--seq-len", "0"], "seq_len must be >= 1 byte, got 0"),  # not the default
    (["entropy-tiny", "--seq-len", "0"], "seq_len must be >= 1 byte, got 0"),
])
def test_info_refuses_non_positive_sizes(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["info", *argv])
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "match"), [
    (["--target", "0"], "target mean patch length must be a finite number of bytes >= 1, got 0.0"),
    (["--target", "0.5"], "got 0.5"),
    (["--target", "-2"], "got -2.0"),
    (["--target", "nan"], "got nan"),
    (["--max-bytes", "-100"], "max_bytes must be >= 1, got -100"),
    (["--device", "bogus"], "device 'bogus' is not a torch device"),
])
def test_calibrate_refuses_impossible_targets(model_dir, tmp_path, argv, match, capsys):
    f = tmp_path / "t.txt"
    f.write_text("Some English prose to calibrate on. " * 10)
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(model_dir), str(f), *argv])
    err = capsys.readouterr().err
    assert match in err
    assert "truncated" not in err


def test_patch_refuses_a_nan_threshold(model_dir, capsys, monkeypatch):
    """... before the model loads (the check is PatcherConfig's, run on the overrides first)."""
    import bltkit.checkpoint

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the threshold was checked")

    monkeypatch.setattr(bltkit.checkpoint, "load_model", no_load)
    with pytest.raises(SystemExit):
        main(["patch", "--model", str(model_dir), "hello there", "--threshold", "nan"])
    assert "threshold is NaN" in capsys.readouterr().err
