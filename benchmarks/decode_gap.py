"""Why a batch-64 step costs more in the grid than in the profile (issue 4).

The twenty-fifth session's grid (`generate.py`, 128 new bytes after 64 distinct 64-byte prompts)
made 25,984 bytes/s, 2.46 ms a step, where `profile_generate.py --batch 64 --steps 32` (one
prompt repeated, 32 steps) timed 2.26 ms. This times `Generator.generate_ids` at 64 rows under
each combination of what differs: the prompts (one repeated, or the grid's), the number of steps
(32, 128) and how often the bytes are read back (`generate.READ_EVERY`: a host sync each time,
and `generate.READ_AHEAD`, reading them without waiting), and prints the step's time on the GPU
(CUDA events around each step, no sync between them): mean, median, the slowest, and the first
step against the rest.

    python benchmarks/decode_gap.py
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
from _common import SAMPLE_TEXT, calibrate_threshold, random_model, with_threshold
from generate import prompts_of

from bltkit import generate
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--read-every", type=int, nargs="+", default=[16, 4096])
    ap.add_argument("--read-ahead", choices=("on", "off", "both"), default="both")
    args = ap.parse_args()
    model = random_model("blt-1b", [], "cuda", torch.bfloat16)
    calib = torch.tensor([encode(SAMPLE_TEXT * 4)], device="cuda")
    with_threshold(model, calibrate_threshold(model, calib, 4.5))
    text = (SAMPLE_TEXT * (args.prompt_len // len(SAMPLE_TEXT) + 2)).encode()
    prompt_sets = {"one repeated": [text[:args.prompt_len - 1]] * args.batch,
                   "grid's": prompts_of(args.prompt_len, args.batch)}
    aheads = {"on": [True], "off": [False], "both": [False, True]}[args.read_ahead]
    gen = Generator(model, kernels=True, speculate=True)
    for name, prompts in prompt_sets.items():
        for steps in args.steps:
            for every in args.read_every:
                for ahead in aheads:
                    generate.READ_EVERY, generate.READ_AHEAD = every, ahead
                    gc.collect()
                    gen.generate_ids([p[:16] for p in prompts], 8, stop_at_eos=False)  # as the grid warms up
                    ms, gaps = timed_steps(gen, prompts, steps)
                    rest = gaps[1:]
                    print(f"{name} prompts, {steps} steps, read every {every}, ahead {ahead}: {ms:.3f} ms a step "
                          f"(host); GPU, start to start: mean {statistics.mean(gaps):.3f}, median "
                          f"{statistics.median(gaps):.3f}, first {gaps[0]:.3f}, slowest of the rest "
                          f"{max(rest):.3f} at step {1 + rest.index(max(rest))}, patches {gen.stats['patches']}",
                          flush=True)


if __name__ == "__main__":
    main()
