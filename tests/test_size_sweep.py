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
