"""scripts/heldout_overlap.py: byte-window overlap between held-out and training files."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import heldout_overlap as ho


def _text(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(n))


def test_window_hashes_equal_for_equal_windows_only():
    data = b"abcdefabcdefxyz"
    h = ho.window_hashes(data, 6)
    assert len(h) == len(data) - 5
    assert h[0] == h[6]
    assert len(set(h.tolist())) == len(h) - 1
    assert len(ho.window_hashes(b"abc", 6)) == 0


def test_chunks_hash_every_window_once():
    data = _text(0, 5000)
    whole = ho.window_hashes(data, 32)
    for chunk in (33, 100, 4999, 10000):
        assert np.array_equal(np.concatenate(list(ho._chunks_of(io.BytesIO(data), 32, chunk))), whole)


def test_overlap_counts_the_shared_windows(tmp_path):
    shared = "日本語の文章の一部が学習データに入っています。".encode()  # no spaces: shingles miss it
    held = _text(1, 4000) + shared + _text(2, 4000)
    train = _text(3, 3000) + shared + _text(4, 3000)
    (tmp_path / "held.txt").write_bytes(held)
    (tmp_path / "train.txt").write_bytes(train)
    (tmp_path / "other.txt").write_bytes(_text(5, 8000))
    r = ho.overlap([tmp_path / "train.txt", tmp_path / "other.txt"], [tmp_path / "held.txt"], width=16,
                   samples=10**6, chunk=1000)["held.txt"]
    windows = len(held) - 15
    assert r[str(tmp_path / "train.txt")] == r["any"] == (len(shared) - 15) / windows
    assert r[str(tmp_path / "other.txt")] == 0.0
    spans, none = ho.longest_spans([held, _text(6, 3000)], [tmp_path / "train.txt", tmp_path / "other.txt"],
                                   16, 1000, 2)
    assert spans[0] == (len(shared), shared.decode())
    assert none == []
