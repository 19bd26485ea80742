"""The products of a batch-64 generation step on their own: cuBLAS as the generator calls it
(x @ W.T, rows of x the batch) against the transposed call (W @ x.T: the weights' rows as the long
side), with each BLAS library PyTorch offers, timed inside CUDA graphs (as the generator replays
them). Prints µs a call and the bandwidth over the weights' bytes.

    python benchmarks/skinny_gemm.py --rows 64
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {  # blt-1b: (out features, in features)
    "global q|k|v": (6144, 2048), "global wo": (2048, 2048), "global w1|w3": (11264, 2048),
    "global w2": (2048, 5632), "decoder q|k|v": (3072, 1024), "decoder w1|w3": (5632, 1024),
    "decoder w2": (1024, 2816), "decoder wo": (1024, 1024),
}


def timed(fn, reps: int = 50) -> float:
    """µs a call, `reps` calls captured in one CUDA graph, best of 5 replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    return best


def measure(M: int, N: int, K: int) -> str:
    """One shape with each BLAS library: µs a call for x @ W.T, the residual addmm, W @ x.T.
    Every call takes the next of several weight copies (>= 256 MB in all), so the weights come
    from HBM as in a step, not from the 50 MB L2."""
    copies = max(2, -(-(256 << 20) // (N * K * 2)))
    Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    xt = x.t().contiguous()  # [K, M]
    res = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    out_t = torch.empty(N, M, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, Ws[0]).float()
    turn = iter(range(1 << 30))

    def w():
        return Ws[next(turn) % copies]

    cells = []
    for lib in ("default", "cublas", "cublaslt"):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        try:
            t_lin = timed(lambda: torch.nn.functional.linear(x, w()))
            t_add = timed(lambda: res.addmm(x, w().t()))
            t_tr = timed(lambda: torch.mm(w(), xt, out=out_t))
            err = (torch.mm(Ws[0], xt).t().float() - ref).abs().max().item()
            cells.append(f"{lib}: x@W.T {t_lin:6.1f} addmm {t_add:6.1f} W@x.T {t_tr:6.1f} (diff {err:.1e})")
        except RuntimeError as e:
            cells.append(f"{lib}: {type(e).__name__}")
        finally:
            torch.backends.cuda.preferred_blas_library("default")
    return " | ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[8, 64])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; default BLAS "
          f"{torch.backends.cuda.preferred_blas_library()}")
    for M in args.rows:
        for name, (N, K) in SHAPES.items():
            mb = N * K * 2 / 1e6
            print(f"M={M:3d} {name:15s} {N:5d}x{K:5d} ({mb:5.1f} MB, {mb / 4.8e3 * 1e3:.1f} µs at 4.8 TB/s) | "
                  + measure(M, N, K), flush=True)


if __name__ == "__main__":
    main()
