"""Would a residual add fused with the next RMSNorm pay at 64 rows? A batch-64 step runs, per global
layer, `addmm` (x + a @ W.T, cuBLAS; for w2 a split-K product and its reduction) and then RMSNorm
(PyTorch's kernel, 3.4-4.5 µs at 64 x 2,048 on an H200, nineteenth session's trace): 50 norms of
the global stack and 27 of the decoder on the step's chain. Here, timed inside CUDA graphs with
the weights read from HBM (benchmarks/skinny_gemm.py's method), for each of blt-1b's residual
products at 64 rows:

- `addmm+norm`: what the generator runs now;
- `mm32+add_norm`: the product with an fp32 output (`torch.mm(..., out_dtype=torch.float32)`),
  then one Triton kernel (a prototype, below) that adds the residual, rounds h to the model's
  dtype as addmm does, and normalises h (the next norm's weight);
- `bmm32 x S+add_norm`: the same with the split over K done here (a batched product over S
  slices of K) and summed by the kernel, in place of cuBLAS's split-K and its reduction.

It prints µs a call for each and how far h and norm(h) are from the current path (the summation
order differs; the roundings are the same). `--check` runs the kernel under Triton's interpreter
on a CPU against the PyTorch path.

    python benchmarks/fused_norm.py
"""

from __future__ import annotations

import argparse
import os
import sys

if "--check" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {  # blt-1b residual products: (out features D, in features K)
    "global wo": (2048, 2048), "global w2": (2048, 5632), "decoder wo": (1024, 1024), "decoder w2": (1024, 2816),
}


@triton.jit
def _add_norm_kernel(x_ptr, acc_ptr, g_ptr, h_ptr, n_ptr, B, D, S, eps, BLOCK: tl.constexpr):
    """Row b: h = x + sum over s of acc[s] (fp32), rounded to x's dtype; then n = RMSNorm(h) * g."""
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK)
    ok = d < D
    h = tl.load(x_ptr + b * D + d, mask=ok, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(S):
        total += tl.load(acc_ptr + (s * B + b) * D + d, mask=ok, other=0.0)
    dt = h_ptr.dtype.element_ty
    h = (h + total).to(dt)
    tl.store(h_ptr + b * D + d, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    g = tl.load(g_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(n_ptr + b * D + d, (hf * rstd * g).to(dt), mask=ok)


def add_norm(x: torch.Tensor, acc_SBD: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = x.shape
    h, n = torch.empty_like(x), torch.empty_like(x)
    _add_norm_kernel[(B,)](x, acc_SBD, g, h, n, B, D, acc_SBD.shape[0], eps, BLOCK=triton.next_power_of_2(D))
    return h, n


def mm32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T summed in fp32 and kept in fp32 (on a CPU, for --check, from fp32 copies)."""
    if a.is_cuda:
        return torch.mm(a, w.t(), out_dtype=torch.float32)
    return a.float() @ w.float().t()


def bmm32(a: torch.Tensor, w: torch.Tensor, S: int) -> torch.Tensor:
    """[S, B, D]: the products over S slices of K (a [B, K], w [D, K])."""
    B, K = a.shape
    D = w.shape[0]
    a_s = a.view(B, S, K // S).transpose(0, 1)  # S B K/S
    w_s = w.view(D, S, K // S).permute(1, 2, 0)  # S K/S D
    return torch.bmm(a_s, w_s, out_dtype=torch.float32)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    return ((got.float() - want) / ulp).abs().max().item()


def check() -> None:
    torch.manual_seed(0)
    for name, (D, K) in SHAPES.items():
        B = 8
        x, a = torch.randn(B, D, dtype=torch.bfloat16), torch.randn(B, K, dtype=torch.bfloat16)
        w, g = torch.randn(D, K, dtype=torch.bfloat16) * K ** -0.5, 1 + 0.1 * torch.randn(D, dtype=torch.bfloat16)
        h_ref = torch.addmm(x.float(), a.float(), w.float().t()).to(torch.bfloat16)
        n_ref = F.rms_norm(h_ref.float(), (D,), g.float(), 1e-5)
        h, n = add_norm(x, mm32(a, w)[None].contiguous(), g, 1e-5)
        # in bf16 ulps of the reference; the interpreter truncates its bf16 casts (tests/test_kernels.py),
        # so up to 1 where a GPU rounds to nearest
        print(f"{name}: h within {_ulps(h, h_ref.float()):.2f} ulp, norm within {_ulps(n, n_ref):.2f} ulp")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--splits", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--check", action="store_true", help="the kernel under Triton's interpreter, on a CPU")
    args = ap.parse_args()
    if args.check:
        return check()
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
        h0, n0 = torch.addmm(x, a, Ws[0].t()), F.rms_norm(torch.addmm(x, a, Ws[0].t()), (D,), g, eps)
        variants = [("mm32+add_norm", lambda: add_norm(x, mm32(a, w())[None], g, eps), lambda: mm32(a, Ws[0])[None])]  # noqa: B023
        for S in args.splits:
            if K % S == 0:
                variants.append((f"bmm32 x {S}+add_norm", lambda S=S: add_norm(x, bmm32(a, w(), S), g, eps),  # noqa: B023
                                 lambda S=S: bmm32(a, Ws[0], S)))  # noqa: B023
        for label, fn, acc0 in variants:
            try:
                us = timed(fn)
                h, n = add_norm(x, acc0().contiguous(), g, eps)
                dh = (h.float() - h0.float()).abs().max().item()
                dn = (n.float() - n0.float()).abs().max().item()
                cells.append(f"{label} {us:5.1f} (h {dh:.1e}, norm {dn:.1e})")
            except RuntimeError as e:
                cells.append(f"{label}: {type(e).__name__}: {str(e)[:80]}")
        print(f"{name} {D}x{K}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
