"""What ahead-of-time compilation (AOTInductor) would buy the generator's step functions on a CPU,
where a small model's byte step is bound by per-operator overhead, not by arithmetic.

    python benchmarks/cpu_aoti.py [--preset tiny | --model DIR|bundled] [--threads 1] [--steps front back patch]

Each step function (Generator._fns: front = entropy model and encoder, back = decoder and the
next byte, patch = the global step) is exported (torch.export, non-strict) with the generator's
state tensors as inputs that it writes in place and the model's weights as constants, compiled
with `torch._inductor.aoti_compile_and_package`, and timed against the eager call from the same
state (after a 64-byte prefill). It also checks that 20 compiled calls leave the same state as
20 eager calls (within 1e-5). An exploration, not a code path of bltkit: the generator does not
use AOTInductor (docs/benchmarks.md, sixteenth session, says why).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import SAMPLE_TEXT, random_model

from bltkit.bundled import bundled_model_dir
from bltkit.checkpoint import load_model
from bltkit.generate import Generator


class _Step(torch.nn.Module):
    """A step function as a module: forward(*state) runs it on the given state tensors (the
    generator's attributes rebound to them for the call), so export sees them as inputs."""

    def __init__(self, gen: Generator, name: str, names: list[str]):
        super().__init__()
        self.model = gen.model  # the weights: parameters of this module, constants once compiled
        self.gen, self.name, self.names = gen, name, names

    def _swap(self, values) -> list[torch.Tensor]:
        old = []
        for key, v in zip(self.names, values, strict=True):
            ring, _, attr = key.rpartition(".")  # "x" or "enc.k" (_state_tensors' names)
            owner = getattr(self.gen, ring) if ring else self.gen
            old.append(getattr(owner, attr))
            setattr(owner, attr, v)
        return old

    def forward(self, *values):
        old = self._swap(values)
        try:
            self.gen._fns[self.name]()
        finally:
            self._swap(old)


def timed(fn, restore, calls: int, rounds: int = 5) -> float:
    """µs a call, from the restored state each round."""
    total = 0.0
    for _ in range(rounds):
        restore()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        total += time.perf_counter() - t
    return total / (rounds * calls) * 1e6


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="random weights of this preset (default tiny)")
    ap.add_argument("--model", help="a model directory instead, or 'bundled' (the shipped model)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--steps", nargs="+", default=["front", "back", "patch"], choices=["front", "back", "patch"])
    ap.add_argument("--calls", type=int, default=100, help="calls a timing round (default 100)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        what = args.model
        model = load_model(bundled_model_dir() if args.model == "bundled" else args.model, "cpu", torch.float32)
    else:
        what = args.preset
        model = random_model(args.preset, [], "cpu", torch.float32)
    gen = Generator(model)
    prompt = torch.tensor([list(SAMPLE_TEXT.encode()[:64])])
    gen._init_state(1, 64 + 4 * args.calls, [0])  # room for a round of steps past the prompt
    gen._prefill(prompt)
    gen.close.fill_(True)  # the patch step commits its patch
    state = gen._state_tensors()
    names = sorted(state)
    snapshot = {k: v.clone() for k, v in state.items()}

    def restore() -> None:
        for k, v in state.items():
            v.copy_(snapshot[k])

    values = tuple(state[k] for k in names)
    print(f"{what} on the CPU, fp32, {args.threads} thread(s), torch {torch.__version__}; "
          f"{len(names)} state tensors as inputs")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.steps:
            eager = gen._fns[name]
            t = time.perf_counter()
            ep = torch.export.export(_Step(gen, name, names), values, strict=False)
            path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, f"{name}.pt2"))
            built = time.perf_counter() - t
            compiled = torch._inductor.aoti_load_package(path)
            run = compiled.loader.run  # the package's runner without the pytree flattening

            restore()
            for _ in range(20):
                eager()
            want = {k: v.clone() for k, v in state.items()}
            restore()
            for _ in range(20):
                run(list(values))
            differ = [k for k, v in state.items()
                      if not torch.allclose(v, want[k], rtol=1e-5, atol=1e-5, equal_nan=True)]
            us_eager = timed(eager, restore, args.calls)
            us_aoti = timed(lambda run=run: run(list(values)), restore, args.calls)
            print(f"{name:6s} eager {us_eager:7.1f} µs | AOTInductor {us_aoti:7.1f} µs ({us_eager / us_aoti:.1f}x; "
                  f"export and compile {built:.1f} s) | state after 20 calls: "
                  f"{'the same' if not differ else 'DIFFERS in ' + ', '.join(differ)}")


if __name__ == "__main__":
    main()
