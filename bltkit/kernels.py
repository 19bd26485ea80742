"""Triton kernels for the generator's one-position block step (optional: needs `triton`).

A byte step on a GPU is bound by its count of small kernels, not by bandwidth (docs/benchmarks.md:
~1-2 µs an elementwise kernel, 4-9 µs a matrix-vector product). Eighteen kernels here replace the
chains of a step that surround its matrix-vector products, and its attention call:

- `norm_qkv_rope`: RMSNorm, the q|k|v product, RoPE on q and k, and the write of k and v into the
  caches at the step's slot (a ring's, or each row's next patch slot in the global cache): one
  kernel for what took seven (norm, product, two casts and the rotation product, two cache writes).
  A program computes a share of one head's features (tuned: 4 to 64 rotation pairs).
- `rope_write`: the same after a q|k|v product made elsewhere (cuBLAS, for batches over a few
  rows): RoPE and the cache writes, one kernel for five.
- `norm_swiglu`: RMSNorm, the w1|w3 product and silu(a) * b: one kernel for four.
- `swiglu`: silu(a) * b after a w1|w3 product made elsewhere (cuBLAS, for batches over a few
  rows): one kernel for two strided elementwise kernels.
- `norm_cross_attend`: the decoder's cross-attention step without its output projection: RMSNorm,
  the q product and attention over the patch's few cached keys (cross_attn_k of them): one
  kernel for the norm, product, layout copy and attention call.
- `cross_attend`: the same after the norm for batches over a few rows: blocks of rows share each
  tile of a head's q weights (`tl.dot`), then each row's attention over its patch's units: one
  kernel for cuBLAS's q product and `attend`.
- `hash_embed`: a new byte's embedding, its byte row plus the sum of its hash n-gram rows (the
  ids' window, int64 products, floor mod and offsets, the bag lookup and the add): one kernel for
  about ten.
- `advance`, `feed`: a byte's bookkeeping after the decoder (documents, n) and the next byte
  fed into the step's input and the rows' bytes: one kernel each for four.
- `linear_add`: beta * x + a @ W.T, the output and down projections with their residual, for a
  few rows (what `torch.addmm` computes, one rounding), where cuBLAS runs two kernels (split-K
  and its reduction, 8.7 + 1.7 µs for the global stack's output projection at one row).
- `residual_norm`: a block's residual add after cuBLAS's product (kept in fp32, split over K as
  one batched product) and the RMSNorm that follows it, for batches over a few rows: one kernel
  where addmm (for long K a split-K product and its reduction) and the norm took two or three.
- `norms`: one RMSNorm under several weights (the decoder's cross layers' key and value norms of a
  closed patch's units): one kernel for nine norms and the stack of their outputs.
- `attend`: one position's attention over a stack's cache with the step's additive mask, in
  place of SDPA, which for a single query runs a prefill kernel (cuDNN's, tiled for many queries:
  20-39 µs a call at 64 rows on an H200, a quarter of the batch-64 step; docs/benchmarks.md). A
  program per row and head walks the keys in blocks with an online softmax in fp32. Unlike the
  others it has no weights, so it serves any batch size, and it reads no slot after a row's
  last (a device tensor: the cache's unfilled tail stays unread). With few rows or long caches a row's
  keys are split over several programs and a second kernel combines their partial sums
  (flash-decoding; `attend_splits`).
- `rope_attend`: `rope_write` and `attend` in one kernel (each program takes the row's own new
  key and value from its registers, not from the cache another program writes).
- `product_residual`, `product_rope`, `product_swiglu`, `product`: products for many rows (blocks
  of rows, `tl.dot`) with their epilogues (the residual add; RoPE and the cache writes; SwiGLU;
  none), where the norm before each needs no kernel of its own: a residual product writes its rows'
  sums of squares over every SS_COLS features beside them, and the next product (or
  `cross_attend`) RMS-norms its input from them on the way in (every stack past a few rows:
  generate.DECODER_PRODUCTS, GLOBAL_PRODUCTS, FRONT_PRODUCTS).

Each projecting program computes whole output features from the full input row, so no partial sums
of a product cross programs; the input's norm is recomputed by every program (a D-long reduction,
cheap next to the weights it reads), or taken from the sums of squares the product before wrote.
Rounding follows the PyTorch path step by step (every tensor the reference
materialises in the model's dtype is rounded to it here too), so in fp32 the results agree to
summation order; `attend` keeps its softmax weights in fp32 (SDPA's flash kernels round them to
the dtype before the product with v), so in bf16 it is off by at most a final rounding. `TRITON_INTERPRET=1` runs them on a CPU (tests/test_kernels.py).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the generator then keeps its PyTorch path
    triton = None


def available(device: torch.device) -> bool:
    """Triton is installed and can run on `device` (CUDA, or any device under TRITON_INTERPRET=1)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def supported(head_dim: int) -> bool:
    """Head dims the kernels take: a power of two of at least 4 (pairs are rotated in halves of
    tl.arange)."""
    return head_dim >= 4 and head_dim & (head_dim - 1) == 0


# `_product_kernel`'s epilogues (its EPI; `product` and the functions after it)
EPI_RESIDUAL, EPI_ROPE, EPI_SWIGLU, EPI_PLAIN = 0, 1, 2, 3
# a residual product (EPI_RESIDUAL) writes each output row's sum of squares over every SS_COLS
# columns, from which the next product's NORM takes the row's RMSNorm: its width must divide by it
SS_COLS = 16


def _configs(options: list[dict], warps: list[int]) -> list:
    """Autotuning candidates; one under the interpreter, where timing them means nothing."""
    configs = [triton.Config(o, num_warps=w) for o, w in zip(options, warps, strict=True)]
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


