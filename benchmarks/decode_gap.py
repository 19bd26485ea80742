"""The batch-64 step as the grid times it (issue 4), under variants of the generator's switches.

The twenty-fifth session's grid (`generate.py`, 128 new bytes after 64 distinct 64-byte prompts)
made 25,984 bytes/s, 2.46 ms a step, where `profile_generate.py --batch 64 --steps 32` (one
prompt repeated, 32 steps) timed 2.26 ms: the twenty-sixth session found the difference in the
step count (the caches grow: a step costs ~2.28 ms at the start and ~2.65 after 128 bytes), not
in the prompts or the host's reads. This times `Generator.generate_ids` on the grid's prompts
(or one repeated) for each variant, a list of module constants of `bltkit.generate` to set
(`NAME=VALUE;NAME=VALUE`, values as Python literals, `kernels.NAME` for bltkit.kernels'; `base`:
the defaults), each on a fresh
Generator, and prints the step's time on the host's clock and on the GPU's (CUDA events around
each step: the mean, the first step, the slowest).

    python benchmarks/decode_gap.py --variants base GLOBAL_ACTIVE_FROM=None base
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import (
    SAMPLE_TEXT,
    calibrate_threshold,
    constant,
    parse_constants,
    random_model,
    with_threshold,
)
from generate import prompts_of

from bltkit import kernels
from bltkit.bytes import encode
from bltkit.generate import Generator


def timed_steps(gen: Generator, prompts, steps: int) -> tuple[float, list[float]]:
    """generate_ids' decode time a step (host clock) and each step's GPU time (CUDA events)."""
    events: list[torch.cuda.Event] = []
    step = gen._step

    def marked() -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append(e)
        step()

    gen._step = marked
    try:
        gen.generate_ids(prompts, steps, stop_at_eos=False)
    finally:
        gen._step = step
    torch.cuda.synchronize()
    gaps = [a.elapsed_time(b) for a, b in itertools.pairwise(events)]
    return gen.stats["decode_s"] / steps * 1e3, gaps


def tuned_attention() -> str:
    """What the attention kernel's autotuner chose (on the warm-up's first calls) for each of its
    keys with RoPE in the kernel (the global step's and the rings'): head dim, slots -> BLOCK_S x warps."""
    tuner = kernels._attend_kernel
    out = []
    for key, config in tuner.cache.items():  # the key: the autotuner's key arguments, then dtypes
        k = dict(zip(tuner.keys, key, strict=False))
        if k.get("ROPE"):
            out.append(f"H {k.get('H')} S {k.get('S')}: {config.kwargs.get('BLOCK_S')} x {config.num_warps}")
    return "; ".join(sorted(set(out))) or "none with RoPE"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompts", choices=("grid", "repeated"), default="grid",
                    help="the grid's distinct prompts (generate.py's) or one repeated (profile_generate.py's)")
    ap.add_argument("--variants", nargs="+", default=["base"],
                    help="each NAME=VALUE;NAME=VALUE of bltkit.generate's constants (kernels.NAME: bltkit.kernels'), or base")
    args = ap.parse_args()
    variants = [(v, parse_constants(v)) for v in args.variants]
    model = random_model("blt-1b", [], "cuda", torch.bfloat16)
    calib = torch.tensor([encode(SAMPLE_TEXT * 4)], device="cuda")
    with_threshold(model, calibrate_threshold(model, calib, 4.5))
    if args.prompts == "grid":
        prompts = prompts_of(args.prompt_len, args.batch)
    else:
        prompts = [(SAMPLE_TEXT * (args.prompt_len // len(SAMPLE_TEXT) + 2)).encode()[:args.prompt_len - 1]] * args.batch
    names = {name for _, v in variants for name in v}
    defaults = {name: getattr(*constant(name)) for name in names}
    want = None
    for text, values in variants:
        for name, value in {**defaults, **values}.items():
            setattr(*constant(name), value)
        kernels._attend_kernel.cache.clear()  # the autotuner chooses again (ATTEND_FIRST_BLOCK is in its key)
        gen = None
        gc.collect()
        torch.cuda.empty_cache()
        try:
            gen = Generator(model, kernels=True, speculate=True)
            gen.generate_ids([p[:16] for p in prompts], 8, stop_at_eos=False)  # as the grid warms up
            ms, gaps = timed_steps(gen, prompts, args.steps)
            out = gen.generate_ids(prompts, args.steps, stop_at_eos=False)
        except Exception as e:  # report, time the next variant
            print(f"{text}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        want = out if want is None else want
        same = sum(a == b for a, b in zip(out, want, strict=True))
        rest = gaps[1:]
        print(f"{text}: {ms:.3f} ms a step (host); GPU start to start: mean {statistics.mean(gaps):.3f}, first "
              f"{gaps[0]:.3f}, last 16 {statistics.mean(gaps[-16:]):.3f}, slowest {max(rest):.3f}; patches "
              f"{gen.stats['patches']}; rows as the first variant's: {same}/{len(out)}", flush=True)
        print(f"  attention autotuner's choices: {tuned_attention()}", flush=True)
    for name, value in defaults.items():
        setattr(*constant(name), value)


if __name__ == "__main__":
    main()
