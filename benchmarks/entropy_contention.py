"""What the entropy model beside the global stack costs a step of many rows (overlapping: the
global step runs for every row on the main stream while the entropy model runs on a second one).

    python benchmarks/entropy_contention.py --batch 64

Times the step as it is, then with the entropy model's step replaced by nothing (its last
entropies kept, so the boundaries are stale and the text differs: a timing, not a generation),
twice each, in one process. The difference is what the entropy model's kernels take from the
chain of the step (twenty-second session, H200, blt-1b bf16: 2.44-2.45 against 2.25-2.26 ms).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import SAMPLE_TEXT, calibrate_threshold, random_model, with_threshold

from bltkit.bytes import encode
from bltkit.generate import Generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt length in ids (BOS included)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("entropy_contention.py times CUDA streams: it needs a GPU")
    model = random_model(args.preset, [], "cuda", torch.bfloat16)
    calib = torch.tensor([encode(SAMPLE_TEXT * 4)], device="cuda")
    with_threshold(model, calibrate_threshold(model, calib, 4.5))
    text = (SAMPLE_TEXT * (args.prompt_len // len(SAMPLE_TEXT) + 2)).encode()
    prompts = [text[:args.prompt_len - 1]] * args.batch
    real = Generator._entropy_step
    variants = [("as it is", real), ("no entropy model", lambda self, x: self.H)] * 2
    try:
        for name, step in variants:
            Generator._entropy_step = step  # read as the steps are traced and captured
            gen = Generator(model, cuda_graphs=True, kernels=True)
            gen.generate_ids(prompts, 16, stop_at_eos=False)  # warm-up and capture
            times = []
            for _ in range(2):
                gen.generate_ids(prompts, args.steps, stop_at_eos=False)
                times.append(gen.stats["decode_s"] / args.steps * 1e3)
            print(f"batch {args.batch}, {name}: {min(times):.3f} ms/step (overlapping {gen.overlapping}), "
                  f"{gen.stats['patches']} patches", flush=True)
            gen = None  # its graphs and caches freed before the next
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        Generator._entropy_step = real


if __name__ == "__main__":
    main()
