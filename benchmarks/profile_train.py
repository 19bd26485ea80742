"""Where does a BLT training step's time go? One profiled window of real training steps.

The step is the trainer's: the frozen entropy model patches on the fly, forward under bf16
autocast (CUDA), fp32 cross-entropy, backward, gradient clipping, fused AdamW. Phases are marked
with record_function (patcher, forward, backward, optimizer) so the table shows their share; the
top kernels and the top CPU-side operators follow.

    python benchmarks/profile_train.py                                   # the bundled recipe's BLT
    python benchmarks/profile_train.py --preset blt-1b --batch 1 --seq-len 8192 hash_vocab=65536
    python benchmarks/profile_train.py --preset tiny --batch 2 --seq-len 256 --steps 2   # CPU smoke

Random weights and random-looking text (the shipped Austen sample); the entropy threshold is set
for a mean patch of --mean-patch bytes on that text.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import calibrate_threshold, random_model, sync, with_threshold

from bltkit.bytes import encode
from bltkit.distributed import compile_blocks
from bltkit.model.patching import starts_to_lengths
from bltkit.optim import OptimConfig, build_optimizer

BUNDLED = ["hash_vocab=6144", "global_transformer.dim=384", "global_transformer.n_heads=6",
           "global_transformer.n_layers=4"]
TEXT = Path(__file__).parent.parent / "tests" / "assets" / "pride_20k.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=4, help="steps first (compiles, allocator)")
    ap.add_argument("--mean-patch", type=float, default=6.5, help="(the bundled run's training mean)")
    ap.add_argument("--attn", choices=["auto", "flex", "sdpa"], default="auto")
    ap.add_argument("--pad-patches", type=int, default=64, help="as train.pad_patches (flex only)")
    ap.add_argument("--patcher-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the entropy model's precision when patching (as train.patcher_dtype)")
    ap.add_argument("--compile", action="store_true", help="compile each block (as train.compile=true)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rows", type=int, default=25, help="rows per table")
    ap.add_argument("overrides", nargs="*", help=f"config overrides (default for small: {' '.join(BUNDLED)})")
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    overrides = args.overrides or (BUNDLED if args.preset == "small" else [])
    model = random_model(args.preset, overrides, str(dev), torch.float32)
    impl = args.attn if args.attn != "auto" else ("flex" if cuda else "sdpa")
    model.set_attn_impl(impl)
    if impl == "flex":
        model.pad_patches_multiple = args.pad_patches
    text = torch.tensor([encode(TEXT.read_bytes()[: args.seq_len * 4])], device=dev)
    with_threshold(model, calibrate_threshold(model, text, args.mean_patch))
    model.train()
    if args.compile:
        compile_blocks(model)  # as train.compile=true
    opt = build_optimizer(model, OptimConfig(lr=1e-4), dev)
    ids = encode(TEXT.read_bytes())
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - args.seq_len - 2, (args.batch,), generator=g).tolist()
    tokens = torch.tensor([[1, *ids[s + 1:s + args.seq_len + 1]] for s in starts], device=dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    patcher_autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.patcher_dtype == "bf16")
    rf = torch.profiler.record_function

    def step() -> None:
        with rf("patcher"), torch.no_grad(), patcher_autocast:
            lengths = starts_to_lengths(model.patch_starts(x))  # forward pads the count (flex)
        with rf("forward"), autocast:
            loss = F.cross_entropy(model(x, patch_lengths=lengths).flatten(0, 1).float(), y.flatten())
        with rf("backward"):
            loss.backward()
        with rf("optimizer"):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(dev)
    print(f"warm-up: {args.warmup} steps in {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(dev)
    plain = (time.perf_counter() - t) / args.steps
    bytes_step = args.batch * args.seq_len
    print(f"unprofiled: {plain * 1e3:.1f} ms/step, {bytes_step / plain / 1e3:.0f}k bytes/s "
          f"({args.batch} x {args.seq_len} bytes, {impl}, {'bf16 autocast' if cuda else 'fp32'}, "
          f"patcher {args.patcher_dtype}{', compiled blocks' if args.compile else ''})", flush=True)

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        sync(dev)
    events = prof.key_averages()
    dkey = "self_device_time_total" if cuda else "self_cpu_time_total"
    phases = {e.key: e for e in events if e.key in ("patcher", "forward", "backward", "optimizer")}
    print("\nphase       CPU ms/step   device ms/step")
    for name in ("patcher", "forward", "backward", "optimizer"):
        e = phases.get(name)
        if e is not None:
            dev_ms = getattr(e, "device_time_total", 0) / 1e3 / args.steps if cuda else math.nan
            print(f"{name:10s} {e.cpu_time_total / 1e3 / args.steps:12.1f} {dev_ms:16.1f}")
    n_kernels = sum(e.count for e in events if cuda and getattr(e, "self_device_time_total", 0) > 0
                    and e.key not in phases)
    if cuda:
        print(f"\n~{n_kernels / args.steps:.0f} device kernels per step")
    print(events.table(sort_by=dkey, row_limit=args.rows, max_name_column_width=60))
    if cuda:
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows // 2, max_name_column_width=60))


if __name__ == "__main__":
    main()
