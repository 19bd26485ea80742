"""Can Triton products with programmatic dependent launch (PDL, Hopper) beat cuBLAS in the global
stack's chain at 64 rows? A batch-64 step spends ~1.9 of its ~2.6 ms in the global stack: per layer
four products at ~2.3 TB/s (each ~4 µs over what its weights take at HBM speed: the kernel's start
and end) and seven small kernels between them. With PDL a kernel is launched before the one it
depends on ends: it may read what does not depend on it (the weights: an L2 prefetch of its slice)
and waits (griddepcontrol.wait) before it reads the previous kernel's output.

This script times one global layer's chain, repeated over 25 layers of their own weights (the
weights come from HBM, as in a step), in one CUDA graph, four ways:

- `cublas`: the generator's products now (cuBLAS; the residual products as fp32-output bmm over 2
  slices of K, as kernels.residual_norm) with small Triton kernels standing in for RoPE, attention,
  the residual norm and SwiGLU;
- `triton`: the same with a Triton product (fp32 partial sums over S slices of K, summed by the
  kernel that reads them);
- `pdl`: every kernel launched with PDL, each waiting before it reads its input;
- `pdl-early`: the small kernels also let the next kernel start before they wait, so a product can
  prefetch its weights while the product before it still runs;
- with `--prefetch F` the products first prefetch the first F of their weight slice into L2.

It first tunes each product's blocks and slices on its own (weights from HBM), then runs the chains
and prints µs a layer. It checks every product against torch.matmul in fp32, and every Triton
variant's output against `triton`'s (0 unless a PDL wait is missing).

Twenty-first session, H200, torch 2.11, triton 3.6 (docs/benchmarks.md): cublas 65.1 µs a layer,
triton 70.5, pdl 67.0, pdl-early 67.2, pdl-fused 58.3; the products alone 39.0, the small kernels
alone 31.6; prefetching hurt (68.0 at 0.25, 71.5 at 1.0). The generator ran these products (commit
8d56717, removed in the next): in the batch-64 step, with the entropy model's kernels beside the
global stack, they took 13.2 µs a call against cuBLAS's ~10.4, and the step 2.64-2.73 ms against
2.55-2.56; PDL alone 2.59 against 2.56.

    python benchmarks/pdl_chain.py
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from skinny_gemm import timed

D, FF, HEADS, HD, M = 2048, 5632, 16, 128, 64  # blt-1b's global stack, 64 rows
SHAPES = {"qkv": (3 * D, D), "wo": (D, D), "w13": (2 * FF, D), "w2": (D, FF)}  # (N out, K in)


@triton.jit
def _prefetch(ptrs, nbytes):
    """L2 prefetch of `nbytes` from each address (cp.async.bulk.prefetch, sm_90)."""
    return tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                     [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, o_ptr, q_ptr, M, N, K, KS, sx, DQ, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GDC: tl.constexpr, PF: tl.constexpr, EPI: tl.constexpr):
    """o[s] = x[:, slice s of K] @ w[:, slice s].T in fp32 (o [S, M, N]); a program a block of
    BLOCK_N outputs and one slice of KS inputs. EPI 1 (one slice): the first DQ columns in bf16 into
    q [M, DQ], the rest into o [M, N - DQ] (stands in for RoPE and the cache writes); EPI 2 (one
    slice, w1|w3 interleaved in blocks of BLOCK_N / 2 rows): silu(a) * b in bf16 into o [M, N / 2]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.program_id(1)
    k_lo = s * KS
    if PF > 0:
        _prefetch(w_ptr + n.to(tl.int64) * K + k_lo, tl.full([BLOCK_N], PF * 2, tl.int32))
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + KS, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * sx + k[None, :], mask=(m < M)[:, None], other=0.0)
        w = tl.load(w_ptr + n[None, :] * K + k[:, None])
        acc = tl.dot(x, w, acc)
    rows = (m < M)[:, None]
    if EPI == 0:
        tl.store(o_ptr + (s * M + m[:, None]) * N + n[None, :], acc, mask=rows)
    elif EPI == 1:
        dt = q_ptr.dtype.element_ty
        if tl.program_id(0) * BLOCK_N < DQ:
            tl.store(q_ptr + m[:, None] * DQ + n[None, :], acc.to(dt), mask=rows)
        else:
            tl.store(o_ptr + m[:, None] * (N - DQ) + (n - DQ)[None, :], acc.to(dt), mask=rows)
    else:
        a, g = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
        f = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y = a / (1.0 + tl.exp(-a)) * g
        tl.store(o_ptr + m[:, None] * (N // 2) + f[None, :], y.to(o_ptr.dtype.element_ty), mask=rows)


@triton.jit
def _gate(GDC: tl.constexpr, EARLY: tl.constexpr):
    if GDC:
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _parts(p_ptr, S, M, N, row, cols, ok):
    t = tl.zeros(cols.shape, dtype=tl.float32)
    for s in range(S):
        t += tl.load(p_ptr + (s * M + row) * N + cols, mask=ok, other=0.0).to(tl.float32)
    return t


@triton.jit
def _take_q_kernel(y_ptr, q_ptr, S, M, N, DQ, BLOCK: tl.constexpr, GDC: tl.constexpr, EARLY: tl.constexpr):
    """Stands in for rope_write: q = the first DQ columns of the summed partials, in bf16."""
    _gate(GDC, EARLY)
    b = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    q = _parts(y_ptr, S, M, N, b, c, c < DQ)
    tl.store(q_ptr + b * DQ + c, q.to(q_ptr.dtype.element_ty), mask=c < DQ)


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, NH: tl.constexpr, H: tl.constexpr, BLOCK_T: tl.constexpr,
                   GDC: tl.constexpr, EARLY: tl.constexpr):
    """Stands in for kernels.attend: one query a row and head over T cached positions."""
    _gate(GDC, EARLY)
    b, hd = tl.program_id(0), tl.program_id(1)
    h = tl.arange(0, H)
    t = tl.arange(0, BLOCK_T)
    q = tl.load(q_ptr + (b * NH + hd) * H + h).to(tl.float32)
    base = ((b * NH + hd) * BLOCK_T + t[:, None]) * H + h[None, :]
    k = tl.load(k_ptr + base, mask=(t < T)[:, None], other=0.0).to(tl.float32)
    sc = tl.where(t < T, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
    p = tl.exp(sc - tl.max(sc, axis=0))
    v = tl.load(v_ptr + base, mask=(t < T)[:, None], other=0.0).to(tl.float32)
    o = tl.sum(v * p[:, None], axis=0) / tl.sum(p, axis=0)
    tl.store(o_ptr + (b * NH + hd) * H + h, o.to(o_ptr.dtype.element_ty))


@triton.jit
def _add_norm_kernel(x_ptr, p_ptr, g_ptr, n_ptr, S, M, N, eps, BLOCK: tl.constexpr, GDC: tl.constexpr,
                     EARLY: tl.constexpr):
    """x += sum of the partials (one rounding), then RMSNorm(x) * g (kernels.residual_norm's)."""
    _gate(GDC, EARLY)
    b = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < N
    h = (tl.load(x_ptr + b * N + c, mask=ok, other=0.0).to(tl.float32) + _parts(p_ptr, S, M, N, b, c, ok))
    h = h.to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + b * N + c, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    g = tl.load(g_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(n_ptr + b * N + c, (hf * rstd * g).to(n_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_kernel(y_ptr, o_ptr, S, M, F2, FH, BLOCK: tl.constexpr, GDC: tl.constexpr, EARLY: tl.constexpr):
    """silu(a) * b over the summed partials of [a | b]."""
    _gate(GDC, EARLY)
    b = tl.program_id(0)
    for f0 in range(0, FH, BLOCK):
        c = f0 + tl.arange(0, BLOCK)
        ok = c < FH
        a = _parts(y_ptr, S, M, F2, b, c, ok)
        g = _parts(y_ptr, S, M, F2, b, c + FH, ok)
        tl.store(o_ptr + b * FH + c, (a / (1.0 + tl.exp(-a)) * g).to(o_ptr.dtype.element_ty), mask=ok)


class Cfg:
    def __init__(self, bn, bk, splits, warps, stages):
        self.bn, self.bk, self.splits, self.warps, self.stages = bn, bk, splits, warps, stages

    def __repr__(self):
        return f"BN{self.bn} BK{self.bk} S{self.splits} w{self.warps} st{self.stages}"


def mm(x, w, out, cfg: Cfg, gdc=False, pf=0.0, epi=0, q=None):
    """out [S, M, N] fp32 partial products of x @ w.T (or an epilogue's, `_mm_kernel`)."""
    N, K = w.shape
    KS = K // cfg.splits
    pf_k = int(KS * pf) // 64 * 64
    _mm_kernel[(N // cfg.bn, cfg.splits)](x, w, out, out if q is None else q, x.shape[0], N, K, KS, x.stride(0),
                                          0 if q is None else q.shape[1], BLOCK_M=64, BLOCK_N=cfg.bn,
                                          BLOCK_K=cfg.bk, GDC=gdc, PF=pf_k, EPI=epi, num_warps=cfg.warps,
                                          num_stages=cfg.stages, launch_pdl=gdc)
    return out


def candidates(N, K):
    out = []
    for bn, bk, splits in itertools.product((32, 64, 128, 256), (64, 128), (1, 2, 4, 8)):
        KS = K // splits
        progs = N // bn * splits
        if N % bn or K % splits or KS % bk or not 96 <= progs <= 600:
            continue
        stages = 4 if (bn + 64) * bk * 2 * 4 <= 200_000 else 3
        for warps in ((4,) if bn <= 64 else (4, 8) if bn == 128 else (8,)):
            out.append(Cfg(bn, bk, splits, warps, stages))
    return out


def tune(name, N, K, top):
    copies = max(2, -(-(256 << 20) // (N * K * 2)))
    Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ Ws[0].float().t()
    turn = itertools.count()
    t_cublas = timed(lambda: F.linear(x, Ws[next(turn) % copies]))
    t_bmm = timed(lambda: torch.bmm(x.view(M, 2, K // 2).transpose(0, 1),
                                    Ws[next(turn) % copies].view(N, 2, K // 2).permute(1, 2, 0),
                                    out_dtype=torch.float32))
    res = []
    for cfg in candidates(N, K):
        out = torch.empty(cfg.splits, M, N, device="cuda", dtype=torch.float32)
        try:
            mm(x, Ws[0], out, cfg)
            err = (out.sum(0) - ref).abs().max().item() / ref.abs().max().item()
            t = timed(lambda: mm(x, Ws[next(turn) % copies], out, cfg))  # noqa: B023
        except Exception as e:  # a configuration that does not compile or fit
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        res.append((t, cfg, err))
    res.sort(key=lambda r: r[0])
    mb = N * K * 2 / 1e6
    print(f"{name} {N}x{K} ({mb:.1f} MB): cuBLAS x@W.T {t_cublas:.1f} µs, bmm fp32 x2 {t_bmm:.1f}; Triton best:")
    for t, cfg, err in res[:top]:
        print(f"  {t:6.1f} µs ({mb / t:.2f} TB/s) {cfg} (rel err {err:.1e})")
    Ws.clear()
    torch.cuda.empty_cache()
    return [cfg for _, cfg, _ in res]


def chain(best, one, layers, variant, pf, T):
    """One graph of `layers` global layers; µs a layer. Variants past the four of the module's
    docstring: `pdl-fused` (the q|k|v product writes q and k|v, the w1|w3 product SwiGLU's output:
    two kernels a layer fewer), `products` and `small` (pdl, the products or the small kernels
    alone)."""
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    W = [{k: torch.randn(n, kk, device=dev, dtype=dt) * kk ** -0.5 for k, (n, kk) in SHAPES.items()}
         for _ in range(layers)]
    g = [1 + 0.1 * torch.randn(D, device=dev, dtype=dt) for _ in range(layers)]
    kc = [torch.randn(M, HEADS, 64, HD, device=dev, dtype=dt) for _ in range(layers)]
    vc = [torch.randn(M, HEADS, 64, HD, device=dev, dtype=dt) for _ in range(layers)]
    x = torch.randn(M, D, device=dev, dtype=dt)
    xn = torch.empty_like(x)
    q, o = torch.empty(M, D, device=dev, dtype=dt), torch.empty(M, D, device=dev, dtype=dt)
    hn, m = torch.empty_like(x), torch.empty(M, FF, device=dev, dtype=dt)
    tri = variant != "cublas"
    gdc = variant.startswith("pdl") or variant in ("products", "small")
    fused = variant == "pdl-fused"
    kv = torch.empty(M, 2 * D, device=dev, dtype=dt)
    half = FF // (one["w13"].bn // 2)  # w1|w3 interleaved in blocks of bn / 2 rows, for the fused SwiGLU
    W13i = [w["w13"].view(2, half, one["w13"].bn // 2, D).transpose(0, 1).reshape(2 * FF, D) for w in W]
    early = variant == "pdl-early"
    parts = {k: torch.empty(best[k].splits if tri else 2, M, SHAPES[k][0], device=dev, dtype=torch.float32)
             for k in SHAPES}
    small = dict(GDC=gdc, EARLY=early, launch_pdl=gdc)

    def product(k, a, w):
        if tri:
            return mm(a, w, parts[k], best[k], gdc=gdc, pf=pf)
        if k in ("qkv", "w13"):
            return F.linear(a, w)[None]
        N, K = w.shape
        return torch.bmm(a.view(M, 2, K // 2).transpose(0, 1), w.view(N, 2, K // 2).permute(1, 2, 0),
                         out_dtype=torch.float32)

    do_mm, do_small = variant != "small", variant != "products"

    def run():
        _add_norm_kernel[(M,)](x, parts["w2"], g[0], xn, 0, M, D, 1e-5, BLOCK=D, **small)
        for i in range(layers):
            if fused:
                mm(xn, W[i]["qkv"], kv, one["qkv"], gdc=True, epi=1, q=q)
            else:
                y = product("qkv", xn, W[i]["qkv"]) if do_mm else parts["qkv"]
                if do_small:
                    _take_q_kernel[(M,)](y, q, y.shape[0], M, 3 * D, D, BLOCK=D, **small)
            if do_small:
                _attend_kernel[(M, HEADS)](q, kc[i], vc[i], o, T, HD ** -0.5, NH=HEADS, H=HD, BLOCK_T=64, **small)
            p = product("wo", o, W[i]["wo"]) if do_mm else parts["wo"]
            if do_small:
                _add_norm_kernel[(M,)](x, p, g[i], hn, p.shape[0], M, D, 1e-5, BLOCK=D, **small)
            if fused:
                mm(hn, W13i[i], m, one["w13"], gdc=True, epi=2)
            else:
                y = product("w13", hn, W[i]["w13"]) if do_mm else parts["w13"]
                if do_small:
                    _swiglu_kernel[(M,)](y, m, y.shape[0], M, 2 * FF, FF, BLOCK=1024, **small)
            p = product("w2", m, W[i]["w2"]) if do_mm else parts["w2"]
            if do_small:
                _add_norm_kernel[(M,)](x, p, g[i], xn, p.shape[0], M, D, 1e-5, BLOCK=D, **small)

    x0 = x.clone()
    run()
    torch.cuda.synchronize()
    out = xn.float().clone()
    x.copy_(x0)
    t = timed(run, reps=1) / layers
    return t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--keys", type=int, default=40, help="cached patches a row the attention reads")
    ap.add_argument("--prefetch", type=float, nargs="*", default=[0.25, 1.0])
    ap.add_argument("--variants", default="cublas,triton,pdl,pdl-early,pdl-fused,products,small")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {M} rows")
    tuned = {k: tune(k, *SHAPES[k], args.top) for k in SHAPES}
    best = {k: v[0] for k, v in tuned.items()}
    one = {k: next(c for c in v if c.splits == 1) for k, v in tuned.items() if k in ("qkv", "w13")}
    print("chosen:", best, "one slice:", one)
    outs = {}
    runs = [(v, 0.0) for v in args.variants.split(",")]
    runs += [(v, pf) for v in ("pdl", "pdl-early") if v in args.variants.split(",") for pf in args.prefetch]
    for variant, pf in runs:
        try:
            t, out = chain(best, one, args.layers, variant, pf, args.keys)
        except Exception as e:
            print(f"{variant} prefetch {pf}: {type(e).__name__}: {str(e)[:300]}")
            continue
        outs.setdefault(variant, out)
        ref = outs.get("triton", next(iter(outs.values())))
        diff = (out - ref).abs().max().item()  # 0 for every Triton variant unless a wait is missing
        print(f"{variant:10s} prefetch {pf:4.2f}: {t:6.1f} µs a layer ({args.layers} layers; "
              f"max |diff| from triton's output {diff:.2e})", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
