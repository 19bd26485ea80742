"""Does a residual add fused with the next RMSNorm pay at 64 rows? A batch-64 step ran, per block,
`addmm` (x + a @ W.T, cuBLAS; for long K a split-K product and its reduction) and then RMSNorm
(3.4-4.5 µs at 64 x 2,048 on an H200, nineteenth session's trace). `bltkit.kernels.residual_norm`
keeps the product in fp32 (over S slices of K as one batched product) and adds, rounds and
normalises in one kernel. Timed here inside CUDA graphs with the weights read from HBM
(benchmarks/skinny_gemm.py's method), for each of blt-1b's residual products, µs a call:

- `addmm+norm`: the generator's path before the twentieth session;
- `residual_norm x S`: kernels.residual_norm with S slices of K (1: one fp32-output product).

It prints how far h and norm(h) are from addmm's and F.rms_norm's (the summation order differs;
the roundings are the same). Twentieth session, H200, torch 2.11 (this file's prototype of the
kernel, the same arithmetic): global wo 11.3 against 8.3 (S=1) / 8.1 (2) / 8.8 (4), global w2 16.7
against 13.9 / 11.7 / 12.8, decoder wo 8.5 against 6.6 / 6.2 / 6.4, decoder w2 11.7 against 9.5 /
7.7 / 7.5; kernels.RESIDUAL_SPLITS is 2 since.

    python benchmarks/fused_norm.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bltkit import kernels

SHAPES = {  # blt-1b residual products: (out features D, in features K)
    "global wo": (2048, 2048), "global w2": (2048, 5632), "decoder wo": (1024, 1024), "decoder w2": (1024, 2816),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4])
    args = ap.parse_args()
    from skinny_gemm import timed

    torch.manual_seed(0)
    B, eps, dev, dt = args.rows, 1e-5, "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {B} rows; µs a call")
    for name, (D, K) in SHAPES.items():
        copies = max(2, -(-(256 << 20) // (D * K * 2)))
        Ws = [torch.randn(D, K, device=dev, dtype=dt) * K ** -0.5 for _ in range(copies)]
        x, a = torch.randn(B, D, device=dev, dtype=dt), torch.randn(B, K, device=dev, dtype=dt)
        g = 1 + 0.1 * torch.randn(D, device=dev, dtype=dt)
        turn = iter(range(1 << 30))

        def w():
            return Ws[next(turn) % copies]  # noqa: B023

        def now():
            h = torch.addmm(x, a, w().t())  # noqa: B023
            return h, F.rms_norm(h, (D,), g, eps)  # noqa: B023

        cells = [f"addmm+norm {timed(now):5.1f}"]
        h0 = torch.addmm(x, a, Ws[0].t())
        n0 = F.rms_norm(h0, (D,), g, eps)
        for S in args.splits:
            h = x.clone()  # the timed calls add into their own copy, over and over
            us = timed(lambda S=S, h=h: kernels.residual_norm(h, a, w(), g, eps, splits=S))  # noqa: B023
            h = x.clone()
            n = kernels.residual_norm(h, a, Ws[0], g, eps, splits=S)
            dh = (h.float() - h0.float()).abs().max().item()
            dn = (n.float() - n0.float()).abs().max().item()
            cells.append(f"residual_norm x {S} {us:5.1f} (h {dh:.1e}, norm {dn:.1e})")
        print(f"{name} {D}x{K}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
