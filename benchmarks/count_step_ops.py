"""Count the PyTorch operators that launch work in one generation step (a CPU proxy for GPU
kernel launches, which bound the byte step on a GPU: docs/benchmarks.md).

    python benchmarks/count_step_ops.py --preset blt-1b hash_vocab=1024 [--no-fuse]

Views, reshapes and no-op casts are left out; a matrix product counts once, an RMSNorm too
(F.rms_norm, on a CPU as on CUDA, since the fifteenth session).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import random_model

from bltkit.generate import Generator

FREE = {"aten::view", "aten::unsqueeze", "aten::transpose", "aten::select", "aten::flatten", "aten::reshape",
        "aten::expand", "aten::slice", "aten::as_strided", "aten::t", "aten::permute", "aten::split",
        "aten::chunk", "aten::unbind", "aten::narrow", "aten::squeeze", "aten::detach", "aten::alias", "aten::to",
        "aten::expand_as", "aten::view_as", "aten::lift_fresh", "aten::_unsafe_view", "aten::split_with_sizes",
        "aten::contiguous", "aten::unflatten", "aten::result_type", "aten::item", "aten::dropout"}
COMPOSITE = {"aten::linear", "aten::matmul", "aten::scaled_dot_product_attention"}  # count once, not inside


def count(fn) -> tuple[collections.Counter, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops: collections.Counter = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        inside_composite = False
        while parent is not None:
            if parent.name in COMPOSITE or (parent.name.startswith("aten::") and parent.name not in FREE):
                inside_composite = True
                break
            parent = parent.cpu_parent
        if e.name.startswith("aten::") and e.name not in FREE and not inside_composite:
            ops[e.name] += 1
    return ops, ops["aten::rms_norm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--no-fuse", action="store_true", help="Generator(fuse=False)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. hash_vocab=1024 (memory)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = random_model(args.preset, args.overrides, "cpu", torch.float32)
    gen = Generator(model, cuda_graphs=False, fuse=not args.no_fuse)
    gen.generate_ids([b"The quick brown fox jumps over the lazy dog. " * 2], 4, stop_at_eos=False)
    total = {}
    for name, fn in (("front", gen._run_front), ("patch", gen._run_patch), ("back", gen._run_back)):
        ops, norms = count(fn)
        total[name] = sum(ops.values()), norms
        top = ", ".join(f"{k[6:]} {v}" for k, v in ops.most_common(8))
        print(f"{name:5s}: {total[name][0]:4d} operators, rmsnorm {norms:3d} | {top}")
    per_byte = total["front"][0] + total["back"][0] + total["patch"][0] / 4.5
    print(f"~{per_byte:.0f} operators per byte at a mean patch of 4.5")


if __name__ == "__main__":
    main()