if triton is not None:

    @triton.jit
    def _rstd(x_row, D, eps, BLOCK_D: tl.constexpr):
        ss = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_row + d, mask=d < D, other=0.0).to(tl.float32)
            ss += x * x
        return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)

    @triton.jit
    def _normed(x_row, g_ptr, d, D, rstd):
        """RMSNorm of a chunk as bltkit's RMSNorm (F.rms_norm) rounds it: x * rstd * w in fp32,
        rounded once to the dtype (it rounded x * rstd first until the twenty-eighth session, one
        rounding more than the model's, in bf16)."""
        dt = x_row.dtype.element_ty
        x = tl.load(x_row + d, mask=d < D, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        return (x * rstd * g).to(dt).to(tl.float32)

    @triton.jit
    def _silu_mul(a, g, dt):
        """silu(a) * g (fp32 inputs, the product's outputs rounded to dt) rounded as F.silu(a) * g:
        silu's output to dt, then the product."""
        s = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
        return (s * g).to(dt)

    @triton.jit
    def _rope_store(e, o, b, head, i, ok, cos_ptr, sin_ptr, s_rope, q_ptr, kc_ptr, vc_ptr, slot_ptr, s_slot,
                    N, NK, skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, H: tl.constexpr):
        """Pairs `i` (where `ok`) of head `head` of row b, even features e and odd o (fp32, as the
        product rounded them): RoPE in fp32 on q and k heads ((a, b) -> (a cos - b sin, b cos + a
        sin), rounded once, as apply_rope), then q out, or k or v into its cache at the row's slot."""
        dt = q_ptr.dtype.element_ty
        if head < N + NK:
            c = tl.load(cos_ptr + b * s_rope + i, mask=ok, other=1.0)
            s = tl.load(sin_ptr + b * s_rope + i, mask=ok, other=0.0)
            e, o = e * c - o * s, o * c + e * s
        if head < N:
            at = q_ptr + (b * N + head) * H
        else:
            slot = tl.load(slot_ptr + b * s_slot)
            if head < N + NK:
                at = kc_ptr + b * skc_b + (head - N) * skc_n + slot * skc_r
            else:
                at = vc_ptr + b * svc_b + (head - N - NK) * svc_n + slot * svc_r
        tl.store(at + 2 * i, e.to(dt), mask=ok)
        tl.store(at + 2 * i + 1, o.to(dt), mask=ok)

    @triton.jit
    def _rope_head(at, h, cos_ptr, sin_ptr, rope_off, dt):
        """One head's H features at `at` (the product's output) with RoPE on its pairs (2i, 2i+1)
        as _rope_store rotates them, rounded to dt, back in fp32: feature h is x_h cos_i + x_h' sin_i
        with x_h' its pair's other feature, negated for the even one."""
        x = tl.load(at + h).to(tl.float32)
        other = tl.load(at + (h ^ 1)).to(tl.float32)
        c = tl.load(cos_ptr + rope_off + h // 2)
        s = tl.load(sin_ptr + rope_off + h // 2)
        return (x * c + tl.where(h % 2 == 1, other, -other) * s).to(dt).to(tl.float32)

    # tuned once per shape on the first call (the generator's warm-up, before CUDA graph capture);
    # the writes are idempotent (the same q, k, v for the same inputs), so timing runs are harmless
    # PAIRS: a program's share of a head (rotation pairs, 2 output features each). A whole head of
    # 128 features a program made 48 programs for blt-1b's global q|k|v at batch 1, a third of an
    # H200's SMs; smaller shares give more programs, and the tuning keeps whichever is fastest
    @triton.autotune(configs=_configs([{"PAIRS": 16, "BLOCK_D": 256}, {"PAIRS": 16, "BLOCK_D": 512},
                                       {"PAIRS": 32, "BLOCK_D": 256}, {"PAIRS": 8, "BLOCK_D": 512},
                                       {"PAIRS": 64, "BLOCK_D": 128}, {"PAIRS": 64, "BLOCK_D": 256},
                                       {"PAIRS": 64, "BLOCK_D": 256}, {"PAIRS": 64, "BLOCK_D": 512},
                                       {"PAIRS": 4, "BLOCK_D": 1024}, {"PAIRS": 8, "BLOCK_D": 1024},
                                       {"PAIRS": 2, "BLOCK_D": 2048}, {"PAIRS": 4, "BLOCK_D": 2048}],
                                      [4, 8, 4, 4, 4, 4, 8, 8, 4, 8, 4, 8]), key=["D", "N", "NK"])
    @triton.jit
    def _norm_qkv_rope_kernel(x_ptr, g_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                              D, eps, N, NK, skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, s_slot, s_rope,
                              H: tl.constexpr, PAIRS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        shares = (H // 2 + PAIRS - 1) // PAIRS
        head = tl.program_id(1) // shares  # q heads, then k heads, then v heads
        i = (tl.program_id(1) % shares) * PAIRS + tl.arange(0, PAIRS)  # this program's pairs
        ok = i < H // 2
        dt = x_ptr.dtype.element_ty
        x_row = x_ptr + b * D
        rstd = _rstd(x_row, D, eps, BLOCK_D)
        rows = head * H + 2 * i  # the even feature of each pair; odd = rows + 1
        acc_e = tl.zeros([PAIRS], dtype=tl.float32)
        acc_o = tl.zeros([PAIRS], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            xn = _normed(x_row, g_ptr, d, D, rstd)
            m = ok[:, None] & (d < D)[None, :]
            w_e = tl.load(w_ptr + rows[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
            w_o = tl.load(w_ptr + (rows + 1)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
            acc_e += tl.sum(w_e * xn[None, :], axis=1)
            acc_o += tl.sum(w_o * xn[None, :], axis=1)
        e = acc_e.to(dt).to(tl.float32)  # the product's output, rounded as F.linear's
        o = acc_o.to(dt).to(tl.float32)
        _rope_store(e, o, b, head, i, ok, cos_ptr, sin_ptr, s_rope, q_ptr, kc_ptr, vc_ptr, slot_ptr, s_slot,
                    N, NK, skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, H)

    @triton.jit
    def _rope_write_kernel(y_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, N, NK, sy_b,
                           skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, s_slot, s_rope, H: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        i = tl.arange(0, H // 2)
        row = y_ptr + b * sy_b + head * H
        e = tl.load(row + 2 * i).to(tl.float32)
        o = tl.load(row + 2 * i + 1).to(tl.float32)
        _rope_store(e, o, b, head, i, i < H // 2, cos_ptr, sin_ptr, s_rope, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                    s_slot, N, NK, skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, H)

    @triton.autotune(configs=_configs([{"BLOCK_O": 16, "BLOCK_D": 128}, {"BLOCK_O": 16, "BLOCK_D": 256},
                                       {"BLOCK_O": 32, "BLOCK_D": 256}, {"BLOCK_O": 8, "BLOCK_D": 512},
                                       {"BLOCK_O": 4, "BLOCK_D": 512}, {"BLOCK_O": 4, "BLOCK_D": 1024},
                                       {"BLOCK_O": 8, "BLOCK_D": 1024}, {"BLOCK_O": 2, "BLOCK_D": 2048},
                                       {"BLOCK_O": 4, "BLOCK_D": 2048}],
                                      [4, 8, 8, 8, 4, 4, 8, 4, 8]), key=["D", "F"])
    @triton.jit
    def _norm_swiglu_kernel(x_ptr, g_ptr, w_ptr, out_ptr, D, F, eps, BLOCK_O: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        dt = x_ptr.dtype.element_ty
        x_row = x_ptr + b * D
        rstd = _rstd(x_row, D, eps, BLOCK_D)
        acc_a = tl.zeros([BLOCK_O], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_O], dtype=tl.float32)
        rmask = (rows < F)[:, None]
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            xn = _normed(x_row, g_ptr, d, D, rstd)
            m = rmask & (d < D)[None, :]
            w_a = tl.load(w_ptr + rows[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
            w_b = tl.load(w_ptr + (rows + F)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
            acc_a += tl.sum(w_a * xn[None, :], axis=1)
            acc_b += tl.sum(w_b * xn[None, :], axis=1)
        a = acc_a.to(dt).to(tl.float32)
        g = acc_b.to(dt).to(tl.float32)
        tl.store(out_ptr + b * F + rows, _silu_mul(a, g, dt), mask=rows < F)

    @triton.jit
    def _swiglu_kernel(y_ptr, out_ptr, F, sy_b, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = f < F
        dt = out_ptr.dtype.element_ty
        a = tl.load(y_ptr + b * sy_b + f, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(y_ptr + b * sy_b + F + f, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * F + f, _silu_mul(a, g, dt), mask=ok)

    @triton.autotune(configs=_configs([{"BLOCK_D": 128}, {"BLOCK_D": 256}, {"BLOCK_D": 512}], [4, 4, 8]),
                     key=["D", "N", "NK", "K"])
    @triton.jit
    def _norm_cross_attend_kernel(x_ptr, g_ptr, w_ptr, k_ptr, v_ptr, out_ptr, D, eps, scale, N, NK, K,
                                  sk_b, sk_n, sk_s, sv_b, sv_n, sv_s, H: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        dt = x_ptr.dtype.element_ty
        x_row = x_ptr + b * D
        rstd = _rstd(x_row, D, eps, BLOCK_D)
        h = tl.arange(0, H)
        acc = tl.zeros([H], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            xn = _normed(x_row, g_ptr, d, D, rstd)
            w = tl.load(w_ptr + (head * H + h)[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xn[None, :], axis=1)
        q = acc.to(dt).to(tl.float32)  # the q product's output, rounded as F.linear's
        kvh = head // (N // NK)  # grouped-query heads share a key/value head
        j = tl.arange(0, BLOCK_K)
        jm = (j < K)[:, None]
        kk = tl.load(k_ptr + b * sk_b + kvh * sk_n + j[:, None] * sk_s + h[None, :], mask=jm, other=0.0)
        vv = tl.load(v_ptr + b * sv_b + kvh * sv_n + j[:, None] * sv_s + h[None, :], mask=jm, other=0.0)
        sc = tl.sum(kk.to(tl.float32) * q[None, :], axis=1) * scale
        sc = tl.where(j < K, sc, float("-inf"))
        p = tl.exp(sc - tl.max(sc, axis=0))
        p = p / tl.sum(p, axis=0)
        o = tl.sum(p[:, None] * vv.to(tl.float32), axis=0)
        tl.store(out_ptr + (b * N + head) * H + h, o.to(dt))

    @triton.jit
    def _unit_step(q, kk, vv, scale, m_i, l_i, o):
        """One unit of cross_attend's online softmax (every row of the block sees it)."""
        sc = tl.sum(q * kk.to(tl.float32), axis=1) * scale
        m_new = tl.maximum(m_i, sc)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        return m_new, l_i * alpha + p, o * alpha[:, None] + p[:, None] * vv.to(tl.float32)

    @triton.jit
    def _dot(x, w, acc, IEEE: tl.constexpr):
        """acc + x @ w. IEEE: fp32 products in fp32 (tl.dot's default on a GPU rounds them to tf32);
        under the interpreter bf16 too (its bf16 tl.dot is wrong: Triton 3.9), exact products of
        bf16 values summed in fp32, as the GPU's bf16 tensor-core product sums them."""
        if IEEE:
            return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, w, acc)

    @triton.jit
    def _first_units(k_rows, v_rows, sk_s, sv_s, m2, h, K, HP: tl.constexpr):
        """cross_attend's keys and values of a row block's first two units (the second masked out
        where K is 1)."""
        m1 = m2 & (h < tl.minimum(K - 1, 1) * HP)[None, :]
        return (tl.load(k_rows, mask=m2, other=0.0), tl.load(v_rows, mask=m2, other=0.0),
                tl.load(k_rows + sk_s, mask=m1, other=0.0), tl.load(v_rows + sv_s, mask=m1, other=0.0))

    # BLOCK_B rows a program share each tile of the head's q weights (tl.dot): at 64 rows a
    # program a row and head (norm_cross_attend) would read the 2 MB of blt-1b's decoder q weights
    # 64 times over
    @triton.autotune(configs=_configs([{"BLOCK_B": 16, "BLOCK_D": 128}, {"BLOCK_B": 32, "BLOCK_D": 128},
                                       {"BLOCK_B": 64, "BLOCK_D": 64}, {"BLOCK_B": 16, "BLOCK_D": 256},
                                       {"BLOCK_B": 64, "BLOCK_D": 128}, {"BLOCK_B": 16, "BLOCK_D": 64}],
                                      [4, 4, 4, 4, 8, 2]), key=["B", "D", "N", "NK", "K", "H", "EARLY", "NORM"])
    @triton.jit
    def _cross_attend_kernel(x_ptr, w_ptr, k_ptr, v_ptr, out_ptr, ss_ptr, g_ptr, B, D, scale, N, NK, K, sx_b,
                             sk_b, sk_n, sk_s, sv_b, sv_n, sv_s, T, eps, H: tl.constexpr, HP: tl.constexpr,
                             IEEE: tl.constexpr, NORM: tl.constexpr, TP: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_D: tl.constexpr, EARLY: tl.constexpr):
        """NORM: x's rows RMS-normed on the way in, as _product_kernel's NORM (from the T sums of
        squares ss [T, B] of the residual product that made x, and the norm weight g)."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        head = tl.program_id(1)
        dt = out_ptr.dtype.element_ty
        rok = rows < B
        h = tl.arange(0, HP)  # the head's features, padded to tl.dot's least width
        hok = h < H
        acc = tl.zeros([BLOCK_B, HP], dtype=tl.float32)
        kvh = head // (N // NK)  # grouped-query heads share a key/value head
        m2 = rok[:, None] & hok[None, :]
        k_rows = k_ptr + rows[:, None] * sk_b + kvh * sk_n + h[None, :]
        v_rows = v_ptr + rows[:, None] * sv_b + kvh * sv_n + h[None, :]
        if EARLY:  # the first two units before the product, which they do not need (CROSS_UNITS_EARLY)
            k0, v0, k1, v1 = _first_units(k_rows, v_rows, sk_s, sv_s, m2, h, K, HP)
        if NORM:
            rstd = _rows_rstd(ss_ptr, rows, rok, B, T, D, eps, TP)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dok = d < D
            x = tl.load(x_ptr + rows[:, None] * sx_b + d[None, :], mask=rok[:, None] & dok[None, :], other=0.0)
            if NORM:
                x = _normed_tile(x, g_ptr, d, dok, rstd, dt)
            w = tl.load(w_ptr + (head * H + h)[None, :] * D + d[:, None], mask=dok[:, None] & hok[None, :],
                        other=0.0)  # [BLOCK_D, HP]: the head's rows of w_q, transposed
            acc = _dot(x, w, acc, IEEE)
        q = acc.to(dt).to(tl.float32)  # the q product's output, rounded as F.linear's
        if not EARLY:
            k0, v0, k1, v1 = _first_units(k_rows, v_rows, sk_s, sv_s, m2, h, K, HP)
        # the row's K cached units, all visible: an online softmax over them, unit by unit
        m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
        o = tl.zeros([BLOCK_B, HP], dtype=tl.float32)
        m_i, l_i, o = _unit_step(q, k0, v0, scale, m_i, l_i, o)
        if K > 1:
            m_i, l_i, o = _unit_step(q, k1, v1, scale, m_i, l_i, o)
        for u in range(2, K):
            kk = tl.load(k_rows + u * sk_s, mask=m2, other=0.0)
            vv = tl.load(v_rows + u * sv_s, mask=m2, other=0.0)
            m_i, l_i, o = _unit_step(q, kk, vv, scale, m_i, l_i, o)
        tl.store(out_ptr + rows[:, None] * (N * H) + head * H + h[None, :], (o / l_i[:, None]).to(dt), mask=m2)

    @triton.jit
    def _block_loads(k_row, v_row, m_row, sk_s, sv_s, sm_s, s, h, ok, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr):
        """A block of slots s' mask (HAS_MASK; zeros otherwise, unread), keys and values, at once."""
        mk = tl.zeros([BLOCK_S], dtype=tl.float32)
        if HAS_MASK:
            mk = tl.load(m_row + s * sm_s, mask=ok, other=float("-inf")).to(tl.float32)
        kk = tl.load(k_row + s[:, None] * sk_s + h[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(v_row + s[:, None] * sv_s + h[None, :], mask=ok[:, None], other=0.0)
        return mk, kk, vv

    @triton.jit
    def _attend_block(s, lo, end, at, lo_at, S, own, q, scale, mk, kk, vv, m_i, l_i, acc,
                      HAS_MASK: tl.constexpr, RING: tl.constexpr, ROPE: tl.constexpr):
        """One block of attend's online softmax: slots s (those in [lo, end) visible as the mode
        says), their mask `mk` (HAS_MASK), keys and values as loaded. What hidden slots hold (NaN,
        say, in a slot no one has written yet) is replaced by zeros before any sum."""
        ok = (s >= lo) & (s < end)
        if HAS_MASK:
            mask = tl.where(ok, mk.to(tl.float32), float("-inf"))
        elif RING:  # slot s holds the last position <= at that is s modulo S (s <= at here:
            # `last` = at bounds the slots read, so none past at is read before the ring fills)
            held = at - (at - s) % S
            mask = tl.where(ok & (held >= lo_at), 0.0, float("-inf"))
        else:  # every slot in [lo, end) visible
            mask = tl.where(ok, 0.0, float("-inf"))
        seen = mask != float("-inf")
        if ROPE:  # the row's own slot is left out here (the writing program may not have
            # reached it yet) and taken from the program's registers after the loop
            seen = seen & (s != own)
        kk = tl.where(seen[:, None], kk.to(tl.float32), 0.0)
        vv = tl.where(seen[:, None], vv.to(tl.float32), 0.0)
        sc = tl.where(seen, tl.sum(kk * q[None, :], axis=1) * scale + mask, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp(-inf) = 0
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(sc - m_use)
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * vv, axis=0)

    # one warp a program: the best at 64 rows for the rings and the decoder's cross-attention (H200,
    # nineteenth session, benchmarks/attend_configs.py: 10.3 against 11.3 µs over the decoder's
    # ring, 3.0 against 3.6 over a patch's 2 units); tuned per head dim too (stacks of different
    # head dims can share every other key). Blocks of 16 slots with one warp: the best over the
    # global cache at ~40 patches a row there (8.2 against 9.2 µs as tuned); compiled for sm_90
    # (benchmarks/hopper_compile.py, twenty-seventh session) it holds 125 registers a thread over
    # heads of 128, so the global step's 1,024 programs at 64 rows run in one wave, as with 32 x 1
    # and 32 x 2, where 64 x 4 takes two and 64 x 8 four
    @triton.autotune(configs=_configs([{"BLOCK_S": 64}, {"BLOCK_S": 32}, {"BLOCK_S": 128}, {"BLOCK_S": 64},
                                       {"BLOCK_S": 32}, {"BLOCK_S": 16}], [4, 2, 4, 8, 1, 1]),
                     key=["S", "N", "NK", "H", "SPLITS", "HAS_LAST", "HAS_FIRST", "HAS_MASK", "ROPE", "RING", "PRE", "AHEAD"])
    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr, last_ptr, first_ptr, S, scale, N, NK, QN,
                       sq_b, sq_n, sk_b, sk_n, sk_s, sv_b, sv_n, sv_s, sm_b, sm_s, s_last, SPLITS,
                       cos_ptr, sin_ptr, slot_ptr, s_rope, s_slot, window,
                       H: tl.constexpr, BLOCK_S: tl.constexpr, HAS_LAST: tl.constexpr, HAS_FIRST: tl.constexpr,
                       HAS_MASK: tl.constexpr, ROPE: tl.constexpr, RING: tl.constexpr, PRE: tl.constexpr,
                       AHEAD: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)  # this program's share of the keys (flash-decoding)
        h = tl.arange(0, H)
        kvh = (head % QN) // (QN // NK)  # grouped-query heads share a key/value head (QN: attend's `period`)
        k_row = k_ptr + b * sk_b + kvh * sk_n
        v_row = v_ptr + b * sv_b + kvh * sv_n
        m_row = m_ptr + b * sm_b
        s_pre = tl.arange(0, BLOCK_S)
        if PRE:  # split 0 loads the first BLOCK_S slots with the row's bounds, not after them (one
            # wait fewer on the program's chain of loads); the bounds only mask them below
            mk_pre, kk_pre, vv_pre = _block_loads(k_row, v_row, m_row, sk_s, sv_s, sm_s, s_pre, h,
                                                  s_pre < tl.where(split == 0, S, 0), BLOCK_S, HAS_MASK)
        n_read = S
        if HAS_LAST:  # the row's last visible slot, read on the device (no shape per cache fill)
            n_read = tl.minimum(S, tl.load(last_ptr + b * s_last).to(tl.int32) + 1)
        lo = 0
        at = 0  # RING: the step's position (its slot: at % S)
        lo_at = 0  # RING: the row's first visible position
        if RING:  # `last` the position, `first` the row's document start (positions, not slots)
            at = tl.load(last_ptr + b * s_last).to(tl.int32)
            lo_at = tl.maximum(tl.load(first_ptr + b).to(tl.int32), at - window + 1)
        elif HAS_FIRST:  # the row's first visible slot (a row's own)
            lo = tl.maximum(tl.load(first_ptr + b).to(tl.int32), 0)
        chunk = tl.cdiv(tl.cdiv(tl.maximum(n_read - lo, 0), SPLITS), BLOCK_S) * BLOCK_S
        start = lo + split * chunk
        end = tl.minimum(n_read, start + chunk)
        dt = o_ptr.dtype.element_ty
        own = -1  # ROPE: the row's own slot
        if ROPE:  # q_ptr: the q|k|v product's output; RoPE on q and the new k here, as rope_write
            y_row = q_ptr + b * sq_b
            q = _rope_head(y_row + head * H, h, cos_ptr, sin_ptr, b * s_rope, dt)
            k_new = _rope_head(y_row + (N + kvh) * H, h, cos_ptr, sin_ptr, b * s_rope, dt)
            v_new = tl.load(y_row + (N + NK + kvh) * H + h).to(tl.float32)
            own = tl.load(slot_ptr + b * s_slot).to(tl.int32)
            if (head % (N // NK) == 0) & (split == 0):  # one program a key/value head writes them
                tl.store(k_row + own * sk_s + h, k_new.to(dt))
                tl.store(v_row + own * sv_s + h, v_new.to(dt))
        else:
            q = tl.load(q_ptr + b * sq_b + head * sq_n + h).to(tl.float32)
        m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)  # running max (a scalar)
        l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)  # running sum of exp
        acc = tl.zeros([H], dtype=tl.float32)
        rest = start  # where the loop over key blocks starts
        if PRE:  # the slots loaded first (split 0's first block where it starts at slot 0) folded in
            m_i, l_i, acc = _attend_block(s_pre, start, end, at, lo_at, S, own, q, scale, mk_pre, kk_pre, vv_pre,
                                          m_i, l_i, acc, HAS_MASK, RING, ROPE)
            rest = tl.maximum(start, BLOCK_S)
        if AHEAD:  # each block's loads go out before the block before it is summed: two blocks in
            # flight, one wait where the loop waited twice (ATTEND_AHEAD)
            s = rest + tl.arange(0, BLOCK_S)
            mk, kk, vv = _block_loads(k_row, v_row, m_row, sk_s, sv_s, sm_s, s, h, s < end, BLOCK_S, HAS_MASK)
            for s0 in range(rest, end, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                nxt = s + BLOCK_S
                mk_n, kk_n, vv_n = _block_loads(k_row, v_row, m_row, sk_s, sv_s, sm_s, nxt, h, nxt < end, BLOCK_S,
                                                HAS_MASK)
                m_i, l_i, acc = _attend_block(s, s0, end, at, lo_at, S, own, q, scale, mk, kk, vv, m_i, l_i, acc,
                                              HAS_MASK, RING, ROPE)
                mk, kk, vv = mk_n, kk_n, vv_n
        else:
            for s0 in range(rest, end, BLOCK_S):  # online softmax over key blocks (one pass, fp32)
                s = s0 + tl.arange(0, BLOCK_S)
                # the mask, keys and values load at once (no load waits for another)
                mk, kk, vv = _block_loads(k_row, v_row, m_row, sk_s, sv_s, sm_s, s, h, s < end, BLOCK_S, HAS_MASK)
                m_i, l_i, acc = _attend_block(s, s0, end, at, lo_at, S, own, q, scale, mk, kk, vv, m_i, l_i, acc,
                                              HAS_MASK, RING, ROPE)
        if ROPE:  # the own slot, where it lies in this program's share and is visible: one more step
            here = (own >= start) & (own < end)
            if HAS_MASK:
                m_own = tl.load(m_row + own * sm_s, mask=here, other=float("-inf")).to(tl.float32)
            else:
                m_own = tl.where(here, 0.0, float("-inf"))
            sc_own = tl.where(m_own != float("-inf"), tl.sum(k_new * q, axis=0) * scale + m_own, float("-inf"))
            m_new = tl.maximum(m_i, sc_own)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p_own = tl.exp(sc_own - m_use)
            l_i = l_i * alpha + p_own
            acc = acc * alpha + p_own * v_new
            m_i = m_new
        if SPLITS == 1:
            tl.store(o_ptr + (b * N + head) * H + h, (acc / tl.where(l_i > 0, l_i, 1.0)).to(dt))  # none seen: 0
        else:  # the unnormalised sums, the max and the sum of weights, for _attend_combine_kernel
            row = part_ptr + ((b * N + head) * SPLITS + split) * (H + 2)
            tl.store(row + h, acc)
            tl.store(row + H, m_i)
            tl.store(row + H + 1, l_i)

    @triton.jit
    def _attend_combine_kernel(part_ptr, o_ptr, N, SPLITS, H: tl.constexpr, BLOCK_J: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        dt = o_ptr.dtype.element_ty
        h = tl.arange(0, H)
        j = tl.arange(0, BLOCK_J)
        jm = j < SPLITS
        rows = part_ptr + ((b * N + head) * SPLITS + j) * (H + 2)
        m = tl.load(rows + H, mask=jm, other=float("-inf"))
        l_j = tl.load(rows + H + 1, mask=jm, other=0.0)
        top = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))  # a split that saw nothing: 0
        acc = tl.load(rows[:, None] + h[None, :], mask=jm[:, None], other=0.0)
        total = tl.sum(l_j * w, axis=0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(o_ptr + (b * N + head) * H + h, o.to(dt))

    @triton.jit
    def _add_norm_kernel(x_ptr, acc_ptr, g_ptr, n_ptr, B, D, S, eps, beta, BLOCK_D: tl.constexpr):
        """Row b: beta * x + the sum of S fp32 partial products acc[s], rounded once to x's dtype
        and written back into x (what addmm computes); then RMSNorm of it as F.rms_norm rounds it
        (x * rstd * w in fp32, rounded once)."""
        b = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(S):
            total += tl.load(acc_ptr + (s * B + b) * D + d, mask=ok, other=0.0)
        h = (beta * tl.load(x_ptr + b * D + d, mask=ok, other=0.0).to(tl.float32) + total).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + b * D + d, h, mask=ok)
        hf = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
        g = tl.load(g_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(n_ptr + b * D + d, (hf * rstd * g).to(n_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _norms_kernel(x_ptr, w_ptr, o_ptr, R, D, L, eps, BLOCK_D: tl.constexpr):
        """Row r of x normed once, then times each of the L weights: o[l, r] = x * rstd * w[l] in
        fp32, rounded once (F.rms_norm's arithmetic, as _add_norm_kernel's)."""
        r = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        x = tl.load(x_ptr + r * D + d, mask=ok, other=0.0).to(tl.float32)
        xr = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps))
        for i in range(L):
            g = tl.load(w_ptr + i * D + d, mask=ok, other=0.0).to(tl.float32)
            tl.store(o_ptr + (i * R + r) * D + d, (xr * g).to(o_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _hash_embed_kernel(x_ptr, hist_ptr, coef_ptr, tok_ptr, tab_ptr, out_ptr, D, W, n_tables, vocab, s_hist,
                           s_out, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
        """Row b's byte embedding plus the sum of its hash n-gram rows (bltkit.model.hashing's
        ids: each table's prime powers over the window of the last WIDTH ids, int64 products that
        wrap, floor-mod vocab, offset by the table), for features d of one block."""
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = d < D
        dt = out_ptr.dtype.element_ty
        j = tl.arange(0, BLOCK_W)  # the window, oldest first: WIDTH - 1 history ids, then x
        xb = tl.load(x_ptr + b).to(tl.int64)
        past = tl.load(hist_ptr + b * s_hist + W - (WIDTH - 1) + j, mask=j < WIDTH - 1, other=0).to(tl.int64)
        win = tl.where(j == WIDTH - 1, xb, past)
        bag = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n in range(n_tables):
            c = tl.load(coef_ptr + n * WIDTH + j, mask=j < WIDTH, other=0)
            r = tl.sum(win * c, axis=0) % vocab  # wraps mod 2^64 as torch's int64 does
            r = tl.where(r < 0, r + vocab, r)  # a floor mod (% may truncate toward zero)
            bag += tl.load(tab_ptr + (r + n * vocab) * D + d, mask=ok, other=0.0).to(tl.float32)
        e = tl.load(tok_ptr + xb * D + d, mask=ok, other=0.0).to(tl.float32)
        # the bag's sum rounded once (EmbeddingBag's fp32 accumulation), then the add
        tl.store(out_ptr + b * s_out + d, (e + bag.to(dt).to(tl.float32)).to(dt), mask=ok)

    @triton.jit
    def _commit_rows_kernel(src_ptr, dst_ptr, close_ptr, n1, s0, s1, s2, s3, s4, s5, d0, d1, d2, d3, d4, d5,
                            N3, N4, N5, B3: tl.constexpr, B4: tl.constexpr, B5: tl.constexpr):
        p = tl.program_id(0)  # (i0, i1): the two leading dims
        b = tl.program_id(1)  # the row (dim 2)
        if tl.load(close_ptr + b) != 0:
            i0 = p // n1
            i1 = p % n1
            a = tl.arange(0, B3)[:, None, None]
            c = tl.arange(0, B4)[None, :, None]
            e = tl.arange(0, B5)[None, None, :]
            ok = (a < N3) & (c < N4) & (e < N5)
            v = tl.load(src_ptr + i0 * s0 + i1 * s1 + b * s2 + a * s3 + c * s4 + e * s5, mask=ok)
            tl.store(dst_ptr + i0 * d0 + i1 * d1 + b * d2 + a * d3 + c * d4 + e * d5, v, mask=ok)

    @triton.jit
    def _greedy_kernel(x_ptr, logits_ptr, next_ptr, V, sx_b, sl_b, BLOCK_V: tl.constexpr):
        b = tl.program_id(0)
        v = tl.arange(0, BLOCK_V)
        ok = v < V
        x = tl.load(x_ptr + b * sx_b + v, mask=ok, other=float("-inf")).to(tl.float32)
        tl.store(logits_ptr + b * sl_b + v, x, mask=ok)
        nan = (x != x) & ok  # torch.argmax takes NaN as the largest: the first one wins
        best = tl.argmax(x, axis=0, tie_break_left=True)  # the first of equal largest values, as torch's
        first_nan = tl.argmax(nan.to(tl.int32), axis=0, tie_break_left=True)
        best = tl.where(tl.max(nan.to(tl.int32), axis=0) > 0, first_nan, best)
        tl.store(next_ptr + b, best.to(tl.int64))

    @triton.jit
    def _advance_kernel(x_ptr, doc_ptr, n_ptr, start_ptr, B, EOS, HAS_START: tl.constexpr, BLOCK: tl.constexpr):
        """One program: each row's document count past an EOS read at n (and its document start,
        n + 1), then n + 1 (read before, written after every row)."""
        n1 = tl.load(n_ptr) + 1
        for b0 in range(0, B, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            ok = b < B
            eos = tl.load(x_ptr + b, mask=ok, other=0) == EOS
            doc = tl.load(doc_ptr + b, mask=ok, other=0)
            tl.store(doc_ptr + b, doc + eos.to(doc.dtype), mask=ok)
            if HAS_START:
                tl.store(start_ptr + b, n1.to(start_ptr.dtype.element_ty), mask=ok & eos)
        tl.store(n_ptr, n1)

    @triton.jit
    def _feed_kernel(n_ptr, lens_ptr, buf_ptr, next_ptr, x_ptr, B, s_buf, BLOCK: tl.constexpr):
        """Rows b of one block: byte n is the prompt's (buf[b, n]) while n < lens[b], else the one
        sampled (next[b]); into x and buf[b, n]."""
        b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = b < B
        n = tl.load(n_ptr)
        at = buf_ptr + b * s_buf + n
        xb = tl.where(n < tl.load(lens_ptr + b, mask=ok, other=0), tl.load(at, mask=ok, other=0),
                      tl.load(next_ptr + b, mask=ok, other=0))
        tl.store(at, xb, mask=ok)
        tl.store(x_ptr + b, xb, mask=ok)

    # the small blocks (2-8 output rows a program) are for small matrices at one row: 16 rows a
    # program made 64 programs for the decoder's 1,024 x 1,024 output projection, 5.4 µs for its
    # 2 MB on an H200 (0.4 TB/s), and 10.2 µs (1.5 TB/s) for the global stack's projections. The
    # 2,048-wide input blocks (here and in the norm kernels: a whole global row in one load, more
    # bytes in flight a program) are candidates since the thirteenth session, untimed before it
    @triton.autotune(configs=_configs([{"BLOCK_O": 16, "BLOCK_K": 256}, {"BLOCK_O": 8, "BLOCK_K": 512},
                                       {"BLOCK_O": 32, "BLOCK_K": 128}, {"BLOCK_O": 16, "BLOCK_K": 512},
                                       {"BLOCK_O": 4, "BLOCK_K": 512}, {"BLOCK_O": 2, "BLOCK_K": 1024},
                                       {"BLOCK_O": 4, "BLOCK_K": 1024}, {"BLOCK_O": 8, "BLOCK_K": 1024},
                                       {"BLOCK_O": 2, "BLOCK_K": 2048}, {"BLOCK_O": 4, "BLOCK_K": 2048}],
                                      [4, 4, 4, 8, 4, 4, 4, 8, 4, 8]), key=["D", "K"])
    @triton.jit
    def _linear_add_kernel(x_ptr, a_ptr, w_ptr, out_ptr, D, K, beta, sa_b, BLOCK_O: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        dt = out_ptr.dtype.element_ty
        rmask = rows < D
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + b * sa_b + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=rmask[:, None] & (k < K)[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        x = tl.load(x_ptr + b * D + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * D + rows, (beta * x + acc).to(dt), mask=rmask)  # addmm's one rounding

    # the kernels' copies of the module's constants (a kernel reads only constexpr globals)
    _EPI_RESIDUAL, _EPI_SWIGLU, _EPI_PLAIN = tl.constexpr(EPI_RESIDUAL), tl.constexpr(EPI_SWIGLU), tl.constexpr(EPI_PLAIN)
    _SS_COLS = tl.constexpr(SS_COLS)

    @triton.jit
    def _rows_rstd(ss_ptr, m, mok, M, T, D, eps, TP: tl.constexpr):
        """RMSNorm's 1 / sqrt(mean(x^2) + eps) of rows m from the T partial sums of squares [T, M]
        a residual product wrote (EPI_RESIDUAL), summed in a fixed order."""
        t = tl.arange(0, TP)
        ss = tl.load(ss_ptr + t[:, None] * M + m[None, :], mask=(t < T)[:, None] & mok[None, :], other=0.0)
        return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)

    @triton.jit
    def _normed_tile(xt, g_ptr, k, kok, rstd, dt):
        """A tile of x's rows RMS-normed as F.rms_norm rounds it (x * rstd * w in fp32, rounded once)."""
        g = tl.load(g_ptr + k, mask=kok, other=0.0).to(tl.float32)
        return (xt.to(tl.float32) * rstd[:, None] * g[None, :]).to(dt)

    # BLOCK_M rows by BLOCK_N output features, BLOCK_K inputs a step (6 candidates: each compiles
    # for each key on a GPU's first call). The twenty-first session's products of this form
    # (benchmarks/pdl_chain.py, H200, 64 rows, 4 warps, 4 stages) ran within 0.5 µs of cuBLAS for
    # blt-1b's global shapes on their own, best over 2-4 slices of K (partial sums added by the
    # next kernel); these do not split K (the epilogue needs whole sums), so blocks of 16-32 rows
    # give a narrow product more programs instead (each reads its weights again, from L2). If they
    # lose for want of programs, slices of K with the last slice's program summing them are next
    @triton.autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                              for m, n, k, w, s in ((64, 64, 128, 4, 4), (64, 32, 128, 4, 4), (64, 32, 64, 4, 4),
                                                    (64, 16, 128, 4, 4), (32, 32, 128, 4, 4), (16, 32, 128, 4, 4))][
                                  :1 if os.environ.get("TRITON_INTERPRET") == "1" else None],
                     key=["M", "N", "K", "EPI", "NORM"])
    @triton.jit
    def _product_kernel(x_ptr, ss_ptr, g_ptr, w_ptr, o_ptr, res_ptr, sso_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                        slot_ptr, M, N, K, T, sx, eps, beta, NQ, NK, s_rope, s_slot, skc_b, skc_n, skc_r, svc_b,
                        svc_n, svc_r, NORM: tl.constexpr, EPI: tl.constexpr, H: tl.constexpr, TP: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """x @ w.T for rows of x [M, K] (any row stride) and w [N, K], each program BLOCK_M rows by
        BLOCK_N outputs. NORM: x's rows RMS-normed on the way in (norm weight g, eps; their
        rstd from the T sums of squares ss [T, M] of the residual product that made x). EPI:
        EPI_RESIDUAL: o = beta * res + x @ w.T [M, N] (one rounding, addmm's), and sso [N / SS_COLS,
          M] the sums of squares of o's rounded rows, SS_COLS columns each (the next NORM's);
        EPI_ROPE: (q|k|v; adjacent columns RoPE's pairs) the outputs rounded to the dtype, RoPE on
          the q and k heads (fp32, rounded once), q into o [M, NQ, H] and k, v into the caches at
          each row's slot (rope_write's arithmetic);
        EPI_SWIGLU: (w = [w1; w3]) silu(a) * b into o [M, N / 2], as _silu_mul rounds it: a
          program's block is BLOCK_N / 2 rows of w1 and the same rows of w3;
        EPI_PLAIN: o = x @ w.T [M, N] rounded to the dtype (F.linear's)."""
        HALF: tl.constexpr = BLOCK_N // 2
        pid_n = tl.program_id(0)
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mok = m < M
        j = tl.arange(0, BLOCK_N)
        if EPI == _EPI_SWIGLU:
            f = pid_n * HALF + j % HALF
            wrow = f + (j // HALF) * (N // 2)
            nok = f < N // 2
        else:
            wrow = pid_n * BLOCK_N + j
            nok = wrow < N
        dt = o_ptr.dtype.element_ty
        if NORM:
            rstd = _rows_rstd(ss_ptr, m, mok, M, T, K, eps, TP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kok = k < K
            xt = tl.load(x_ptr + m[:, None] * sx + k[None, :], mask=mok[:, None] & kok[None, :], other=0.0)
            if NORM:
                xt = _normed_tile(xt, g_ptr, k, kok, rstd, dt)
            wt = tl.load(w_ptr + wrow[None, :].to(tl.int64) * K + k[:, None], mask=nok[None, :] & kok[:, None],
                         other=0.0)
            acc = _dot(xt, wt, acc, IEEE)
        ok = mok[:, None] & nok[None, :]
        if EPI == _EPI_RESIDUAL:
            at = m[:, None] * N + wrow[None, :]
            y = (beta * tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32) + acc).to(dt)
            tl.store(o_ptr + at, y, mask=ok)
            yf = tl.where(ok, y.to(tl.float32), 0.0)
            parts = tl.sum(tl.reshape(yf * yf, [BLOCK_M, BLOCK_N // _SS_COLS, _SS_COLS]), axis=2)
            c = pid_n * (BLOCK_N // _SS_COLS) + tl.arange(0, BLOCK_N // _SS_COLS)
            tl.store(sso_ptr + c[None, :] * M + m[:, None], parts, mask=mok[:, None] & (c * _SS_COLS < N)[None, :])
        elif EPI == _EPI_SWIGLU:
            a, g = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), [0, 2, 1]))
            fo = pid_n * HALF + tl.arange(0, HALF)
            y = _silu_mul(a.to(dt).to(tl.float32), g.to(dt).to(tl.float32), dt)
            tl.store(o_ptr + m[:, None] * (N // 2) + fo[None, :], y, mask=mok[:, None] & (fo < N // 2)[None, :])
        elif EPI == _EPI_PLAIN:
            tl.store(o_ptr + m[:, None] * N + wrow[None, :], acc.to(dt), mask=ok)
        else:  # EPI_ROPE: adjacent columns are RoPE's pairs (even, odd)
            e, o = tl.split(tl.reshape(acc, [BLOCK_M, HALF, 2]))
            e = e.to(dt).to(tl.float32)  # the product's outputs, rounded as F.linear's
            o = o.to(dt).to(tl.float32)
            col = pid_n * BLOCK_N + 2 * tl.arange(0, HALF)  # a pair's even column
            head = col // H  # q heads, then k heads, then v heads
            i = (col % H) // 2
            pok = mok[:, None] & (col < N)[None, :]
            turn = pok & (head < NQ + NK)[None, :]
            c = tl.load(cos_ptr + m[:, None] * s_rope + i[None, :], mask=turn, other=1.0)
            s = tl.load(sin_ptr + m[:, None] * s_rope + i[None, :], mask=turn, other=0.0)
            e, o = e * c - o * s, o * c + e * s
            slot = tl.load(slot_ptr + m * s_slot, mask=mok, other=0)
            q_at = o_ptr + (m[:, None] * NQ + head[None, :]) * H
            k_at = kc_ptr + m[:, None] * skc_b + (head - NQ)[None, :] * skc_n + slot[:, None] * skc_r
            v_at = vc_ptr + m[:, None] * svc_b + (head - NQ - NK)[None, :] * svc_n + slot[:, None] * svc_r
            at = tl.where((head < NQ)[None, :], q_at, tl.where((head < NQ + NK)[None, :], k_at, v_at)) + 2 * i[None, :]
            tl.store(at, e.to(dt), mask=pok)
            tl.store(at + 1, o.to(dt), mask=pok)


def _check_weight(w: torch.Tensor, name: str) -> None:
    """The kernels read a weight [out, in] as contiguous rows (nn.Linear's layout): another layout
    would be read wrong without an error, so it is refused."""
    if not w.is_contiguous():
        raise ValueError(f"bltkit.kernels: {name} must be contiguous rows [out, in] (nn.Linear's layout), got "
                         f"shape {tuple(w.shape)} with strides {tuple(w.stride())}; pass weight.contiguous()")


def _rope_stride(cos_H2: torch.Tensor, sin_H2: torch.Tensor) -> int:
    """The row stride the kernels read both RoPE halves with: 0 for one set ([H/2]), else theirs
    ([B, H/2] rows, each contiguous; both halves with the same stride)."""
    assert cos_H2.stride(-1) == sin_H2.stride(-1) == 1, "RoPE halves need contiguous rows"
    if cos_H2.dim() == 1:
        return 0
    assert cos_H2.stride(0) == sin_H2.stride(0), "both RoPE halves need the same row stride"
    return cos_H2.stride(0)


def norm_qkv_rope(x_BD: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                  cos_H2: torch.Tensor, sin_H2: torch.Tensor, n_heads: int, n_kv_heads: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                  pairs: int | None = None) -> torch.Tensor:
    """q [B, N, H] of one position a row; k and v go into the caches [B, Nkv, S, H] at `slot`:
    one device index for every row ([1]) or one a row ([B]). `cos_H2`, `sin_H2`: the fp32 RoPE
    halves at the position, shared ([H/2]) or a row's own ([B, H/2], rows contiguous, one row
    stride for both: a generator's table rows gathered as [B, 2, H/2]). `pairs`:
    rotation pairs a program (a power of two), instead of the tuned choice (for tests)."""
    _check_weight(w_qkv, "w_qkv")
    B, D = x_BD.shape
    H = k_cache.shape[-1]
    q = torch.empty(B, n_heads, H, dtype=x_BD.dtype, device=x_BD.device)
    per_row = slot.numel() == B > 1
    heads = n_heads + 2 * n_kv_heads
    args = (x_BD, norm_weight, w_qkv, cos_H2, sin_H2, q, k_cache, v_cache, slot, D, eps, n_heads, n_kv_heads,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            1 if per_row else 0, _rope_stride(cos_H2, sin_H2))
    if pairs is None:
        _norm_qkv_rope_kernel[lambda meta: (B, heads * triton.cdiv(H // 2, meta["PAIRS"]))](*args, H=H)
    else:  # the tuner's kernel itself, with one fixed choice
        _norm_qkv_rope_kernel.fn[(B, heads * triton.cdiv(H // 2, pairs))](*args, H=H, PAIRS=pairs, BLOCK_D=128)
    return q


def rope_write(y_BF: torch.Tensor, cos_H2: torch.Tensor, sin_H2: torch.Tensor, n_heads: int, n_kv_heads: int,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`norm_qkv_rope` after the product: q [B, N, H] from y = the q|k|v product's output [B,
    (N + 2 Nkv) H] (rows may be strided), RoPE on q and k, and k, v written into the caches at
    `slot`; `cos_H2`, `sin_H2`, `slot` as there. One kernel for the rotation's casts and product
    and the two cache writes, for batches too large for the matrix-vector kernels (cuBLAS runs
    their products)."""
    B = y_BF.shape[0]
    H = k_cache.shape[-1]
    q = torch.empty(B, n_heads, H, dtype=y_BF.dtype, device=y_BF.device)
    _rope_write_kernel[(B, n_heads + 2 * n_kv_heads)](
        y_BF, cos_H2, sin_H2, q, k_cache, v_cache, slot, n_heads, n_kv_heads, y_BF.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), 1 if slot.numel() == B > 1 else 0, _rope_stride(cos_H2, sin_H2), H=H)
    return q


def norm_swiglu(x_BD: torch.Tensor, norm_weight: torch.Tensor, eps: float, w13: torch.Tensor) -> torch.Tensor:
    """silu(w1 n(x)) * w3 n(x) [B, F] with n the RMSNorm and w13 = [w1; w3] ([2F, D])."""
    _check_weight(w13, "w13")
    B, D = x_BD.shape
    F = w13.shape[0] // 2
    out = torch.empty(B, F, dtype=x_BD.dtype, device=x_BD.device)
    _norm_swiglu_kernel[lambda meta: (B, triton.cdiv(F, meta["BLOCK_O"]))](x_BD, norm_weight, w13, out, D, F, eps)
    return out


SWIGLU_BLOCK = 1024


def swiglu(y_B2F: torch.Tensor) -> torch.Tensor:
    """silu(a) * b [B, F] of y = [a | b] ([B, 2F], the w1|w3 product's output; rows may be
    strided), rounded as F.silu(a) * b: one kernel where PyTorch runs two elementwise kernels on
    the strided halves (for batches too large for norm_swiglu)."""
    B, F2 = y_B2F.shape
    F = F2 // 2
    assert y_B2F.stride(1) == 1, "swiglu needs contiguous rows"
    out = torch.empty(B, F, dtype=y_B2F.dtype, device=y_B2F.device)
    _swiglu_kernel[(B, triton.cdiv(F, SWIGLU_BLOCK))](y_B2F, out, F, y_B2F.stride(0), BLOCK=SWIGLU_BLOCK)
    return out


def norm_cross_attend(x_BD: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(H)) v [B, N * H] for one position a row, q = w_q n(x) (n the RMSNorm;
    w_q [N * H, D]) and k, v [B, Nkv, K, H] the row's cached keys and values (all visible)."""
    _check_weight(w_q, "w_q")
    B, D = x_BD.shape
    _, n_kv, K, H = k.shape
    n_heads = w_q.shape[0] // H
    out = torch.empty(B, n_heads * H, dtype=x_BD.dtype, device=x_BD.device)
    _norm_cross_attend_kernel[(B, n_heads)](
        x_BD, norm_weight, w_q, k, v, out, D, eps, H ** -0.5, n_heads, n_kv, K,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H=H, BLOCK_K=triton.next_power_of_2(K))
    return out


def cross_attend(xn_BD: torch.Tensor, w_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 norm: tuple | None = None) -> torch.Tensor:
    """`norm_cross_attend` for many rows, after the norm: softmax(q k^T / sqrt(H)) v [B, N * H]
    for one position a row, q = w_q xn (w_q [N * H, D]; xn normed already, rows may be strided)
    and k, v [B, Nkv, K, H] the row's K cached keys and values (all visible). One kernel for the
    q product (row blocks of it, tl.dot) and the attention, where cuBLAS's product and
    `attend` took two. `norm` (ss, weight, eps): xn is not normed yet, and the kernel norms it
    on the way in (the products' NORM: ss the sums of squares `product_residual` returned with it)."""
    _check_weight(w_q, "w_q")
    assert xn_BD.stride(1) == 1, "cross_attend needs contiguous rows of xn"
    B, D = xn_BD.shape
    _, n_kv, K, H = k.shape
    n_heads = w_q.shape[0] // H
    assert w_q.shape == (n_heads * H, D), f"cross_attend: w_q {tuple(w_q.shape)} for rows of {D}, heads of {H}"
    assert n_heads % n_kv == 0, f"cross_attend: {n_heads} heads over {n_kv} key/value heads"
    out = torch.empty(B, n_heads * H, dtype=xn_BD.dtype, device=xn_BD.device)
    ss, g, eps, T = _norm_args(norm, xn_BD, out)
    _cross_attend_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), n_heads)](
        xn_BD, w_q, k, v, out, ss, g, B, D, H ** -0.5, n_heads, n_kv, K, xn_BD.stride(0),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), T, eps,
        H=H, HP=max(16, H), IEEE=_ieee(xn_BD), NORM=norm is not None, TP=triton.next_power_of_2(max(T, 1)),
        EARLY=CROSS_UNITS_EARLY)
    return out


# attend() splits a row's keys over programs until about this many run (an H200 has 132 SMs), and
# however many run, so that no program walks more than ATTEND_MAX_CHUNK keys (64 rows of blt-1b's
# 16 heads are 1,024 programs, which with 2,048-byte prompts each walked ~450 keys and lost to
# cuDNN); chunks hold at least ATTEND_MIN_CHUNK keys; a second kernel then combines the splits
ATTEND_PROGRAMS = 512
ATTEND_MIN_CHUNK = 64
ATTEND_MAX_CHUNK = 256


# cross_attend()'s programs load their row block's first two units' keys and values before the q
# product, which does not need them, where this is True (after it where False): one wait fewer on
# each decoder layer's cross-attention at 64 rows (blt-1b has 2 units; twenty-seventh session, not
# yet timed; compiled for sm_90 it holds 80 registers a thread where it held 64, no spills:
# benchmarks/hopper_compile.py). Read as the kernel is launched (and captured)
CROSS_UNITS_EARLY = True

# attend()'s programs of split 0 load their first block of keys and values (slots 0 to BLOCK_S - 1)
# at once with the row's bounds, which then only mask them, where this is True: one wait fewer on
# each program's chain of loads (the global stack's attention at 64 rows and ~40 patches a row
# took as long over the ~14 rows whose patch closes as over all 64: its time is that chain, not
# the bytes; twenty-sixth session). Read as the kernel is launched (and captured)
ATTEND_FIRST_BLOCK = True

# attend()'s loop over the blocks after the first loads each block before it sums the one before
# it where this is True, so two blocks' loads are in flight: compiled for sm_90 the loop is not
# software-pipelined, so each block waited a round trip of its own (twenty-seventh session,
# benchmarks/hopper_compile.py and the kernel's machine code; not yet timed). Read as the kernel
# is launched (and captured)
ATTEND_AHEAD = True

# attend()'s launch configuration, (BLOCK_S, num_warps), for (head dim, RoPE in the kernel) where
# given here, in place of the autotuner's choice: that is made on the first call of a shape, when
# a generator's caches hold its warm-up's few keys, and lasts while they fill (the global stack's
# ~4 patches a row then, ~40 late in a batch-64 grid cell)
ATTEND_CONFIG: dict[tuple[int, bool], tuple[int, int]] = {}


def attend_splits(programs: int, n_keys: int) -> int:
    """Programs a row and head for attend() over `n_keys` slots when rows x heads = `programs`:
    enough for ATTEND_PROGRAMS in all and for chunks of at most ATTEND_MAX_CHUNK keys, but never
    chunks under ATTEND_MIN_CHUNK keys (and so, with ATTEND_MAX_CHUNK >= 2 x ATTEND_MIN_CHUNK,
    never over ATTEND_MAX_CHUNK either)."""
    want = max(-(-ATTEND_PROGRAMS // programs), -(-n_keys // ATTEND_MAX_CHUNK))
    return max(1, min(want, n_keys // ATTEND_MIN_CHUNK))


def attend(q_BNH: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           n_keys: int | None = None, splits: int | None = None, last: torch.Tensor | None = None,
           first: torch.Tensor | None = None, ring: int | None = None, period: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(H) + mask) v [B, N, H] for one position a row: q [B, N, H] (any
    row and head strides), k, v [B, Nkv, S, H] a stack's cache, of which the first `n_keys`
    slots are read (all by default), and `mask` the additive mask over them ([B, 1, 1, >= n_keys]
    or any view whose last dim indexes the slots: 0 visible, -inf not). Hidden slots are not
    read, so what they hold (even NaN) does not matter; a row that sees no key gets zeros, not
    NaN. `splits`: programs a
    row and head (default: `attend_splits`). `last`: an integer device tensor, one value for all
    rows (a single element) or one a row ([B]), the last slot a row may see: slots after it are
    not read either (a cache's unfilled tail: the global cache past a row's patches, a ring
    before it wraps), the splits sharing what is left. `first`: an integer device tensor [B],
    each row's first slot: slots before it are not read (the encoder's cached bytes before the
    open patch). `mask` None: every slot read is visible (with `first` and `last`, a range).

    `ring` (mask None; a window, 0 for none): the cache is a ring of S slots holding every
    position so far at slot position % S; `last` (one value) is the step's position n and `first`
    ([B]) each row's document start, positions both: a row sees the slots of positions
    max(first, n - ring + 1) to n, and the step builds no mask (generate.RING_BOUNDS).

    `period` (default N): query head i reads key/value head (i % period) // (period / Nkv), so
    that q laid out unit by unit ([B, units * period, H], each unit's heads in turn: the encoder's
    patch units after their q product, no copy into head-major order) maps each unit's heads as
    grouped-query attention maps N heads."""
    B, N = q_BNH.shape[:2]
    return _attend_launch(q_BNH, (q_BNH.stride(0), q_BNH.stride(1)), B, N, k, v, mask, n_keys, splits, last, first,
                          ring=ring, period=period)


def rope_attend(y_BF: torch.Tensor, cos_H2: torch.Tensor, sin_H2: torch.Tensor, n_heads: int,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None,
                n_keys: int | None = None, splits: int | None = None, last: torch.Tensor | None = None,
                first: torch.Tensor | None = None, ring: int | None = None) -> torch.Tensor:
    """`rope_write` and `attend` in one kernel: from y = the q|k|v product's output [B, (N + 2
    Nkv) H] (rows may be strided), RoPE on q and k, k and v written into the caches at `slot`
    (as rope_write), and attend's output [B, N, H] over the caches (as attend, the other arguments
    as there). Each program takes the row's own slot from the k and v it computed, not from the
    cache, so no program waits for another's write: the own slot joins the online softmax after
    the cached ones, so the result is rope_write then attend's summed in another order."""
    B = y_BF.shape[0]
    assert y_BF.stride(1) == 1, "rope_attend needs contiguous rows of the q|k|v product"
    assert slot.numel() in (1, B), "one slot for all rows or one a row"
    rope = (cos_H2, sin_H2, slot, _rope_stride(cos_H2, sin_H2), 1 if slot.numel() == B > 1 else 0)
    return _attend_launch(y_BF, (y_BF.stride(0), 0), B, n_heads, k_cache, v_cache, mask, n_keys, splits, last,
                          first, rope, ring)


def _attend_launch(q, q_strides, B: int, N: int, k: torch.Tensor, v: torch.Tensor, mask, n_keys, splits, last,
                   first, rope=None, ring: int | None = None, period: int | None = None) -> torch.Tensor:
    """attend's kernel launch (and its combining kernel) for q [B, N, H] at `q_strides` (row,
    head), or with `rope` (cos, sin, slot, their row strides) q|k|v rows for rope_attend."""
    H = k.shape[-1]
    S = k.shape[2] if n_keys is None else n_keys
    if ring is not None:
        assert mask is None, "a ring's bounds take no mask"
        assert n_keys is None, "a ring's bounds cover the whole ring"
        assert last is not None, "a ring's bounds: its position as `last`"
        assert last.numel() == 1, "a ring's bounds: one position for all rows"
        assert first is not None, "a ring's bounds: the rows' document starts as `first`"
        ring = ring if ring > 0 else 2**30  # no window: every position since the document's start
    period = N if period is None else period
    assert N % period == 0, f"attend: {N} query heads in units of {period}"
    assert period % k.shape[1] == 0, f"attend: units of {period} query heads over {k.shape[1]} key/value heads"
    out = torch.empty(B, N, H, dtype=q.dtype, device=q.device)
    m = out if mask is None else mask.reshape(mask.shape[0], -1) if mask.dim() > 2 else mask  # [B or 1, >= S]
    if splits is None:
        splits = attend_splits(B * N, S)
    part = out if splits == 1 else torch.empty(B, N, splits, H + 2, dtype=torch.float32, device=out.device)
    cos, sin, slot, s_rope, s_slot = (out, out, out, 0, 0) if rope is None else rope
    fixed = ATTEND_CONFIG.get((H, rope is not None))
    kernel, meta = (_attend_kernel, {}) if fixed is None else \
        (_attend_kernel.fn, {"BLOCK_S": fixed[0], "num_warps": fixed[1]})
    kernel[(B, N, splits)](
        q, k, v, m, out, part, out if last is None else last, out if first is None else first, S, H ** -0.5,
        N, k.shape[1], period, *q_strides, k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), 0 if mask is None or m.shape[0] == 1 else m.stride(0), m.stride(-1),
        1 if last is not None and last.numel() > 1 else 0, splits, cos, sin, slot, s_rope, s_slot,
        0 if ring is None else ring, H=H, HAS_LAST=last is not None, HAS_FIRST=first is not None,
        HAS_MASK=mask is not None, ROPE=rope is not None, RING=ring is not None, PRE=ATTEND_FIRST_BLOCK,
        AHEAD=ATTEND_AHEAD, **meta)
    if splits > 1:
        _attend_combine_kernel[(B, N)](part, out, N, splits, H=H, BLOCK_J=triton.next_power_of_2(splits))
    return out


def linear_add(x_BD: torch.Tensor, a_BK: torch.Tensor, weight: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """beta * x + a @ weight.T [B, D] for a few rows (weight [D, K]): `torch.addmm`'s result and
    its single rounding (the sum in fp32, then the dtype), one kernel where cuBLAS runs a split-K
    product and its reduction for one row. `a` may have any row stride."""
    _check_weight(weight, "weight")
    B, D = x_BD.shape
    K = weight.shape[1]
    out = torch.empty_like(x_BD)
    _linear_add_kernel[lambda meta: (B, triton.cdiv(D, meta["BLOCK_O"]))](
        x_BD, a_BK, weight, out, D, K, beta, a_BK.stride(0))
    return out


# residual_norm's split of a product's K (one batched product over the slices, summed by the
# kernel): on an H200 at 64 rows (twentieth session, benchmarks/fused_norm.py) 2 was the best or
# within 0.4 µs of it for each of blt-1b's residual products
RESIDUAL_SPLITS = 2


def _mm32(a_BK: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """a @ weight.T summed and kept in fp32, as [S, B, D] partial sums over S slices of K (cuBLAS's
    fp32-output products; on a CPU, for the interpreter's tests, from fp32 copies)."""
    B, K = a_BK.shape
    D = weight.shape[0]
    S = splits if K % splits == 0 else 1
    a_s = a_BK.reshape(B, S, K // S).transpose(0, 1)  # S B K/S
    w_s = weight.view(D, S, K // S).permute(1, 2, 0)  # S K/S D
    if a_BK.is_cuda:
        return torch.bmm(a_s, w_s, out_dtype=torch.float32)
    return torch.bmm(a_s.float(), w_s.float())


def residual_norm(x_BD: torch.Tensor, a_BK: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float, splits: int | None = None, beta: float = 1.0) -> torch.Tensor:
    """x = beta * x + a @ weight.T in place (x [B, D] contiguous; one rounding, as addmm; beta 2:
    the decoder's cross-attention, whose residual is doubled, spec §16.1), and RMSNorm(x) *
    norm_weight returned: the residual product of a block with the norm that follows it. The
    product stays in fp32 (cuBLAS, over `splits` slices of K, default RESIDUAL_SPLITS, as one
    batched product in place of its split-K product and reduction), and one kernel adds, rounds
    and normalises, where addmm and RMSNorm took two or three (on an H200 at 64 rows: the global
    stack's w2 16.7 -> 11.7 µs, its wo 11.3 -> 8.1; the decoder's 11.7 -> 7.7 and 8.5 -> 6.2)."""
    _check_weight(weight, "weight")
    assert x_BD.is_contiguous(), "residual_norm writes x in place: it needs a contiguous x"
    B, D = x_BD.shape
    acc = _mm32(a_BK, weight, RESIDUAL_SPLITS if splits is None else splits)
    out = torch.empty_like(x_BD)
    _add_norm_kernel[(B,)](x_BD, acc, norm_weight, out, B, D, acc.shape[0], eps, beta,
                           BLOCK_D=triton.next_power_of_2(D))
    return out


def _ieee(x: torch.Tensor) -> bool:
    """Do tl.dot's products run in fp32 without TF32 (fp32 inputs; and the interpreter, whose bf16
    tl.dot is wrong in Triton 3.9: there bf16 values are multiplied exactly in fp32)?"""
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _norm_args(norm: tuple | None, x_BK: torch.Tensor, spare: torch.Tensor) -> tuple:
    """A kernel's NORM arguments (ss, norm weight, eps, T) for x's rows, from `norm` = (ss [K /
    SS_COLS, B] fp32, weight [K], eps) as a residual product made them; without it `spare` stands
    in for the pointers, which are not read."""
    if norm is None:
        return spare, spare, 0.0, 0
    ss, weight, eps = norm
    B, K = x_BK.shape
    what = f"norm: sums of squares {tuple(ss.shape)} {ss.dtype} for {B} rows of {K} (product_residual's: [K / SS_COLS, B] fp32)"
    assert K % SS_COLS == 0, what
    assert ss.shape == (K // SS_COLS, B), what
    assert ss.dtype == torch.float32, what
    assert ss.is_contiguous(), what
    assert weight.shape == (K,), f"norm: a weight of {tuple(weight.shape)} for rows of {K}"
    return ss, weight, float(eps), ss.shape[0]


def _product(x_BK: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, epi: int, norm: tuple | None = None,
             res: torch.Tensor | None = None, sso: torch.Tensor | None = None, beta: float = 1.0,
             rope: tuple | None = None, blocks: tuple[int, int, int] | None = None) -> None:
    """Launches _product_kernel (its docstring says what each EPI writes); `blocks` (BLOCK_M,
    BLOCK_N, BLOCK_K), 4 warps, in place of the tuned choice (for tests)."""
    _check_weight(weight, "weight")
    assert x_BK.stride(1) == 1, "the products need contiguous rows of x"
    M, K = x_BK.shape
    N = weight.shape[0]
    assert weight.shape[1] == K, f"a product of rows of {K} with a weight of {tuple(weight.shape)}"
    ss, g, eps, T = _norm_args(norm, x_BK, out)
    if rope is not None:  # (cos, sin, k cache, v cache, slot, q heads, k/v heads)
        cos, sin, kc, vc, slot, NQ, NK = rope
        H = kc.shape[-1]
        at = (NQ, NK, _rope_stride(cos, sin), 1 if slot.numel() == M > 1 else 0, *kc.stride()[:3], *vc.stride()[:3])
    else:  # (`out` stands in for the pointers, which are not read)
        cos = sin = kc = vc = slot = out
        H, at = 2, (0,) * 10
    args = (x_BK, ss, g, weight, out, out if res is None else res, out if sso is None else sso, cos, sin, kc, vc,
            slot, M, N, K, T, x_BK.stride(0), eps, beta, *at)
    consts = dict(NORM=norm is not None, EPI=epi, H=H, TP=triton.next_power_of_2(max(T, 1)), IEEE=_ieee(x_BK))
    if blocks is None:
        _product_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](*args, **consts)
    else:  # the tuner's kernel itself, with one fixed choice
        bm, bn, bk = blocks
        _product_kernel.fn[(triton.cdiv(N, bn), triton.cdiv(M, bm))](*args, **consts, BLOCK_M=bm, BLOCK_N=bn,
                                                                     BLOCK_K=bk)


def product(x_BK: torch.Tensor, weight: torch.Tensor, norm: tuple | None = None,
            blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x @ weight.T [B, N] in x's dtype (F.linear's), x's rows normed on the way in with `norm`
    (ss, norm weight, eps; ss the sums of squares `product_residual` returned with x): one kernel
    for RMSNorm and the product (blocks of rows, tl.dot)."""
    out = torch.empty(x_BK.shape[0], weight.shape[0], dtype=x_BK.dtype, device=x_BK.device)
    _product(x_BK, weight, out, EPI_PLAIN, norm, blocks=blocks)
    return out


def product_residual(a_BK: torch.Tensor, weight: torch.Tensor, x_BD: torch.Tensor, beta: float = 1.0,
                     norm: tuple | None = None, blocks: tuple[int, int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta * x + a @ weight.T [B, D], one rounding as addmm's; ss [D / SS_COLS, B] fp32, the
    sums of squares of its rows' rounded values over every SS_COLS features): a residual product
    whose result the next product (`product`, `product_rope`, `product_swiglu`, `cross_attend`
    with norm=(ss, weight, eps)) RMS-norms on the way in, so that the norm takes no kernel of its
    own. x [B, D] contiguous, not overwritten (autotuning runs a call several times)."""
    B, D = x_BD.shape
    assert x_BD.is_contiguous(), "product_residual needs a contiguous x"
    assert weight.shape[0] == D, f"product_residual: x {tuple(x_BD.shape)} with a weight of {tuple(weight.shape)}"
    assert D % SS_COLS == 0, f"product_residual: rows of {D} features; it needs a multiple of {SS_COLS}"
    out = torch.empty_like(x_BD)
    ss = torch.empty(D // SS_COLS, B, dtype=torch.float32, device=x_BD.device)
    _product(a_BK, weight, out, EPI_RESIDUAL, norm, res=x_BD, sso=ss, beta=beta, blocks=blocks)
    return out, ss


def product_rope(x_BK: torch.Tensor, w_qkv: torch.Tensor, cos_H2: torch.Tensor, sin_H2: torch.Tensor, n_heads: int,
                 n_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                 norm: tuple | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`norm_qkv_rope` for many rows (`rope_write` with its product): q [B, N, H], and k, v into
    the caches at `slot` (`cos_H2`, `sin_H2`, `slot` as norm_qkv_rope's), x's rows normed on the
    way in with `norm` (as `product`'s; without it x is normed already): one kernel for the norm,
    the q|k|v product, RoPE and the cache writes."""
    H = k_cache.shape[-1]
    assert w_qkv.shape[0] == (n_heads + 2 * n_kv_heads) * H, \
        f"product_rope: w_qkv {tuple(w_qkv.shape)} for {n_heads} + 2 x {n_kv_heads} heads of {H}"
    q = torch.empty(x_BK.shape[0], n_heads, H, dtype=x_BK.dtype, device=x_BK.device)
    _product(x_BK, w_qkv, q, EPI_ROPE, norm, rope=(cos_H2, sin_H2, k_cache, v_cache, slot, n_heads, n_kv_heads),
             blocks=blocks)
    return q


def product_swiglu(x_BK: torch.Tensor, w13: torch.Tensor, norm: tuple | None = None,
                   blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`norm_swiglu` for many rows: silu(w1 x) * w3 x [B, F] (w13 = [w1; w3], [2F, D]), x's rows
    normed on the way in with `norm` (as `product`'s): one kernel for the norm, the w1|w3
    product and SwiGLU."""
    assert w13.shape[0] % 2 == 0, f"product_swiglu: w13 {tuple(w13.shape)} is not [w1; w3]"
    out = torch.empty(x_BK.shape[0], w13.shape[0] // 2, dtype=x_BK.dtype, device=x_BK.device)
    _product(x_BK, w13, out, EPI_SWIGLU, norm, blocks=blocks)
    return out


HASH_EMBED_BLOCK = 1024


def hash_embed(x_B: torch.Tensor, hist_BW: torch.Tensor, tok_weight: torch.Tensor, hash_weight: torch.Tensor,
               coef: torch.Tensor, vocab: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One new byte a row embedded [B, D]: E_byte[x] + the sum of E_hash at its n-gram ids
    (BLT.embed for one position, spec §5), in one kernel where the ids' window, products, sum,
    floor mod, offsets, bag lookup and add took about ten. `hist_BW`: the ids before x, oldest
    first (at least coef's width - 1 of them); `coef`: [n_tables, width] int64, table n's prime
    powers laid over the window (bltkit.model.hashing._coef_tensor); `hash_weight`: the fused
    table [n_tables * vocab, D]. `out`: where to write it ([B, D], rows contiguous; a new tensor by
    default)."""
    _check_weight(tok_weight, "tok_weight")
    _check_weight(hash_weight, "hash_weight")
    B = x_B.shape[0]
    n_tables, width = coef.shape
    D = tok_weight.shape[1]
    assert coef.dtype == torch.int64, "hash_embed: coef is [n_tables, width] int64"
    assert coef.is_contiguous(), "hash_embed: coef is contiguous"
    assert hist_BW.shape[1] >= width - 1, f"hash_embed: {width - 1} history ids needed, got {hist_BW.shape[1]}"
    assert hash_weight.shape == (n_tables * vocab, D), \
        f"hash_embed: a fused table of {n_tables} x {vocab} rows of {D}, got {tuple(hash_weight.shape)}"
    if out is None:
        out = torch.empty(B, D, dtype=tok_weight.dtype, device=tok_weight.device)
    assert out.shape == (B, D), f"hash_embed: out must be [{B}, {D}], got {tuple(out.shape)}"
    assert out.stride(1) == 1, "hash_embed: out needs contiguous rows"
    assert out.dtype == tok_weight.dtype, f"hash_embed: out must be {tok_weight.dtype}"
    _hash_embed_kernel[(B, triton.cdiv(D, HASH_EMBED_BLOCK))](
        x_B, hist_BW, coef, tok_weight, hash_weight, out, D, hist_BW.shape[1], n_tables, vocab, hist_BW.stride(0),
        out.stride(0),
        WIDTH=width, BLOCK_W=triton.next_power_of_2(width), BLOCK_D=min(HASH_EMBED_BLOCK, triton.next_power_of_2(D)))
    return out


STEP_BLOCK = 1024


def _check_ids(name: str, *tensors: torch.Tensor) -> None:
    """The step kernels read and write int64 ids, counts and positions as contiguous rows."""
    for t in tensors:
        assert t.dtype == torch.int64, f"{name}: int64 tensors, got {t.dtype}"
        assert t.is_contiguous(), f"{name}: contiguous tensors"


def advance(x_B: torch.Tensor, doc_B: torch.Tensor, n: torch.Tensor, doc_start_B: torch.Tensor | None,
            eos_id: int) -> None:
    """A byte's advance in place, one kernel (where PyTorch takes four): each row whose byte n
    (x_B) is EOS counts one more document (doc_B) starting at n + 1 (doc_start_B, if given); then
    n (a one-element int64 tensor) += 1."""
    B = x_B.shape[0]
    _check_ids("advance", x_B, doc_B, n, *(() if doc_start_B is None else (doc_start_B,)))
    _advance_kernel[(1,)](x_B, doc_B, n, doc_B if doc_start_B is None else doc_start_B, B, eos_id,
                          HAS_START=doc_start_B is not None, BLOCK=min(STEP_BLOCK, triton.next_power_of_2(B)))


def feed(n: torch.Tensor, lens_B: torch.Tensor, buf_BT: torch.Tensor, next_B: torch.Tensor, x_B: torch.Tensor) -> None:
    """Byte n of each row into x_B and buf_BT[:, n], one kernel (where PyTorch takes four): the
    prompt's byte (buf_BT[:, n]) while n < lens_B, else the sampled one (next_B)."""
    B = x_B.shape[0]
    _check_ids("feed", n, lens_B, next_B, x_B, buf_BT)
    block = min(STEP_BLOCK, triton.next_power_of_2(B))
    _feed_kernel[(triton.cdiv(B, block),)](n, lens_B, buf_BT, next_B, x_B, B, buf_BT.stride(0), BLOCK=block)


def commit_rows(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor) -> None:
    """dst[:, :, b] = src[:, :, b] for each b where rows[b] (a bool or integer device tensor), in
    place, one kernel that copies those rows only (torch.where(rows, src, dst, out=dst) reads and
    writes them all): 6-dim tensors of one shape, any strides (the decoder's cross K/V of a patch
    step [2, layers, B, Nkv, K, H], src the permuted view of a batched product)."""
    assert src.dim() == dst.dim() == 6, "commit_rows: 6-dim tensors"
    assert src.shape == dst.shape, "commit_rows: tensors of one shape"
    assert src.dtype == dst.dtype, "commit_rows: one dtype"
    assert rows.numel() == src.shape[2], "commit_rows: one flag a row (dim 2)"
    n0, n1, B, n3, n4, n5 = src.shape
    _commit_rows_kernel[(n0 * n1, B)](src, dst, rows, n1, *src.stride(), *dst.stride(), n3, n4, n5,
                                      B3=triton.next_power_of_2(n3), B4=triton.next_power_of_2(n4),
                                      B5=triton.next_power_of_2(n5))


def greedy(x_BV: torch.Tensor, logits_BV: torch.Tensor, next_B: torch.Tensor) -> None:
    """Greedy decoding's end in one kernel: the logits x_BV (any float dtype) cast into logits_BV
    (fp32) and their argmax into next_B (int64), as `logits_BV.copy_(x_BV)` then `torch.argmax(
    logits_BV, -1, out=next_B)` (the first of equal largest values; the first NaN where one is)."""
    B, V = x_BV.shape
    assert logits_BV.shape == (B, V), "greedy: logits [B, V] of the input's shape"
    assert logits_BV.dtype == torch.float32, "greedy: fp32 logits"
    assert x_BV.stride(1) == 1, "greedy: rows of contiguous logits"
    assert logits_BV.stride(1) == 1, "greedy: rows of contiguous logits"
    _check_ids("greedy", next_B)
    _greedy_kernel[(B,)](x_BV, logits_BV, next_B, V, x_BV.stride(0), logits_BV.stride(0),
                         BLOCK_V=triton.next_power_of_2(V))


def norms(x_RD: torch.Tensor, weights_LD: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x under each of L weights, [L, R, D]: what L `F.rms_norm(x, (D,), w_l,
    eps)` calls and a stack of their outputs return, in one kernel (the decoder's cross layers' key
    and value norms of a closed patch's units: nine norms and a copy on the patch step's chain for
    blt-1b, ~23 µs at 64 rows on an H200, nineteenth session's trace)."""
    x_RD = x_RD.contiguous()
    _check_weight(weights_LD, "weights_LD")
    R, D = x_RD.shape
    L = weights_LD.shape[0]
    assert weights_LD.shape[1] == D, f"norms: rows of {D} features, weights {tuple(weights_LD.shape)}"
    out = torch.empty(L, R, D, dtype=x_RD.dtype, device=x_RD.device)
    _norms_kernel[(R,)](x_RD, weights_LD, out, R, D, L, eps, BLOCK_D=triton.next_power_of_2(D))
    return out
