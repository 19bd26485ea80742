"""Triton kernels for the generator's one-position block step (optional: needs `triton`).

A byte step on a GPU is bound by its count of small kernels, not by bandwidth (docs/benchmarks.md:
~1-2 µs an elementwise kernel, 4-9 µs a matrix-vector product). Eight kernels here replace the
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
- `linear_add`: beta * x + a @ W.T, the output and down projections with their residual, for a
  few rows (what `torch.addmm` computes, one rounding), where cuBLAS runs two kernels (split-K
  and its reduction, 8.7 + 1.7 µs for the global stack's output projection at one row).
- `residual_norm`: a block's residual add after cuBLAS's product (kept in fp32, split over K as
  one batched product) and the RMSNorm that follows it, for batches over a few rows: one kernel
  where addmm (for long K a split-K product and its reduction) and the norm took two or three.
- `attend`: one position's attention over a stack's cache with the step's additive mask, in
  place of SDPA, which for a single query runs a prefill kernel (cuDNN's, tiled for many queries:
  20-39 µs a call at 64 rows on an H200, a quarter of the batch-64 step; docs/benchmarks.md). A
  program per row and head walks the keys in blocks with an online softmax in fp32. Unlike the
  others it has no weights, so it serves any batch size, and it reads no slot after a row's
  last (a device tensor: the cache's unfilled tail stays unread). With few rows or long caches a row's
  keys are split over several programs and a second kernel combines their partial sums
  (flash-decoding; `attend_splits`).

Each projecting program computes whole output rows from the full input row, so no partial sums cross
programs; the input's norm is recomputed by every program (a D-long reduction, cheap next to the
weights it reads). Rounding follows the PyTorch path step by step (every tensor the reference
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


def _configs(options: list[dict], warps: list[int]) -> list:
    """Autotuning candidates; one under the interpreter, where timing them means nothing."""
    configs = [triton.Config(o, num_warps=w) for o, w in zip(options, warps, strict=True)]
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


# the kernels here launch with programmatic dependent launch (PDL, Hopper and later: `launch_pdl`)
# where this is True: a kernel is launched while the one before it still runs, and waits
# (griddepcontrol.wait) before it reads or writes anything, so that its launch and start overlap
# the other's end. Off: on an H200 (twenty-first session, blt-1b, bf16) one global layer's chain of
# Triton kernels alone took 67.0 µs a layer with it against 70.5 (benchmarks/pdl_chain.py), but the
# batch-64 step took 2.59 ms with it against 2.55-2.56 without (2.55 with PDL_ALL off;
# benchmarks/profile_generate.py --batch 64 --variants kernels-cublas-pdl,kernels-cublas-nopdl)
PDL = False
# with PDL, every kernel here launches so where this is True, else only the products and the residual
# norm after them (the global stack's chain past a few rows)
PDL_ALL = True
_pdl_devices: dict[int, bool] = {}


def pdl(device: torch.device) -> bool:
    """Do the kernels launch with PDL on `device` (PDL on, CUDA compute capability 9+, a Triton
    with griddepcontrol, not the interpreter)?"""
    if triton is None or not PDL or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pdl_devices:
        _pdl_devices[index] = (torch.cuda.get_device_capability(index)[0] >= 9
                               and hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents"))
    return _pdl_devices[index]


def _launch(t: torch.Tensor, chain: bool = False) -> dict:
    """A kernel launch's PDL arguments for tensors on t's device (`pdl`; `chain`: a product or the
    residual norm after one, see PDL_ALL)."""
    return {"GDC": True, "launch_pdl": True} if (PDL_ALL or chain) and pdl(t.device) else {"GDC": False}


if triton is not None:

    @triton.jit
    def _gdc(GDC: tl.constexpr):
        """With PDL: wait until the kernel before has ended (its writes visible), then let the next
        kernel launch. Every kernel here calls this before its first load or store, so the waits
        chain: the kernel before has itself waited for its own predecessor."""
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

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
        """RMSNorm of a chunk as bltkit's RMSNorm rounds it: (x * rstd) in the dtype, times w."""
        dt = x_row.dtype.element_ty
        x = tl.load(x_row + d, mask=d < D, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        return ((x * rstd).to(dt).to(tl.float32) * g).to(dt).to(tl.float32)

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
                              H: tl.constexpr, PAIRS: tl.constexpr, BLOCK_D: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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
                           skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, s_slot, s_rope, H: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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
                            BLOCK_D: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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
    def _swiglu_kernel(y_ptr, out_ptr, F, sy_b, BLOCK: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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
                                  BLOCK_D: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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

    # one warp a program: the best at 64 rows for the rings and the decoder's cross-attention (H200,
    # nineteenth session, benchmarks/attend_configs.py: 10.3 against 11.3 µs over the decoder's
    # ring, 3.0 against 3.6 over a patch's 2 units); tuned per head dim too (stacks of different
    # head dims can share every other key)
    @triton.autotune(configs=_configs([{"BLOCK_S": 64}, {"BLOCK_S": 32}, {"BLOCK_S": 128}, {"BLOCK_S": 64},
                                       {"BLOCK_S": 32}], [4, 2, 4, 8, 1]),
                     key=["S", "N", "NK", "H", "SPLITS", "HAS_LAST", "HAS_FIRST", "HAS_MASK"])
    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr, last_ptr, first_ptr, S, scale, N, NK,
                       sq_b, sq_n, sk_b, sk_n, sk_s, sv_b, sv_n, sv_s, sm_b, sm_s, s_last, SPLITS,
                       H: tl.constexpr, BLOCK_S: tl.constexpr, HAS_LAST: tl.constexpr, HAS_FIRST: tl.constexpr,
                       HAS_MASK: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
        b = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)  # this program's share of the keys (flash-decoding)
        n_read = S
        if HAS_LAST:  # the row's last visible slot, read on the device (no shape per cache fill)
            n_read = tl.minimum(S, tl.load(last_ptr + b * s_last).to(tl.int32) + 1)
        lo = 0
        if HAS_FIRST:  # the row's first visible slot (a row's own)
            lo = tl.maximum(tl.load(first_ptr + b).to(tl.int32), 0)
        chunk = tl.cdiv(tl.cdiv(tl.maximum(n_read - lo, 0), SPLITS), BLOCK_S) * BLOCK_S
        start = lo + split * chunk
        end = tl.minimum(n_read, start + chunk)
        dt = o_ptr.dtype.element_ty
        h = tl.arange(0, H)
        q = tl.load(q_ptr + b * sq_b + head * sq_n + h).to(tl.float32)
        kvh = head // (N // NK)  # grouped-query heads share a key/value head
        k_row = k_ptr + b * sk_b + kvh * sk_n
        v_row = v_ptr + b * sv_b + kvh * sv_n
        m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)  # running max (a scalar)
        l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)  # running sum of exp
        acc = tl.zeros([H], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):  # online softmax over key blocks (one pass, fp32)
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < end
            # the mask, keys and values load at once (no load waits for another); what hidden slots
            # hold (NaN, say, in a slot no one has written yet) is replaced by zeros
            # before any sum, so it stays out of them
            if HAS_MASK:
                mask = tl.load(m_ptr + b * sm_b + s * sm_s, mask=ok, other=float("-inf")).to(tl.float32)
            else:  # every slot in [lo, n_read) visible
                mask = tl.where(ok, 0.0, float("-inf"))
            kk = tl.load(k_row + s[:, None] * sk_s + h[None, :], mask=ok[:, None], other=0.0)
            vv = tl.load(v_row + s[:, None] * sv_s + h[None, :], mask=ok[:, None], other=0.0)
            seen = mask != float("-inf")
            kk = tl.where(seen[:, None], kk.to(tl.float32), 0.0)
            vv = tl.where(seen[:, None], vv.to(tl.float32), 0.0)
            sc = tl.where(seen, tl.sum(kk * q[None, :], axis=1) * scale + mask, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp(-inf) = 0
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(sc - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
            m_i = m_new
        if SPLITS == 1:
            tl.store(o_ptr + (b * N + head) * H + h, (acc / tl.where(l_i > 0, l_i, 1.0)).to(dt))  # none seen: 0
        else:  # the unnormalised sums, the max and the sum of weights, for _attend_combine_kernel
            row = part_ptr + ((b * N + head) * SPLITS + split) * (H + 2)
            tl.store(row + h, acc)
            tl.store(row + H, m_i)
            tl.store(row + H + 1, l_i)

    @triton.jit
    def _attend_combine_kernel(part_ptr, o_ptr, N, SPLITS, H: tl.constexpr, BLOCK_J: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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
    def _add_norm_kernel(x_ptr, acc_ptr, g_ptr, n_ptr, B, D, S, eps, BLOCK_D: tl.constexpr, GDC: tl.constexpr):
        """Row b: x + the sum of S fp32 partial products acc[s], rounded once to x's dtype and
        written back into x (what addmm computes); then RMSNorm of it as F.rms_norm rounds it (x *
        rstd * w in fp32, rounded once)."""
        _gdc(GDC)
        b = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(S):
            total += tl.load(acc_ptr + (s * B + b) * D + d, mask=ok, other=0.0)
        h = (tl.load(x_ptr + b * D + d, mask=ok, other=0.0).to(tl.float32) + total).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + b * D + d, h, mask=ok)
        hf = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
        g = tl.load(g_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(n_ptr + b * D + d, (hf * rstd * g).to(n_ptr.dtype.element_ty), mask=ok)

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
                           BLOCK_K: tl.constexpr, GDC: tl.constexpr):
        _gdc(GDC)
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

    # a product's blocks: BLOCK_N output features by BLOCK_K inputs a step, all rows (up to 64) at
    # once. On an H200 at 64 rows (twenty-first session, benchmarks/pdl_chain.py, 4 warps, 4
    # stages) the best of 16-40 shapes per product ran within 0.5 µs of cuBLAS: blt-1b's global
    # q|k|v 9.5 µs (cuBLAS 9.4), w1|w3 16.1 (15.7), wo over 4 slices 5.2 (cuBLAS's fp32-output
    # bmm over 2: 5.7), w2 over 4 slices 8.8 (9.2); these four were among each product's best three
    @triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=4)
                              for n, k in ((64, 128), (32, 64), (64, 64), (32, 128))][
                                  :1 if os.environ.get("TRITON_INTERPRET") == "1" else None],
                     key=["N", "K", "S", "EPI", "H"])
    @triton.jit
    def _product_kernel(x_ptr, w_ptr, o_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, M, N, K, KS, sx,
                        NQ, NK, s_rope, s_slot, skc_b, skc_n, skc_r, svc_b, svc_n, svc_r, S: tl.constexpr,
                        EPI: tl.constexpr, H: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """x @ w.T for up to 64 rows of x [M, K] (any row stride) and w [N, K], then per EPI:
        0: the fp32 sums over slice program_id(1) of K (KS inputs) into o [S, M, N];
        1: (q|k|v) the outputs rounded to x's dtype, RoPE on the q and k heads (in fp32, rounded
           once), q into o [M, NQ, H] and k, v into the caches at each row's slot (rope_write's);
        2: (w1|w3, stacked [w1; w3]) silu(a) * b into o [M, N / 2], as _silu_mul rounds it: a
           program's block is BLOCK_N / 2 rows of w1 and the same rows of w3."""
        BLOCK_M: tl.constexpr = 64
        HALF: tl.constexpr = BLOCK_N // 2
        j = tl.arange(0, BLOCK_N)
        if EPI == 2:
            f = tl.program_id(0) * HALF + j % HALF
            wrow = f + (j // HALF) * (N // 2)
            nok = f < N // 2
        else:
            wrow = tl.program_id(0) * BLOCK_N + j
            nok = wrow < N
        m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        mok = m < M
        k_lo = tl.program_id(1) * KS
        k_hi = tl.minimum(K, k_lo + KS)
        _gdc(GDC)
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kok = k < k_hi
            xt = tl.load(x_ptr + m[:, None] * sx + k[None, :], mask=mok[:, None] & kok[None, :], other=0.0)
            wt = tl.load(w_ptr + wrow[None, :].to(tl.int64) * K + k[:, None], mask=nok[None, :] & kok[:, None],
                         other=0.0)
            if IEEE:  # fp32 (no TF32), and the interpreter (whose bf16 products are wrong)
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        if EPI == 0:
            at = o_ptr + (tl.program_id(1) * M + m[:, None]) * N + wrow[None, :]
            tl.store(at, acc, mask=mok[:, None] & nok[None, :])
        elif EPI == 2:
            a, g = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), [0, 2, 1]))
            fo = tl.program_id(0) * HALF + tl.arange(0, HALF)
            y = _silu_mul(a.to(dt).to(tl.float32), g.to(dt).to(tl.float32), dt)
            tl.store(o_ptr + m[:, None] * (N // 2) + fo[None, :], y, mask=mok[:, None] & (fo < N // 2)[None, :])
        else:  # adjacent columns are RoPE's pairs (even, odd)
            e, o = tl.split(tl.reshape(acc, [BLOCK_M, HALF, 2]))
            e = e.to(dt).to(tl.float32)  # the product's outputs, rounded as F.linear's
            o = o.to(dt).to(tl.float32)
            col = tl.program_id(0) * BLOCK_N + 2 * tl.arange(0, HALF)  # a pair's even column
            head = col // H  # q heads, then k heads, then v heads
            i = (col % H) // 2
            ok = mok[:, None] & (col < N)[None, :]
            turn = ok & (head < NQ + NK)[None, :]
            c = tl.load(cos_ptr + m[:, None] * s_rope + i[None, :], mask=turn, other=1.0)
            s = tl.load(sin_ptr + m[:, None] * s_rope + i[None, :], mask=turn, other=0.0)
            e, o = e * c - o * s, o * c + e * s
            slot = tl.load(slot_ptr + m * s_slot, mask=mok, other=0)
            q_at = o_ptr + (m[:, None] * NQ + head[None, :]) * H
            k_at = kc_ptr + m[:, None] * skc_b + (head - NQ)[None, :] * skc_n + slot[:, None] * skc_r
            v_at = vc_ptr + m[:, None] * svc_b + (head - NQ - NK)[None, :] * svc_n + slot[:, None] * svc_r
            at = tl.where((head < NQ)[None, :], q_at, tl.where((head < NQ + NK)[None, :], k_at, v_at)) + 2 * i[None, :]
            tl.store(at, e.to(dt), mask=ok)
            tl.store(at + 1, o.to(dt), mask=ok)


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
        _norm_qkv_rope_kernel[lambda meta: (B, heads * triton.cdiv(H // 2, meta["PAIRS"]))](*args, H=H, **_launch(q))
    else:  # the tuner's kernel itself, with one fixed choice
        _norm_qkv_rope_kernel.fn[(B, heads * triton.cdiv(H // 2, pairs))](*args, H=H, PAIRS=pairs, BLOCK_D=128,
                                                                          **_launch(q))
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
        v_cache.stride(2), 1 if slot.numel() == B > 1 else 0, _rope_stride(cos_H2, sin_H2), H=H, **_launch(q))
    return q


def norm_swiglu(x_BD: torch.Tensor, norm_weight: torch.Tensor, eps: float, w13: torch.Tensor) -> torch.Tensor:
    """silu(w1 n(x)) * w3 n(x) [B, F] with n the RMSNorm and w13 = [w1; w3] ([2F, D])."""
    _check_weight(w13, "w13")
    B, D = x_BD.shape
    F = w13.shape[0] // 2
    out = torch.empty(B, F, dtype=x_BD.dtype, device=x_BD.device)
    _norm_swiglu_kernel[lambda meta: (B, triton.cdiv(F, meta["BLOCK_O"]))](x_BD, norm_weight, w13, out, D, F, eps,
                                                                           **_launch(out))
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
    _swiglu_kernel[(B, triton.cdiv(F, SWIGLU_BLOCK))](y_B2F, out, F, y_B2F.stride(0), BLOCK=SWIGLU_BLOCK,
                                                      **_launch(out))
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
        H=H, BLOCK_K=triton.next_power_of_2(K), **_launch(out))
    return out


# attend() splits a row's keys over programs until about this many run (an H200 has 132 SMs), and
# however many run, so that no program walks more than ATTEND_MAX_CHUNK keys (64 rows of blt-1b's
# 16 heads are 1,024 programs, which with 2,048-byte prompts each walked ~450 keys and lost to
# cuDNN); chunks hold at least ATTEND_MIN_CHUNK keys; a second kernel then combines the splits
ATTEND_PROGRAMS = 512
ATTEND_MIN_CHUNK = 64
ATTEND_MAX_CHUNK = 256


def attend_splits(programs: int, n_keys: int) -> int:
    """Programs a row and head for attend() over `n_keys` slots when rows x heads = `programs`:
    enough for ATTEND_PROGRAMS in all and for chunks of at most ATTEND_MAX_CHUNK keys, but never
    chunks under ATTEND_MIN_CHUNK keys (and so, with ATTEND_MAX_CHUNK >= 2 x ATTEND_MIN_CHUNK,
    never over ATTEND_MAX_CHUNK either)."""
    want = max(-(-ATTEND_PROGRAMS // programs), -(-n_keys // ATTEND_MAX_CHUNK))
    return max(1, min(want, n_keys // ATTEND_MIN_CHUNK))


def attend(q_BNH: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           n_keys: int | None = None, splits: int | None = None, last: torch.Tensor | None = None,
           first: torch.Tensor | None = None) -> torch.Tensor:
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
    open patch). `mask` None: every slot read is visible (with `first` and `last`, a range)."""
    B, N, H = q_BNH.shape
    S = k.shape[2] if n_keys is None else n_keys
    out = torch.empty(B, N, H, dtype=q_BNH.dtype, device=q_BNH.device)
    m = out if mask is None else mask.reshape(mask.shape[0], -1) if mask.dim() > 2 else mask  # [B or 1, >= S]
    if splits is None:
        splits = attend_splits(B * N, S)
    part = out if splits == 1 else torch.empty(B, N, splits, H + 2, dtype=torch.float32, device=out.device)
    _attend_kernel[(B, N, splits)](
        q_BNH, k, v, m, out, part, out if last is None else last, out if first is None else first, S, H ** -0.5,
        N, k.shape[1], q_BNH.stride(0), q_BNH.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), 0 if mask is None or m.shape[0] == 1 else m.stride(0), m.stride(-1),
        1 if last is not None and last.numel() > 1 else 0, splits, H=H, HAS_LAST=last is not None,
        HAS_FIRST=first is not None, HAS_MASK=mask is not None, **_launch(out))
    if splits > 1:
        _attend_combine_kernel[(B, N)](part, out, N, splits, H=H, BLOCK_J=triton.next_power_of_2(splits),
                                       **_launch(out))
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
        x_BD, a_BK, weight, out, D, K, beta, a_BK.stride(0), **_launch(out))
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


# the Triton products (`partials`, `qkv_rope`, `swiglu_product`) take rows in blocks of this many
# (the tensor cores' 64-row tiles); past it they read the weights once a block, and the generator
# keeps cuBLAS's products
PRODUCT_MAX_ROWS = 64

# `partials`' slices of K by default (a program a block of outputs and a slice, so that blt-1b's
# 2,048-wide products make 128 programs at 64 outputs a block: an H200 has 132 SMs). On an H200 at
# 64 rows (twenty-first session, benchmarks/pdl_chain.py) 4 was the best for the global stack's wo
# (5.2 µs) and w2 (8.8)
PRODUCT_SPLITS = 4


def _product(x_BK: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, epi: int, splits: int = 1,
             rope: tuple | None = None) -> None:
    """One `_product_kernel` launch (epilogue `epi`; `rope`: (cos, sin, n_heads, n_kv_heads,
    k_cache, v_cache, slot) for epilogue 1)."""
    _check_weight(weight, "weight")
    assert x_BK.stride(-1) == 1, "the products need contiguous rows (any row stride)"
    M, K = x_BK.shape
    N = weight.shape[0]
    assert weight.shape[1] == K, f"the product's input has {K} features, its weight {tuple(weight.shape)}"
    KS = triton.cdiv(triton.cdiv(K, splits), 64) * 64  # a slice's inputs (the last slices may hold none)
    if rope is None:
        cos = sin = kc = vc = slot = out
        NQ = NK = s_rope = s_slot = 0
        kst = vst = (0, 0, 0)
        H = 1
    else:
        cos, sin, NQ, NK, kc, vc, slot = rope
        s_rope, s_slot = _rope_stride(cos, sin), 1 if slot.numel() == M > 1 else 0
        kst, vst, H = kc.stride()[:3], vc.stride()[:3], kc.shape[-1]
    ieee = x_BK.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"

    def grid(meta):
        per = meta["BLOCK_N"] // 2 if epi == 2 else meta["BLOCK_N"]
        return triton.cdiv(N // 2 if epi == 2 else N, per), splits, triton.cdiv(M, PRODUCT_MAX_ROWS)

    _product_kernel[grid](x_BK, weight, out, cos, sin, kc, vc, slot, M, N, K, KS, x_BK.stride(0), NQ, NK, s_rope,
                          s_slot, *kst, *vst, S=splits, EPI=epi, H=H, IEEE=ieee, **_launch(out, chain=True))


def partials(a_BK: torch.Tensor, weight: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """a @ weight.T [S, B, D] in fp32, as partial sums over S slices of K (default
    PRODUCT_SPLITS), for a kernel that sums them (residual_norm's): a Triton product, where
    `_mm32` is cuBLAS's."""
    S = PRODUCT_SPLITS if splits is None else splits
    out = torch.empty(S, a_BK.shape[0], weight.shape[0], dtype=torch.float32, device=a_BK.device)
    _product(a_BK, weight, out, 0, S)
    return out


def qkv_rope(x_BD: torch.Tensor, w_qkv: torch.Tensor, cos_H2: torch.Tensor, sin_H2: torch.Tensor, n_heads: int,
             n_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`rope_write(F.linear(x, w_qkv), ...)` in one kernel: the q|k|v product of x [B, D] (already
    normed), RoPE on q and k, and k, v into the caches at `slot`; the arguments as
    `norm_qkv_rope`'s. For batches past the matrix-vector kernels (up to PRODUCT_MAX_ROWS rows a
    block)."""
    H = k_cache.shape[-1]
    q = torch.empty(x_BD.shape[0], n_heads, H, dtype=x_BD.dtype, device=x_BD.device)
    _product(x_BD, w_qkv, q, 1, rope=(cos_H2, sin_H2, n_heads, n_kv_heads, k_cache, v_cache, slot))
    return q


def swiglu_product(x_BD: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """`swiglu(F.linear(x, w13))` in one kernel: silu(w1 x) * w3 x [B, F] with w13 = [w1; w3]
    ([2F, D]) and x [B, D] (already normed)."""
    out = torch.empty(x_BD.shape[0], w13.shape[0] // 2, dtype=x_BD.dtype, device=x_BD.device)
    _product(x_BD, w13, out, 2)
    return out


def residual_norm(x_BD: torch.Tensor, a_BK: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float, splits: int | None = None, product: bool = False) -> torch.Tensor:
    """x += a @ weight.T in place (x [B, D] contiguous; one rounding, as addmm), and RMSNorm(x) *
    norm_weight returned: the residual product of a block with the norm that follows it. The
    product stays in fp32 (cuBLAS, over `splits` slices of K, default RESIDUAL_SPLITS, as one
    batched product in place of its split-K product and reduction), and one kernel adds, rounds
    and normalises, where addmm and RMSNorm took two or three (on an H200 at 64 rows: the global
    stack's w2 16.7 -> 11.7 µs, its wo 11.3 -> 8.1; the decoder's 11.7 -> 7.7 and 8.5 -> 6.2).
    `product`: the Triton product (`partials`, over PRODUCT_SPLITS slices by default) in place of
    cuBLAS's, both kernels launched with PDL where `pdl` says so."""
    _check_weight(weight, "weight")
    assert x_BD.is_contiguous(), "residual_norm writes x in place: it needs a contiguous x"
    B, D = x_BD.shape
    if product:  # the Triton product (`partials`)
        acc = partials(a_BK, weight, splits)
    else:
        acc = _mm32(a_BK, weight, RESIDUAL_SPLITS if splits is None else splits)
    out = torch.empty_like(x_BD)
    _add_norm_kernel[(B,)](x_BD, acc, norm_weight, out, B, D, acc.shape[0], eps,
                           BLOCK_D=triton.next_power_of_2(D), **_launch(out, chain=True))
    return out
