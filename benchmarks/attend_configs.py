"""`bltkit.kernels.attend` at 64 rows, each launch configuration on its own: the attention calls of
a blt-1b batch-64 step (global stack over ~40 or ~150 patches a row, the decoder's and the
entropy model's rings, the decoder's cross-attention over a patch's 2 units), timed inside CUDA
graphs as the generator replays them. The autotuner picks a configuration once per key, on the
first call, when the caches are nearly empty; this shows what each costs once they have filled.

    python benchmarks/attend_configs.py
"""

from __future__ import annotations

import torch
from skinny_gemm import timed

from bltkit import kernels

# (name, rows, query heads, key/value heads, head dim, cache slots, slots a row sees, additive mask)
CASES = [
    ("global, 40 patches", 64, 16, 16, 128, 256, 40, True),
    ("global, 150 patches", 64, 16, 16, 128, 256, 150, True),
    ("decoder ring, 150 bytes", 64, 16, 16, 64, 256, 150, True),
    ("entropy ring, 150 bytes", 64, 12, 12, 64, 256, 150, True),
    ("decoder cross, 2 units", 64, 16, 16, 64, 2, 2, False),
]
EXTRA = [{"BLOCK_S": 16}, {"BLOCK_S": 32}, {"BLOCK_S": 64}, {"BLOCK_S": 128}]


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    tuner = kernels._attend_kernel
    configs = list(tuner.configs)
    candidates = [(c.kwargs, c.num_warps) for c in configs] + [(o, w) for o in EXTRA for w in (1, 2, 4, 8)]
    for name, B, N, NK, H, S, seen, masked in CASES:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, N, H, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, NK, S, H, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, NK, S, H, device=dev, dtype=dt, generator=g)
        mask = torch.zeros(B, 1, 1, S, device=dev, dtype=dt) if masked else None
        last = torch.full((B,), seen - 1, device=dev, dtype=torch.long) if masked else None
        bytes_read = 2 * B * NK * seen * H * 2
        rows = []
        for opts, warps in candidates:
            tuner.configs = [kernels.triton.Config(dict(opts), num_warps=warps)]
            tuner.cache.clear()
            us = timed(lambda: kernels.attend(q, k, v, mask, last=last))  # noqa: B023
            rows.append((us, opts["BLOCK_S"], warps))
        tuner.configs = configs
        tuner.cache.clear()
        tuned = timed(lambda: kernels.attend(q, k, v, mask, last=last))  # noqa: B023
        rows.sort()
        best = ", ".join(f"BLOCK_S {b} x {w} warps {us:.1f} µs" for us, b, w in rows[:4])
        print(f"{name}: tuned {tuned:.1f} µs ({bytes_read / tuned / 1e6:.2f} TB/s); best: {best}; "
              f"worst {rows[-1][0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
