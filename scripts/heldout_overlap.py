"""How much of each held-out file also occurs in the training files, counted in byte windows.

The corpus build checks leakage with 13-word shingles (docs/corpus.md). That check is blind in
scripts written without spaces (Chinese, Japanese), where a "word" is a whole clause. Byte windows
see every script: each WIDTH-byte window of the training files is hashed (a 64-bit polynomial
hash; a false match among 20,000 samples and 250M windows has a chance of about 3e-7), and a
random sample of each held-out file's windows is looked up. Per held-out file it prints the share
of sampled windows found in each training file and in any, and with --spans the longest runs of
consecutive shared windows (whole-file scan; slow for big training files), so a reader can tell
shared phrasing (short spans) from a leaked page (spans of kilobytes).

    python scripts/heldout_overlap.py --train data/main/train.txt data/extra/train.txt \\
        --heldout data/heldout/*.txt
    python scripts/heldout_overlap.py --train data/extra/train.txt --heldout data/heldout/*.txt --spans 3

Needs numpy only. Memory: about 24 bytes per byte of the largest chunk (--chunk, 16 MB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import BinaryIO

import numpy as np

_MULT = np.uint64(1099511628211)  # the FNV prime: odd, so the hash mixes every byte


def window_hashes(data: bytes, width: int) -> np.ndarray:
    """uint64 hash of every `width`-byte window of `data` (len(data) - width + 1 of them)."""
    a = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    n = len(a) - width + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(width):  # Horner's rule, modulo 2**64 (numpy integer arithmetic wraps)
        h *= _MULT
        h += a[j:j + n]
    return h


def _chunks_of(f: BinaryIO, width: int, chunk: int):
    """Window hashes of a binary stream, a chunk at a time; chunks overlap by width - 1 bytes, so
    every window is hashed exactly once."""
    tail = b""
    while block := f.read(chunk):
        data = tail + block
        yield window_hashes(data, width)
        tail = data[len(data) - (width - 1):] if width > 1 else b""


def chunk_hashes(path: Path, width: int, chunk: int):
    with open(path, "rb") as f:
        yield from _chunks_of(f, width, chunk)


def found_in(path: Path, queries: np.ndarray, width: int, chunk: int) -> np.ndarray:
    """Which of the `queries` hashes occur among the windows of `path`."""
    hit = np.zeros(len(queries), dtype=bool)
    for h in chunk_hashes(path, width, chunk):
        hit |= contains(np.sort(h), queries)
    return hit


def contains(sorted_h: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """queries in sorted_h, by binary search (np.isin took 25 s for 160k queries among 12M
    uint64 hashes; this takes about one second, the sort included)."""
    if len(sorted_h) == 0:
        return np.zeros(len(queries), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_h, queries), len(sorted_h) - 1)
    return sorted_h[i] == queries


def lookup(train: list[Path], queries: list[np.ndarray], width: int, chunk: int) -> dict[str, list[np.ndarray]]:
    """{training path: [which hashes of each query array occur in it]}: one pass over each
    training file for all the query arrays together."""
    allq = np.concatenate(queries)
    cuts = np.cumsum([len(q) for q in queries])[:-1]
    return {str(path): np.split(found_in(path, allq, width, chunk), cuts) for path in train}


def longest_spans(heldout: list[bytes], train: list[Path], width: int, chunk: int, k: int
                  ) -> list[list[tuple[int, str]]]:
    """Per held-out text, the `k` longest runs of bytes whose every window occurs in the
    training files: (length in bytes, the text)."""
    hs = [window_hashes(b, width) for b in heldout]
    hits = lookup(train, hs, width, chunk)
    spans = []
    for i, text in enumerate(heldout):
        hit = np.zeros(len(hs[i]), dtype=bool)
        for per_file in hits.values():
            hit |= per_file[i]
        idx = np.flatnonzero(hit)
        runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(idx) else []
        runs.sort(key=len, reverse=True)
        spans.append([(len(r) + width - 1, text[r[0]:r[-1] + width].decode("utf-8", errors="replace"))
                      for r in runs[:k]])
    return spans


def overlap(train: list[Path], heldout: list[Path], width: int = 32, samples: int = 20000, seed: int = 0,
            chunk: int = 16 << 20) -> dict:
    """{held-out name: {training path: share of sampled windows found, ..., "any": share}}."""
    rng = np.random.default_rng(seed)
    queries = []
    for path in heldout:
        h = window_hashes(path.read_bytes(), width)
        if len(h) == 0:
            raise SystemExit(f"{path} is shorter than one window of {width} bytes")
        queries.append(h[rng.choice(len(h), min(samples, len(h)), replace=False)])
    hits = lookup(train, queries, width, chunk)
    result = {}
    for i, path in enumerate(heldout):
        result[path.name] = {t: float(per_file[i].mean()) for t, per_file in hits.items()}
        result[path.name]["any"] = float(np.logical_or.reduce([per_file[i] for per_file in hits.values()]).mean())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", type=Path, required=True, help="training text files")
    ap.add_argument("--heldout", nargs="+", type=Path, required=True, help="held-out text files")
    ap.add_argument("--width", type=int, default=32, help="window in bytes (default 32: ~11 CJK characters)")
    ap.add_argument("--samples", type=int, default=20000, help="windows sampled per held-out file")
    ap.add_argument("--spans", type=int, default=0, metavar="K", help="also the K longest shared spans per file")
    ap.add_argument("--chunk", type=int, default=16 << 20, help="bytes of a training file hashed at once")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if args.width < 1:
        ap.error("--width must be at least 1")
    for p in [*args.train, *args.heldout]:
        if not p.is_file():
            ap.error(f"{p} is not a file")
    result = overlap(args.train, args.heldout, args.width, args.samples, chunk=args.chunk)
    if args.spans:
        spans = longest_spans([p.read_bytes() for p in args.heldout], args.train, args.width, args.chunk, args.spans)
        for p, s in zip(args.heldout, spans, strict=True):
            result[p.name]["longest_spans"] = s
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return
    names = [str(t) for t in args.train]
    print(f"share of {args.samples:,} sampled {args.width}-byte windows found in the training files")
    print("| held-out | " + " | ".join(names) + " | any |")
    print("|---|" + "---:|" * (len(names) + 1))
    for p in args.heldout:
        r = result[p.name]
        print(f"| {p.name} | " + " | ".join(f"{100 * r[n]:.2f} %" for n in names) + f" | {100 * r['any']:.2f} % |")
    for p in args.heldout if args.spans else []:
        print(f"\n{p.name}: longest shared spans")
        for n, text in result[p.name]["longest_spans"]:
            print(f"  {n} bytes: {text[:120]!r}")


if __name__ == "__main__":
    main()
