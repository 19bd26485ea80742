"""Generation with the bundled model on a CPU (the README's main job), and what a one-row product
costs there with each weight layout.

    python benchmarks/cpu_generate.py [--model DIR] [--layouts col row] [--new-bytes 160] [--compile]

First the generator's default steps on a CPU, the C steps of bltkit.native (where a C compiler is
found), against its PyTorch steps, at batch 1 and 8, greedy and at temperature 0.8. Then, for the
PyTorch steps and each layout of the generator's fused q|k|v and w1|w3 copies (`col`: column-major, the CPU
default; `row`: row-major, as nn.Linear keeps its weights and CUDA keeps the copies) it prints
bytes/s at batch 1 and 8 (eight short prompts, temperature 0.8, prefill included, best of
`--repeat`), then the time of one [1, in] x [in, out] product per layout for the model's shapes,
with enough distinct weights that they come from memory, not from cache. With `--compile`, first
the compiled generator (Generator(compile=True), `blt generate --compile`) against the eager one.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bltkit import generate, native
from bltkit.bundled import bundled_model_dir
from bltkit.checkpoint import load_model
from bltkit.generate import Generator

PROMPTS = ["Once upon a time", "The history of the English language", "def main():\n",
           "It was a bright cold day in April", "Le petit prince", "In the beginning",
           "import numpy as np\n", "Dear Sir,\n"]
LAYOUTS = {"col": generate._Fused.__dict__["_layout"], "row": staticmethod(lambda w: w)}


def rate(model, batch: int, new_bytes: int, repeat: int, compile: bool = False, native: bool = False,
         temperature: float = 0.8) -> float:
    gen = Generator(model, compile=compile, native=native)
    t = time.perf_counter()
    gen.generate(PROMPTS[:batch], new_bytes, temperature=temperature, seed=0)  # compiles for this batch and length
    if compile:
        print(f"compiled generator: first call at batch {batch} {time.perf_counter() - t:.1f} s", flush=True)
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        out = gen.generate(PROMPTS[:batch], new_bytes, temperature=temperature, seed=0)
        best = max(best, sum(map(len, out)) / (time.perf_counter() - t))
    return best


def product_us(out_dim: int, in_dim: int, col: bool, cache_bytes: int = 64 << 20, calls: int = 10) -> float:
    """One-row F.linear from memory: cycles through more weights than `cache_bytes` hold."""
    n = max(4, cache_bytes // (out_dim * in_dim * 4))
    ws = [torch.randn(out_dim, in_dim) for _ in range(n)]
    if col:
        ws = [w.t().contiguous().t() for w in ws]
    x = torch.randn(1, in_dim)
    for w in ws:
        F.linear(x, w)
    t = time.perf_counter()
    for _ in range(calls):
        for w in ws:
            F.linear(x, w)
    return (time.perf_counter() - t) / (calls * n) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--layouts", nargs="*", choices=sorted(LAYOUTS), default=["col", "row"])
    ap.add_argument("--new-bytes", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time Generator(compile=True) at batch 1 and 8")
    args = ap.parse_args()
    model = load_model(args.model or bundled_model_dir(), device="cpu", dtype=torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if native.unavailable() is None:
        for temp in (0.0, 0.8):
            for b in (1, 8):
                c, p = (rate(model, b, args.new_bytes, args.repeat, native=n, temperature=temp) for n in (True, False))
                print(f"temperature {temp}, batch {b}: native steps {c:.1f} bytes/s, PyTorch steps {p:.1f} "
                      f"({c / p:.2f}x)", flush=True)
    else:
        print(native.unavailable())
    if args.compile:
        for b in (1, 8):
            eager, comp = rate(model, b, args.new_bytes, args.repeat), rate(model, b, args.new_bytes, args.repeat, True)
            print(f"batch {b}: eager {eager:.1f} bytes/s, compiled {comp:.1f} ({comp / eager:.2f}x)", flush=True)
    for name in args.layouts:
        generate._Fused._layout = LAYOUTS[name]
        try:
            rates = {b: rate(model, b, args.new_bytes, args.repeat) for b in (1, 8)}
        finally:
            generate._Fused._layout = LAYOUTS["col"]
        print(f"fused copies {name}-major: batch 1 {rates[1]:.1f} bytes/s, batch 8 {rates[8]:.1f} bytes/s in total")
    c = model.config
    shapes = {"entropy q|k|v": (3 * c.entropy_model.dim, c.entropy_model.dim),
              "entropy w1|w3": (2 * c.entropy_model.ffn_dim, c.entropy_model.dim),
              "decoder w2": (c.decoder.dim, c.decoder.ffn_dim), "decoder wo": (c.decoder.dim, c.decoder.dim)}
    for what, (o, i) in shapes.items():
        col, row = product_us(o, i, True), product_us(o, i, False)
        print(f"[1, {i}] x [{i}, {o}] ({what}): column-major {col:.1f} us, row-major {row:.1f} us "
              f"(row / col {row / col:.2f}x)")


if __name__ == "__main__":
    main()
