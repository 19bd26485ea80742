"""Count the PyTorch operators that launch work in one generation step (a CPU proxy for GPU
kernel launches, which bound the byte step on a GPU: docs/benchmarks.md).

    python benchmarks/count_step_ops.py --preset blt-1b hash_vocab=1024 [--no-fuse]
    python benchmarks/count_step_ops.py --kernels [--rows 9] [--off HASH_EMBED ...] [--on DECODER_PRODUCTS ...]

Views, reshapes and no-op casts are left out; a matrix product counts once, an RMSNorm too
(F.rms_norm, on a CPU as on CUDA, since the fifteenth session); allocations (torch.empty) launch
nothing and are not counted since the twenty-fourth session (earlier counts in docs/benchmarks.md
include the few a step's PyTorch path makes at its top level).

--kernels: the batch-64 step as a GPU runs it (Generator(kernels=True): the Triton kernels under
Triton's CPU interpreter, needs `triton`; past KERNEL_MAX_ROWS and PATCH_EVERY_BYTE_ROWS rows, the
global step beside the entropy model), on a model with blt-1b's layer counts and small widths:
PyTorch operators plus Triton launches, each part of the step apart, and which of them a CUDA
step runs on the second stream beside the chain. `--off NAME`: a generate module switch off
(HASH_EMBED, CROSS_ATTEND, RING_BOUNDS, SIDE_COUNTS, ...), to count what it saves; `--on NAME`
one on (DECODER_PRODUCTS, GLOBAL_PRODUCTS, FRONT_PRODUCTS).
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
        "aten::contiguous", "aten::unflatten", "aten::result_type", "aten::item", "aten::dropout",
        "aten::empty", "aten::empty_like", "aten::empty_strided"}  # (allocations launch nothing)
COMPOSITE = {"aten::linear", "aten::matmul", "aten::scaled_dot_product_attention"}  # count once, not inside


def count(fn) -> tuple[collections.Counter, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops: collections.Counter = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        inside_composite = False
        while parent is not None:  # (a Triton launch's own copies under the interpreter are not the step's)
            if parent.name in COMPOSITE or (parent.name.startswith("aten::") and parent.name not in FREE) \
                    or parent.name.startswith("triton::"):
                inside_composite = True
                break
            parent = parent.cpu_parent
        if e.name.startswith("aten::") and e.name not in FREE and not inside_composite:
            ops[e.name] += 1
    return ops, ops["aten::rms_norm"]


# blt-1b's layer counts (encoder 1, global 25, decoder 9, entropy model 14) at widths the
# interpreter runs in minutes; the kernel counts depend on the layers and code paths, not widths
SMALL_1B = ["encoder.dim=64", "encoder.n_heads=4", "encoder.cross_attn_n_heads=4", "global_transformer.dim=64",
            "global_transformer.n_heads=4", "decoder.dim=64", "decoder.n_heads=4", "decoder.cross_attn_n_heads=4",
            "entropy_model.dim=64", "entropy_model.n_heads=4", "hash_vocab=64"]


def count_kernels(rows: int, off: list[str], on: list[str] = ()) -> None:
    """The overlapping step's parts counted as `count` does, plus Triton launches; the switches
    `off` turned off and `on` turned on."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        raise SystemExit("--kernels runs the Triton kernels under Triton's CPU interpreter: pip install triton") from None

    from bltkit import generate, kernels

    for flag, names, value in (("--off", off, False), ("--on", on, True)):
        for name in names:
            if not isinstance(getattr(generate, name, None), bool):
                raise SystemExit(f"{flag} {name}: not a switch of bltkit.generate")
            setattr(generate, name, value)
    kernels.ATTEND_PROGRAMS = 1  # blt-1b's 64 rows x 16 heads need no split (nor its combining kernel)
    launches: collections.Counter = collections.Counter()
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *a, **k):
        launches[self.fn.__name__] += 1
        with torch.profiler.record_function("triton::launch"):
            return run(self, *a, **k)

    interpreter.InterpretedFunction.run = counted_run
    model = random_model("blt-1b", SMALL_1B, "cpu", torch.float32)
    gen = Generator(model, kernels=True)
    text = b"The quick brown fox jumps over the lazy dog. " * 2
    gen.generate_ids([text[:20 + i] for i in range(rows)], 3, stop_at_eos=False)
    assert gen.overlapping, f"--rows {rows}: the overlapping step needs {generate.PATCH_EVERY_BYTE_ROWS} rows"
    x, L = gen.x, gen._global_slots()
    state: dict = {}
    # (part, runs on the second stream on CUDA, call) in the order `_run_front_patch` and
    # `_run_back` make them
    parts = [("entropy model", True, lambda: state.update(H=gen._entropy_step(x))),
             ("encoder", False, lambda: gen._encode(x)),
             ("decision", True, lambda: state.update(close=gen._decide(x, state["H"]))),
             ("decoder prep", True, lambda: setattr(gen, "_dec_prep", gen._back_prep())),
             ("global step", False, lambda: state.update(kv=gen._global_step(L))),
             ("commit K/V", False, lambda: gen._commit_kv(state["close"], state["kv"])),
             ("commit counts", generate.SIDE_COUNTS, lambda: gen._commit_counts(state["close"])),
             ("decoder", False, gen._run_decode), ("advance", False, gen._run_advance),
             ("feed", False, gen._run_feed)]
    chain = side = 0
    for name, beside, fn in parts:
        launches.clear()
        ops, _ = count(fn)
        n = sum(ops.values()) + sum(launches.values())
        side, chain = (side + n, chain) if beside else (side, chain + n)
        top = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in (ops + launches).most_common(6))
        print(f"{name:14s} {'side' if beside else 'main'} {n:4d} kernels | {top}")
    print(f"a step: {chain + side} kernels, {chain} on the chain, {side} beside it"
          + (f" (switched off: {', '.join(off)})" if off else "") + (f" (switched on: {', '.join(on)})" if on else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--no-fuse", action="store_true", help="Generator(fuse=False)")
    ap.add_argument("--kernels", action="store_true",
                    help="the batch-64 step with the Triton kernels (under Triton's interpreter; needs triton)")
    ap.add_argument("--rows", type=int, default=9, help="with --kernels: rows (past KERNEL_MAX_ROWS and "
                    "PATCH_EVERY_BYTE_ROWS: the batch-64 step's path)")
    ap.add_argument("--off", action="append", default=[], metavar="NAME",
                    help="with --kernels: a bltkit.generate switch off (repeatable)")
    ap.add_argument("--on", action="append", default=[], metavar="NAME",
                    help="with --kernels: a bltkit.generate switch on (repeatable; DECODER_PRODUCTS, ...)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. hash_vocab=1024 (memory)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.kernels:
        os.environ["TRITON_INTERPRET"] = "1"  # read as bltkit.kernels is imported
        count_kernels(args.rows, args.off, args.on)
        return
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
