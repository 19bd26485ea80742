"""`bltkit.kernels.attend` at 64 rows, each launch configuration on its own, with the first block of
keys loaded with the row's bounds (kernels.ATTEND_FIRST_BLOCK) and after them: the attention calls
of a blt-1b batch-64 step (the global stack's as the generator runs it, RoPE and the cache writes
in the kernel and each row bounded by its first and own slot, over ~14, ~42 and ~64 patches a row;
the decoder's and the entropy model's rings with their masks), timed inside CUDA graphs as the
generator replays them. The autotuner picks a configuration once per key, on the first call, when a
generator's caches hold its warm-up's few keys; this shows what each costs once they have filled.

    python benchmarks/attend_configs.py
"""

from __future__ import annotations

import torch
from skinny_gemm import timed

from bltkit import kernels

# (name, rows, query heads, key/value heads, head dim, cache slots, slots a row sees, kind): kind
# "mask" an additive mask, "rope" the global step's rope_attend with first/last bounds, "plain"
# every slot (as the cross-attention over a patch's units)
CASES = [
    ("global rope_attend, 14 patches", 64, 16, 16, 128, 256, 14, "rope"),
    ("global rope_attend, 42 patches", 64, 16, 16, 128, 256, 42, "rope"),
    ("global rope_attend, 64 patches", 64, 16, 16, 128, 256, 64, "rope"),
    ("decoder ring, 150 bytes", 64, 16, 16, 64, 256, 150, "mask"),
    ("entropy ring, 150 bytes", 64, 12, 12, 64, 256, 150, "mask"),
]
CANDIDATES = [(16, 1), (32, 1), (32, 2), (64, 2), (64, 4), (64, 8), (128, 4)]  # (BLOCK_S, warps)


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    defaults = kernels.ATTEND_FIRST_BLOCK, kernels.ATTEND_CONFIG
    for name, B, N, NK, H, S, seen, kind in CASES:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(B, NK, S, H, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, NK, S, H, device=dev, dtype=dt, generator=g)
        bytes_read = 2 * B * NK * seen * H * 2
        rope = kind == "rope"
        if rope:
            y = torch.randn(B, (N + 2 * NK) * H, device=dev, dtype=dt, generator=g)
            cos = torch.rand(B, H // 2, device=dev, generator=g)
            sin = torch.rand(B, H // 2, device=dev, generator=g)
            first = torch.zeros(B, device=dev, dtype=torch.long)
            last = torch.full((B,), seen - 1, device=dev, dtype=torch.long)

            def call():
                return kernels.rope_attend(y, cos, sin, N, k, v, last, None, last=last, first=first)  # noqa: B023
        else:
            q = torch.randn(B, N, H, device=dev, dtype=dt, generator=g)
            mask = torch.zeros(B, 1, 1, S, device=dev, dtype=dt) if kind == "mask" else None
            last = torch.full((B,), seen - 1, device=dev, dtype=torch.long) if kind == "mask" else None

            def call():
                return kernels.attend(q, k, v, mask, last=last)  # noqa: B023
        line = []
        for early in (True, False):
            kernels.ATTEND_FIRST_BLOCK = early
            kernels.ATTEND_CONFIG = {}
            kernels._attend_kernel.cache.clear()
            tuned = timed(call)
            rows = []
            for block, warps in CANDIDATES:
                kernels.ATTEND_CONFIG = {(H, rope): (block, warps)}
                rows.append((timed(call), block, warps))
            rows.sort()
            best = ", ".join(f"{b}x{w} {us:.1f}" for us, b, w in rows[:3])
            line.append(f"{'early' if early else 'late'}: tuned {tuned:.1f} µs ({bytes_read / tuned / 1e6:.2f} TB/s), "
                        f"best {best}, worst {rows[-1][0]:.1f}")
        print(f"{name}: " + "; ".join(line), flush=True)
    kernels.ATTEND_FIRST_BLOCK, kernels.ATTEND_CONFIG = defaults
    kernels._attend_kernel.cache.clear()


if __name__ == "__main__":
    main()
