"""scripts/size_sweep.py: the candidates' shipped sizes, computed before any training."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import size_sweep

ROOT = Path(__file__).resolve().parents[1]

BUNDLED = ROOT / "bltkit" / "models" / "default"


def _bundled_args() -> list[str]:
    """The BLT settings scripts/train_bundled.sh trains the bundled model with."""
    found = re.findall(r'^\s*BLT_ARGS="([^"]*)"', (ROOT / "scripts" / "train_bundled.sh").read_text(), re.M)
    (args,) = [a for a in found if "model.hash_vocab" in a]  # not SMOKE=1's
    return shlex.split(args)


def test_shipped_candidate_size_is_the_shipped_files():
    _, size = size_sweep.shipped_bytes("small", _bundled_args())
    files = sum(p.stat().st_size for p in BUNDLED.rglob("*.safetensors"))
    assert abs(size - files) / files < 1e-3  # safetensors headers are a few kB


def test_every_candidate_fits_the_cap_and_differs():
    sizes = {name: size_sweep.shipped_bytes("small", _bundled_args() + shlex.split(extra))
             for name, extra in size_sweep.CANDIDATES.items()}
    assert all(b <= 60e6 for _, b in sizes.values()), sizes
    assert len({n for n, _ in sizes.values()}) == len(sizes)  # each candidate is another shape


def test_table_merges_calls_in_candidate_order(tmp_path, monkeypatch, capsys):
    """A sweep split over calls (--only) keeps the earlier results; the table lists the
    candidates in their built-in order and times them against the first (the shipped shape),
    whichever call ran it."""
    runs = {"decoder-6-global-5": {"overrides": "", "params": 2e7, "shipped_bytes": 4e7, "val_bpb": 1.9,
                                   "step_ms": 200.0},
            "shipped": {"overrides": "", "params": 2e7, "shipped_bytes": 4e7, "val_bpb": 2.0, "step_ms": 100.0}}
    (tmp_path / "sweep.json").write_text(__import__("json").dumps(runs))
    monkeypatch.setattr(sys, "argv", ["size_sweep.py", "--data", "x", "--entropy-model", "x", "--out",
                                      str(tmp_path), "--table", "--shipped-steps", "1000"])
    size_sweep.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| shipped", "| decoder-6-global-5"]
    assert rows[0].endswith("| 1,000 |")
    assert rows[1].endswith("| 500 |")


def test_full_sweep_starts_afresh(tmp_path, monkeypatch, capsys):
    """Only a split sweep (--only) keeps earlier results; a full one never mixes in a previous
    sweep's (other steps or settings)."""
    (tmp_path / "sweep.json").write_text(__import__("json").dumps(
        {"stale": {"overrides": "", "params": 1, "shipped_bytes": 2, "val_bpb": 9.0, "step_ms": 1.0}}))
    monkeypatch.setattr(size_sweep, "shipped_bytes", lambda preset, overrides: (10, 20))
    monkeypatch.setattr(size_sweep, "run_candidate",
                        lambda name, overrides, args: {"val_bpb": 2.0, "train_bpb": 2.0, "step_ms": 50.0})
    monkeypatch.setattr(sys, "argv", ["size_sweep.py", "--data", "x", "--entropy-model", "x", "--out",
                                      str(tmp_path), "--candidate", "a=", "--steps", "7"])
    size_sweep.main()
    out = capsys.readouterr().out
    assert "stale" not in out
    assert "| a |" in out
    assert "7 steps each;" in out
