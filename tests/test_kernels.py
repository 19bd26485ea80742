"""The generator's Triton kernels (bltkit.kernels) against the PyTorch step they replace.

They run on a CPU under Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported); without the `triton` package (CI's install) this module is skipped, and on a GPU
machine `benchmarks/profile_generate.py --variants kernels` runs them compiled.

Under the interpreter a whole generation is slow: Triton 3.9's interpreter patches
triton.language again at every call of a nested @triton.jit function (~2 ms each; a 12-byte
generation with the tiny model makes ~20,000 of them), so the module took 30 minutes on a 2-core
machine. There the generator tests marked INTERPRETER_SLOW are skipped unless
BLTKIT_INTERPRETER_FULL=1; one of each kind still runs (~10 minutes with the kernel tests), and
all of them run compiled on a GPU (`benchmarks/gpu_measure.sh`'s gpu_tests).
"""

from __future__ import annotations

import collections
import os

import pytest

if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's @jit runs (at bltkit.kernels' import)
pytest.importorskip("triton")

import torch
import torch.nn.functional as F
from test_generate import eos_heavy, make_model, random_prompts

from bltkit import kernels
from bltkit.bytes import EOS_ID, encode
from bltkit.generate import Generator, reference_generate
from bltkit.model.layers import RMSNorm, apply_rope, rope_cos_sin

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# 100-400 s each under the interpreter (the module's docstring); compiled on a GPU, ~1 s
INTERPRETER_SLOW = pytest.mark.skipif(
    INTERPRETED and os.environ.get("BLTKIT_INTERPRETER_FULL") != "1",
    reason="minutes under Triton's interpreter: set BLTKIT_INTERPRETER_FULL=1 (a GPU runs it compiled)")


def _rnd(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype -> fp32 as the kernels round: to nearest on a GPU; Triton's interpreter
    truncates bf16 conversions (measured: every one of 1,000 random values), so there the
    reference truncates too and the test checks the kernels' arithmetic, not numpy's rounding."""
    if dtype == torch.float32:
        return t.float()
    if INTERPRETED:
        return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return t.to(dtype).float()


def _normed(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """bltkit's RMSNorm (F.rms_norm: x * rstd * w in fp32, rounded once) of x's rounded values, in
    fp32."""
    return _rnd(F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.eps), x.dtype)


def _case(dtype, B=3, D=96, N=4, NK=2, H=16, R=8, F_=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(D).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
    x = torch.randn(B, D, generator=g).to(DEV, dtype)
    w_qkv = (torch.randn((N + 2 * NK) * H, D, generator=g) / D**0.5).to(DEV, dtype)
    w13 = (torch.randn(2 * F_, D, generator=g) / D**0.5).to(DEV, dtype)
    return norm, x, w_qkv, w13


# fp32: the same operations, summed in another order (1e-5). bf16: the kernels accumulate the
# products in another order than cuBLAS / CPU BLAS, so a rounded projection may land one bf16
# step away; RoPE (or SwiGLU) then combines two such values and rounds once more: up to ~3 steps
# of 2^-8 relative, bounded here by 4 steps of the largest magnitude (2^-6)
BF16_TOL = 2**-6


# the tuned choice (under the interpreter its first: 16 pairs a program, more than a head of 8 has,
# so half its lanes are masked), 2 pairs (four programs a head), 8 (a whole head a program)
def _assert_rope_written(q, kc, vc, slots, qk, v_want, scale: float, tol: float) -> None:
    """q [B, N, H] and each row's k (qk's heads after N) and v at its slot as wanted, within tol *
    scale, and no other slot of either cache written."""
    N = q.shape[1]
    B, _, R, _ = kc.shape
    rows = torch.arange(B)
    k_got, v_got = kc[rows, :, slots], vc[rows, :, slots]  # B NK H
    for got, want in ((q, qk[:, :N]), (k_got, qk[:, N:]), (v_got, v_want)):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol * scale)
    written = torch.zeros(B, R, dtype=torch.bool)
    written[rows, slots] = True
    assert not kc.transpose(1, 2)[~written].any()  # only each row's slot is written
    assert not vc.transpose(1, 2)[~written].any()


@pytest.mark.parametrize("pairs", [None, 2, 8])
@pytest.mark.parametrize("per_row", [False, True])  # a ring's shared slot, or each row's global-cache slot
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
def test_norm_qkv_rope_equals_the_pytorch_step(dtype, tol, per_row, pairs):
    N, NK, H, R = 4, 2, 16, 8
    norm, x, w_qkv, _ = _case(dtype, N=N, NK=NK, H=H, R=R)
    B = x.shape[0]
    pos = torch.tensor([[37], [3], [100]] if per_row else [[37]], device=DEV)
    slots = [5, 2, 7] if per_row else [5] * B
    cos, sin = rope_cos_sin(pos, H, 10000.0)  # [1 or B, 1, H/2, 1], [.., H/2, 2]
    kc = torch.zeros(B, NK, R, H, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    slot = torch.tensor(slots if per_row else [5], device=DEV)
    c, s_ = cos.reshape(len(pos), -1).squeeze(0).contiguous(), sin.reshape(len(pos), -1, 2)[..., 1].squeeze(0)
    q = kernels.norm_qkv_rope(x, norm.weight, norm.eps, w_qkv, c, s_.contiguous(), N, NK, kc, vc, slot, pairs)
    y = _rnd(_normed(norm, x) @ w_qkv.float().T, dtype).view(B, 1, N + 2 * NK, H)  # fp32 accumulation
    qk = _rnd(apply_rope(y[:, :, :N + NK], cos, sin), dtype)[:, 0]  # (apply_rope computes in fp32)
    _assert_rope_written(q, kc, vc, slots, qk, y[:, 0, N + NK:], y.abs().max().item(), tol)


@pytest.mark.parametrize("per_row", [False, True])  # a ring's shared slot and position, or each row's
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_rope_write_equals_the_pytorch_step(dtype, tol, per_row):
    """RoPE and the cache writes after a q|k|v product made elsewhere, from strided rows: q as
    apply_rope leaves it, k and v at each row's slot and nowhere else (one rounding of the fp32
    rotation: one bf16 step at the largest magnitude at most)."""
    N, NK, H, R, B = 4, 2, 16, 8, 3
    g = torch.Generator().manual_seed(6)
    y = torch.randn(B, (N + 2 * NK) * H + 5, generator=g).to(DEV, dtype)[:, 5:]  # strided rows
    pos = torch.tensor([[37], [3], [100]] if per_row else [[37]], device=DEV)
    slots = [5, 2, 7] if per_row else [5] * B
    cos, sin = rope_cos_sin(pos, H, 10000.0)
    c, s_ = cos.reshape(len(pos), -1).squeeze(0).contiguous(), sin.reshape(len(pos), -1, 2)[..., 1].squeeze(0)
    kc = torch.zeros(B, NK, R, H, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    slot = torch.tensor(slots if per_row else [5], device=DEV)
    q = kernels.rope_write(y, c, s_.contiguous(), N, NK, kc, vc, slot)
    y4 = y.reshape(B, 1, N + 2 * NK, H)
    qk = apply_rope(y4[:, :, :N + NK], cos, sin)[:, 0]
    _assert_rope_written(q, kc, vc, slots, qk, y4[:, 0, N + NK:], y.abs().max().item(), tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
def test_norm_swiglu_equals_the_pytorch_step(dtype, tol):
    norm, x, _, w13 = _case(dtype)
    out = kernels.norm_swiglu(x, norm.weight, norm.eps, w13)
    a, b = _rnd(_normed(norm, x) @ w13.float().T, dtype).chunk(2, dim=-1)
    want = _rnd(_rnd(F.silu(a), dtype) * b, dtype)
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("block", [None, 16])  # the default block (one a row here), or 3 a row, one partly masked
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_swiglu_equals_the_pytorch_step(dtype, tol, block, monkeypatch):
    """silu(a) * b of the w1|w3 product's output, from strided rows (a view of a wider tensor),
    with PyTorch's two roundings: in bf16 the same value (silu in fp32, rounded, times b in fp32,
    rounded: the same operations as F.silu and the product); in fp32 within an exp's last bits."""
    if block is not None:
        monkeypatch.setattr(kernels, "SWIGLU_BLOCK", block)
    g = torch.Generator().manual_seed(2)
    y = (3 * torch.randn(5, 2 * 40 + 6, generator=g)).to(DEV, dtype)[:, 3:83]  # B 2F, row stride 86
    out = kernels.swiglu(y)
    a, b = y.float().chunk(2, dim=-1)
    want = _rnd(_rnd(F.silu(a), dtype) * b, dtype)
    assert out.shape == (5, 40)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize(("N", "NK", "K"), [(4, 4, 2), (4, 2, 3)])  # the decoder's 2 units; GQA, 3 keys
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
def test_norm_cross_attend_equals_the_pytorch_step(dtype, tol, N, NK, K):
    H = 16
    norm, x, _, _ = _case(dtype, N=N, NK=NK, H=H)
    B, D = x.shape
    g = torch.Generator().manual_seed(1)
    w_q = (torch.randn(N * H, D, generator=g) / D**0.5).to(DEV, dtype)
    k = torch.randn(B, NK, K, H, generator=g).to(DEV, dtype)
    v = torch.randn(B, NK, K, H, generator=g).to(DEV, dtype)
    out = kernels.norm_cross_attend(x, norm.weight, norm.eps, w_q, k, v)
    q = _rnd(_normed(norm, x) @ w_q.float().T, dtype).view(B, N, 1, H)
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=N != NK).reshape(B, N * H)
    torch.testing.assert_close(out.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())


# B: fewer rows than a row block, and rows over three blocks of 16 (the last one partial); heads
# of 8 (padded to tl.dot's 16), 16 and 32; GQA; K of 1-3 units
@pytest.mark.parametrize("early", [True, False])  # the first two units loaded before the q product or after
@pytest.mark.parametrize(("B", "N", "NK", "K", "H"), [(3, 4, 4, 2, 16), (37, 4, 2, 3, 8), (40, 2, 1, 1, 32)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
def test_cross_attend_equals_the_pytorch_step(dtype, tol, B, N, NK, K, H, early, monkeypatch):
    """kernels.cross_attend = the decoder's cross-attention after its norm: the q product rounded
    to the dtype (F.linear's), then SDPA over the row's K units; xn a strided view; its first
    two units' keys and values loaded before the product (kernels.CROSS_UNITS_EARLY) or after."""
    monkeypatch.setattr(kernels, "CROSS_UNITS_EARLY", early)
    g = torch.Generator().manual_seed(2)
    D = 72  # not a multiple of any input block: the masked tail is read as zeros
    xn = torch.randn(B, 2 * D, generator=g).to(DEV, dtype)[:, :D]
    w_q = (torch.randn(N * H, D, generator=g) / D**0.5).to(DEV, dtype)
    k = torch.randn(B, NK, K, H, generator=g).to(DEV, dtype)
    v = torch.randn(B, NK, K, H, generator=g).to(DEV, dtype)
    out = kernels.cross_attend(xn, w_q, k, v)
    q = _rnd(xn.float() @ w_q.float().T, dtype).view(B, N, 1, H)
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=N != NK).reshape(B, N * H)
    assert out.shape == (B, N * H)
    torch.testing.assert_close(out.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize(("N", "NK"), [(4, 4), (4, 2)])
def test_attend_with_a_period_maps_each_units_heads(N, NK):
    """q laid out unit by unit ([B, K * N, H]: the encoder's patch units after their q product)
    with period N: head h of unit u sees h's key/value head, as SDPA over each unit's N heads
    (GQA), over each row's bytes first..last."""
    B, K, H, S = 3, 3, 16, 20
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, K * N, H, generator=g).to(DEV)
    k = torch.randn(B, NK, S, H, generator=g).to(DEV)
    v = torch.randn(B, NK, S, H, generator=g).to(DEV)
    first, last = torch.tensor([0, 4, 19], device=DEV), torch.tensor([6, 11, 19], device=DEV)
    out = kernels.attend(q, k, v, None, splits=1, last=last, first=first, period=N)
    for row in range(B):
        a, b = first[row].item(), last[row].item() + 1
        want = F.scaled_dot_product_attention(q[row].view(K, N, 1, H), k[row:row + 1, :, a:b].expand(K, -1, -1, -1),
                                              v[row:row + 1, :, a:b].expand(K, -1, -1, -1), enable_gqa=N != NK)
        torch.testing.assert_close(out[row], want.reshape(K * N, H), rtol=0, atol=1e-5)


@pytest.mark.parametrize("starts", [True, False])  # the rings' document starts kept (RING_BOUNDS) or not
def test_advance_and_feed_equal_the_pytorch_steps(starts):
    """kernels.advance: rows whose byte is EOS count a document starting at n + 1, then n + 1;
    kernels.feed: byte n is the prompt's while n < the row's length, else the sampled one, into x
    and the row's bytes (37 rows: one block of 64, its tail masked)."""
    g = torch.Generator().manual_seed(6)
    B, T, n0 = 37, 12, 7
    x = torch.randint(EOS_ID - 1, EOS_ID + 2, (B,), generator=g).to(DEV)
    doc = torch.randint(0, 3, (B,), generator=g).to(DEV)
    start = torch.randint(0, n0, (B,), generator=g).to(DEV) if starts else None
    n = torch.tensor(n0, device=DEV)
    eos = x == EOS_ID
    assert eos.any()
    assert not eos.all()
    want_doc, want_start = doc + eos, torch.where(eos, n0 + 1, start) if starts else None
    kernels.advance(x, doc, n, start, EOS_ID)
    assert n.item() == n0 + 1
    assert torch.equal(doc, want_doc)
    assert not starts or torch.equal(start, want_start)
    buf = torch.randint(0, 256, (B, T), generator=g).to(DEV)
    lens = torch.randint(0, T, (B,), generator=g).to(DEV)
    sampled = torch.randint(0, 256, (B,), generator=g).to(DEV)
    want_x = torch.where(n < lens, buf[:, n0 + 1], sampled)
    assert (n < lens).any()  # rows in their prompt and rows past it
    assert not (n < lens).all()
    want_buf = buf.clone()
    want_buf[:, n0 + 1] = want_x
    kernels.feed(n, lens, buf, sampled, x)
    assert torch.equal(x, want_x)
    assert torch.equal(buf, want_buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_embed_equals_the_model_embedding(dtype):
    """kernels.hash_embed = BLT.embed of one new byte a row after its history (the generator's
    step): ids from a random history (negative int64 hashes among them: the floor mod), the
    fused table's rows at each table's offset, the byte row; exact in fp32, and in bf16 within
    the rounding of the bag's sum (the kernel rounds it once, as EmbeddingBag accumulates in
    fp32; the model's bf16 bag on a CPU may round in between)."""
    from bltkit.model import hashing

    model = make_model(seed=3).to(DEV, dtype)
    c = model.config
    g = torch.Generator().manual_seed(4)
    B, width = 9, max(c.hash_sizes)
    hist = torch.randint(0, 260, (B, width - 1), generator=g).to(DEV)
    hist[0] = 0  # the prompt's start: BOE padding
    x = torch.randint(0, 260, (B,), generator=g).to(DEV)
    coef = hashing._coef_tensor(tuple(c.hash_sizes), c.hash_functions, width, DEV)
    windows = torch.cat([hist, x[:, None]], dim=1)
    assert ((windows[:, None, :] * coef).sum(-1) < 0).any()  # wrapped products: negative hashes
    out = kernels.hash_embed(x, hist, model.local_encoder.tok_embeddings.weight,
                             model.encoder_hash_tok_embedding.weight, coef, c.hash_vocab)
    want = model.embed(x[:, None], history_BH=hist)[:, 0]
    assert out.shape == want.shape
    assert out.dtype == dtype
    tol = 0 if dtype == torch.float32 else 2**-6 * want.abs().max().item()
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=tol)


def test_kernels_compile_for_hopper():
    """Every kernel the generator launches compiles for sm_90 (an H100 / H200), the attention
    kernel with every configuration its autotuner may pick, here too without a GPU: Triton's
    compiler and its bundled ptxas, in a process without the interpreter
    (benchmarks/hopper_compile.py --quick). The interpreter runs what the compiler may refuse
    (the tool found the cross-attention's spills in the twenty-seventh session, where no GPU was
    lent)."""
    import subprocess
    import sys

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton has no bundled ptxas and cuobjdump")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "hopper_compile.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all compiled for sm_90" in run.stdout
    assert "global step (RoPE, bounds), H 128, BLOCK_S 16 x 1 warps" in run.stdout


@pytest.fixture(params=[(None, True, True), (16, True, True), (16, False, False), (16, True, False)],
                ids=["tuned", "block16", "block16-late", "block16-one-ahead"])
def attend_blocks(request, monkeypatch):
    """The attention kernel as tuned (one configuration under the interpreter: blocks of 64 slots,
    more than most caches here), and with blocks of 16 slots (kernels.ATTEND_CONFIG), where the
    first block, loaded with the row's bounds (kernels.ATTEND_FIRST_BLOCK), and the loop over the
    blocks after it, each block loaded before the one before it is summed (kernels.ATTEND_AHEAD),
    all run; or with either off."""
    block, early, ahead = request.param
    if block is not None:
        monkeypatch.setattr(kernels, "ATTEND_CONFIG", {(h, rope): (block, 1) for h in (16, 64, 128)
                                                       for rope in (False, True)})
    monkeypatch.setattr(kernels, "ATTEND_FIRST_BLOCK", early)
    monkeypatch.setattr(kernels, "ATTEND_AHEAD", ahead)


# the kernel and the reference both compute in fp32 from the same inputs (summation order apart)
# and round once to the dtype: one bf16 step (2^-7 relative) at the largest magnitude at most
@pytest.mark.parametrize("splits", [1, 3])  # one program a row and head, or three and their combination
@pytest.mark.parametrize(("N", "NK", "S", "n_keys"), [(4, 4, 8, None), (4, 2, 150, 130)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_attend_equals_sdpa(dtype, tol, N, NK, S, n_keys, splits, attend_blocks):
    """One query a row over a cache's first n_keys slots with an additive mask: GQA, q a strided
    view (as the fused q|k|v product leaves it), and a row whose only visible key is the last, so
    the online softmax starts on fully masked key blocks (S = 150 spans several blocks) and, split,
    some splits see nothing (and with S = 8 some have no keys at all)."""
    B, H = 3, 16
    L = n_keys or S
    g = torch.Generator().manual_seed(2)
    y = torch.randn(B, N + 2, H, generator=g).to(DEV, dtype)
    q = y[:, :N]  # strided rows
    k = torch.randn(B, NK, S, H, generator=g).to(DEV, dtype)
    v = torch.randn(B, NK, S, H, generator=g).to(DEV, dtype)
    visible = torch.rand(B, L, generator=g) < 0.5
    visible[0, 0] = True
    visible[1] = False
    visible[1, L - 1] = True
    visible[2] = True
    mask = torch.full((B, 1, 1, L), float("-inf"), dtype=dtype).masked_fill_(visible[:, None, None], 0.0).to(DEV)
    out = kernels.attend(q, k, v, mask, n_keys, splits)
    want = F.scaled_dot_product_attention(q.float()[:, :, None], k.float()[:, :, :L], v.float()[:, :, :L],
                                          attn_mask=visible[:, None, None].to(DEV), enable_gqa=N != NK)[:, :, 0]
    assert out.shape == (B, N, H)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())


# the global step's: each row's own slot, bounds and no mask (GLOBAL_BOUNDS); a ring's: one slot
# for all rows, the ring's additive mask, and its own slot hidden for one row (as no step asks, so
# the own slot, taken from the program's registers, is seen to stay under the mask)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_rope_attend_equals_rope_write_then_attend(dtype, tol, per_row, splits, attend_blocks):
    """RoPE, the cache writes and the attention in one kernel give what rope_write and attend give
    in two: the output, and k and v written at each row's slot of every key/value head and nowhere
    else, over a q|k|v product's strided rows with grouped queries (4 on 2). The RoPE is computed
    in another order of the same fp32 operations (a compiler may fuse them differently), and the
    own slot joins the online softmax after the others: fp32 sums in another order, one rounding
    step of the output at most."""
    N, NK, H, S, B = 4, 2, 16, 150, 3
    g = torch.Generator().manual_seed(11)
    y = torch.randn(B, (N + 2 * NK) * H + 5, generator=g).to(DEV, dtype)[:, 5:]  # strided rows
    pos = torch.tensor([[37], [3], [100]] if per_row else [[37]], device=DEV)
    cos, sin = rope_cos_sin(pos, H, 10000.0)
    c = cos.reshape(len(pos), -1).squeeze(0).contiguous()
    s_ = sin.reshape(len(pos), -1, 2)[..., 1].squeeze(0).contiguous()
    kc = torch.randn(B, NK, S, H, generator=g).to(DEV, dtype)
    vc = torch.randn(B, NK, S, H, generator=g).to(DEV, dtype)
    if per_row:  # the global cache: slots [first, slot] seen, the own one last
        slot = torch.tensor([60, 2, 149], device=DEV)
        first, last, mask, n_keys = torch.tensor([10, 0, 0], device=DEV), slot, None, None
    else:  # a ring: the shared slot 40 of 130 read slots; row 1 does not see it
        slot, first, last, n_keys = torch.tensor([40], device=DEV), None, None, 130
        visible = torch.rand(B, n_keys, generator=g) < 0.7
        visible[:, 40] = True
        visible[1, 40] = False
        mask = torch.full((B, 1, 1, n_keys), float("-inf"), dtype=dtype).masked_fill_(visible[:, None, None], 0.0)
        mask = mask.to(DEV)
    k2, v2 = kc.clone(), vc.clone()
    for row in range(B):  # what a row's slot held before: the kernel must not read it
        kc[row, :, slot[row if per_row else 0]] = float("nan")
    q = kernels.rope_write(y, c, s_, N, NK, k2, v2, slot)
    want = kernels.attend(q, k2, v2, mask, n_keys, splits, last=last, first=first)
    out = kernels.rope_attend(y, c, s_, N, kc, vc, slot, mask, n_keys, splits, last=last, first=first)
    assert out.shape == (B, N, H)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=tol * want.abs().max().item())
    torch.testing.assert_close(kc.float(), k2.float(), rtol=0, atol=tol * k2.abs().max().item())
    assert torch.equal(vc, v2)


def test_commit_rows_copies_the_closed_rows_only():
    """kernels.commit_rows: what torch.where(rows, src, dst) gives, through a permuted view (the
    decoder's cross K/V as the batched product leaves them), and dst's other rows untouched."""
    g = torch.Generator().manual_seed(13)
    n, B, K, nkv, H = 3, 5, 2, 3, 8  # (not powers of two: the masks)
    y = torch.randn(n, B * K, 2 * nkv * H, generator=g).to(DEV, torch.bfloat16)
    src = y.view(n, B, K, 2, nkv, H).permute(3, 0, 1, 4, 2, 5)  # [2, n, B, nkv, K, H]
    dst = torch.randn(2, n, B, nkv, K, H, generator=g).to(DEV, torch.bfloat16)
    rows = torch.tensor([True, False, False, True, True], device=DEV)
    want = torch.where(rows.view(1, 1, -1, 1, 1, 1), src, dst)
    kernels.commit_rows(src, dst, rows)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_copy_then_argmax(dtype):
    """kernels.greedy: the fp32 logits and torch.argmax's ids, ties to the first largest value and
    NaN taken as the largest (as torch.argmax does)."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 260, generator=g).round(decimals=1).to(DEV, dtype)  # rounded: ties
    x[1, 7] = x[1, 200] = x[1].max() + 1  # a tie for the largest
    x[2, 30] = x[2, 99] = float("nan")  # NaN: the first wins
    x[3, :] = float("-inf")  # all -inf: index 0
    x[4, 259] = float("inf")
    logits = torch.empty(6, 260, device=DEV)
    ids = torch.empty(6, dtype=torch.int64, device=DEV)
    kernels.greedy(x, logits, ids)
    want = x.float()
    assert torch.equal(logits.nan_to_num(), want.nan_to_num())
    assert ids.tolist() == torch.argmax(want, dim=-1).tolist()
    assert ids[[1, 2, 3, 4]].tolist() == [7, 30, 0, 259]


@pytest.fixture
def one_attend_config(monkeypatch):
    """The attention kernel's autotuner held to one configuration: it times its candidates once
    per key (here the ring's bounds and the mask are different keys), so on a GPU two calls that
    this module compares bit for bit could run different block sizes, whose sums differ in order
    (three of the ring cases failed so in the twenty-sixth session's GPU run; under the
    interpreter there is one candidate)."""
    tuner = kernels._attend_kernel
    monkeypatch.setattr(tuner, "configs", tuner.configs[:1])
    tuner.cache.clear()
    yield
    tuner.cache.clear()


def _ring_visible(n: int, S: int, start: list[int], window: int) -> torch.Tensor:
    """What `_Ring.advance`'s mask shows at position n, written out: slot s holds the last
    position <= n that is s modulo S (none before the ring reaches it); a row sees the positions
    of its document (from `start`) within the window (0: none)."""
    held = torch.tensor([max((p for p in range(n + 1) if p % S == s), default=-1) for s in range(S)])
    lo = torch.tensor(start)[:, None]
    if window:
        lo = lo.clamp_min(n - window + 1)
    return (held[None] >= 0) & (held[None] >= lo)


# before the ring fills (n 5 of 8 slots) and after it wrapped (n 21); a window of the ring's size,
# a shorter one, none; a row whose document starts at n (it sees its own slot only)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(("n", "window"), [(5, 8), (21, 8), (21, 5), (21, 0)])
@pytest.mark.parametrize("rope", [False, True])
def test_attend_over_a_ring_equals_its_mask(rope, n, window, splits, one_attend_config, attend_blocks):
    """A ring's bounds (`ring`: the position, each row's document start, the window) show the
    attention kernel what the ring's mask shows, and nothing else: the same kernel, the same
    loads and sums, so the same output bit for bit (fp32), with NaN in every slot the rows must
    not see; with RoPE and the cache writes (rope_attend) too."""
    N, NK, H, S, B = 4, 2, 16, 8, 3
    g = torch.Generator().manual_seed(12)
    start = [0, max(n - 4, 1), n]
    visible = _ring_visible(n, S, start, window)
    assert visible[2].sum() == 1
    assert not visible[1].all()
    kc = torch.randn(B, NK, S, H, generator=g).to(DEV)
    vc = torch.randn(B, NK, S, H, generator=g).to(DEV)
    kc.masked_fill_(~visible[:, None, :, None].to(DEV), float("nan"))
    vc.masked_fill_(~visible[:, None, :, None].to(DEV), float("nan"))
    mask = torch.full((B, 1, 1, S), float("-inf")).masked_fill_(visible[:, None, None], 0.0).to(DEV)
    pos, first = torch.tensor(n, device=DEV), torch.tensor(start, device=DEV)
    if rope:
        y = torch.randn(B, (N + 2 * NK) * H, generator=g).to(DEV)
        cos, sin = rope_cos_sin(pos.view(1, 1), H, 10000.0)
        c, s_ = cos.reshape(-1).contiguous(), sin.reshape(-1, 2)[..., 1].contiguous()
        slot = (pos % S).view(1)
        k2, v2 = kc.clone(), vc.clone()
        want = kernels.rope_attend(y, c, s_, N, k2, v2, slot, mask, splits=splits, last=pos)
        out = kernels.rope_attend(y, c, s_, N, kc, vc, slot, None, splits=splits, last=pos, first=first, ring=window)
        assert torch.equal(kc.nan_to_num(), k2.nan_to_num())
        assert torch.equal(vc.nan_to_num(), v2.nan_to_num())
    else:
        q = torch.randn(B, N, H, generator=g).to(DEV)
        want = kernels.attend(q, kc, vc, mask, splits=splits, last=pos)
        out = kernels.attend(q, kc, vc, None, splits=splits, last=pos, first=first, ring=window)
    assert not want.isnan().any()
    assert torch.equal(out, want)


@pytest.mark.parametrize("beta", [1.0, 2.0])  # the blocks' residual; the cross-attention's double one
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_linear_add_equals_addmm(dtype, tol, beta):
    """beta x + a W^T in fp32 and one rounding, as addmm; a with a row stride (a view), K not a
    multiple of the kernel's blocks (one bf16 step at the largest magnitude, as attend's)."""
    B, D, K = 3, 40, 600
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=g).to(DEV, dtype)
    a = torch.randn(B, K + 8, generator=g).to(DEV, dtype)[:, :K]
    w = (torch.randn(D, K, generator=g) / K**0.5).to(DEV, dtype)
    out = kernels.linear_add(x, a, w, beta)
    want = beta * x.float() + a.float() @ w.float().T
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())


def _residual_case(dtype, B=37, D=48, K=72, seed=6):
    """x [B, D], a [B, K] (a strided view), w [D, K], a norm weight [D] (by default D a multiple of
    SS_COLS but of no larger block, K of none)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(DEV, dtype)
    a = torch.randn(B, K + 8, generator=g).to(DEV, dtype)[:, :K]
    w = (torch.randn(D, K, generator=g) / K**0.5).to(DEV, dtype)
    norm = RMSNorm(D).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
    return x, a, w, norm


@pytest.mark.parametrize("beta", [1.0, 2.0])  # the blocks' residual; the decoder cross-attention's double one
@pytest.mark.parametrize("splits", [1, 2, 7])  # 7: K not a multiple, one product
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_residual_norm_equals_addmm_then_rmsnorm(dtype, tol, splits, beta):
    """x += a W^T in place, in fp32 and one rounding (addmm's), over `splits` slices of K summed by
    the kernel; and the norm after it, F.rms_norm's (fp32, one rounding); a with a row stride;
    rows that are not a power of two long. In bf16 one step at the largest magnitude (the
    slices' sums differ from one product's in order)."""
    x, a, w, norm = _residual_case(dtype, B=5, D=40, K=600)
    D = x.shape[1]
    h_want = beta * x.float() + a.float() @ w.float().T
    n_want = F.rms_norm(_rnd(h_want, dtype), (D,), norm.weight.float(), norm.eps)
    h = x.clone()
    n = kernels.residual_norm(h, a, w, norm.weight, norm.eps, splits=splits, beta=beta)
    assert n.dtype == h.dtype == dtype
    torch.testing.assert_close(h.float(), _rnd(h_want, dtype), rtol=0, atol=tol * h_want.abs().max().item())
    torch.testing.assert_close(n.float(), _rnd(n_want, dtype), rtol=0, atol=tol * n_want.abs().max().item())


# the products' blocks (BLOCK_M, BLOCK_N, BLOCK_K): the autotuner's first candidate (one block of
# rows, columns and inputs here), or blocks of 16 (three row blocks, the last partial; several
# column blocks and input steps, the last of each partial). Fixed, not tuned: on a GPU each
# candidate of each key compiles (~1-2 s); the generator's test runs the tuner's path
PRODUCT_BLOCKS = [(64, 64, 128), (16, 16, 16)]


@pytest.mark.parametrize("blocks", PRODUCT_BLOCKS)
@pytest.mark.parametrize("beta", [1.0, 2.0])  # the blocks' residual; the decoder cross-attention's double one
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_product_residual_equals_addmm_with_its_sums_of_squares(dtype, tol, beta, blocks):
    """beta x + a W^T in fp32 and one rounding (addmm's), x left as it was, and the sums of
    squares of the result's rounded values over each SS_COLS features of a row ([D / SS_COLS,
    B], fp32: exact but for the order of 16 terms)."""
    x, a, w, _ = _residual_case(dtype)
    B, D = x.shape
    x0 = x.clone()
    h, ss = kernels.product_residual(a, w, x, beta=beta, blocks=blocks)
    want = beta * x.float() + a.float() @ w.float().T
    assert h.dtype == dtype
    assert ss.dtype == torch.float32
    assert ss.shape == (D // kernels.SS_COLS, B)
    assert torch.equal(x, x0)
    torch.testing.assert_close(h.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())
    ss_want = h.float().pow(2).view(B, -1, kernels.SS_COLS).sum(-1).T
    torch.testing.assert_close(ss, ss_want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("blocks", PRODUCT_BLOCKS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
def test_products_norm_their_input_on_the_way_in(dtype, tol, blocks):
    """After a residual product, product (the output head), product_swiglu (w1|w3) and
    cross_attend (q) with norm=(ss, weight, eps) equal F.rms_norm of the residual stream, then
    the PyTorch step (the product rounded as F.linear's, SwiGLU as F.silu(a) * b rounds it,
    SDPA over the units); without `norm`, of an input normed already."""
    x, a, w, norm = _residual_case(dtype)
    h, ss = kernels.product_residual(a, w, x, blocks=blocks)
    B, D = h.shape
    hn = _normed(norm, h)
    g = torch.Generator().manual_seed(8)
    w_out = (torch.randn(40, D, generator=g) / D**0.5).to(DEV, dtype)
    w13 = (torch.randn(2 * 24, D, generator=g) / D**0.5).to(DEV, dtype)
    with_norm = (ss, norm.weight, norm.eps)
    for got in (kernels.product(h, w_out, norm=with_norm, blocks=blocks),
                kernels.product(hn.to(dtype), w_out, blocks=blocks)):
        want = hn @ w_out.float().T
        assert got.shape == (B, 40)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())
    y1, y3 = _rnd(hn @ w13.float().T, dtype).chunk(2, dim=-1)
    want = _rnd(_rnd(F.silu(y1), dtype) * y3, dtype)
    got = kernels.product_swiglu(h, w13, norm=with_norm, blocks=blocks)
    assert got.shape == (B, 24)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol * want.abs().max().item())
    N, NK, K, H = 4, 2, 3, 8
    w_q = (torch.randn(N * H, D, generator=g) / D**0.5).to(DEV, dtype)
    k = torch.randn(B, NK, K, H, generator=g).to(DEV, dtype)
    v = torch.randn(B, NK, K, H, generator=g).to(DEV, dtype)
    q = _rnd(hn @ w_q.float().T, dtype).view(B, N, 1, H)
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=True).reshape(B, N * H)
    got = kernels.cross_attend(h, w_q, k, v, norm=with_norm)
    torch.testing.assert_close(got.float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("blocks", PRODUCT_BLOCKS)
@pytest.mark.parametrize("per_row", [False, True])  # a ring's shared slot and position, or each row's
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
def test_product_rope_equals_the_pytorch_step(dtype, tol, per_row, blocks):
    """product_rope after a residual product: F.rms_norm of the residual stream, the q|k|v
    product rounded as F.linear's, apply_rope on q and k; k and v written at each row's slot and
    nowhere else."""
    N, NK, H, R = 4, 2, 16, 8
    x, a, w, norm = _residual_case(dtype, B=19, D=64)
    h, ss = kernels.product_residual(a, w, x, blocks=blocks)
    B, D = h.shape
    g = torch.Generator().manual_seed(9)
    w_qkv = (torch.randn((N + 2 * NK) * H, D, generator=g) / D**0.5).to(DEV, dtype)
    pos = torch.randint(0, 200, (B if per_row else 1, 1), generator=g).to(DEV)
    slots = torch.randint(0, R, (B,), generator=g).tolist() if per_row else [5] * B
    cos, sin = rope_cos_sin(pos, H, 10000.0)
    c, s_ = cos.reshape(len(pos), -1).squeeze(0).contiguous(), sin.reshape(len(pos), -1, 2)[..., 1].squeeze(0)
    kc = torch.zeros(B, NK, R, H, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    slot = torch.tensor(slots if per_row else [5], device=DEV)
    q = kernels.product_rope(h, w_qkv, c, s_.contiguous(), N, NK, kc, vc, slot, norm=(ss, norm.weight, norm.eps),
                             blocks=blocks)
    y = _rnd(_normed(norm, h) @ w_qkv.float().T, dtype).view(B, 1, N + 2 * NK, H)
    qk = _rnd(apply_rope(y[:, :, :N + NK], cos, sin), dtype)[:, 0]
    _assert_rope_written(q, kc, vc, slots, qk, y[:, 0, N + NK:], y.abs().max().item(), tol)


def test_products_refuse_what_they_cannot_norm():
    """A norm's sums of squares of another shape, or a residual width that SS_COLS does not
    divide, is refused with what was wrong, not read out of bounds."""
    x, a, w, norm = _residual_case(torch.float32)
    h, ss = kernels.product_residual(a, w, x)
    with pytest.raises(AssertionError, match="sums of squares"):
        kernels.product(h, w.T.contiguous(), norm=(ss[:-1], norm.weight, norm.eps))
    with pytest.raises(AssertionError, match="multiple of 16"):
        kernels.product_residual(a, w[:40], x[:, :40].contiguous())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_norms_equal_rms_norm_under_each_weight(dtype, tol):
    """kernels.norms: each row normed once and scaled by each of L weights, as L F.rms_norm calls
    (fp32 x * rstd * w, rounded once: at most one bf16 rounding step apart, the sums' order
    differing), from a strided input; rows not a power of two long."""
    R, D, L = 7, 40, 3
    g = torch.Generator().manual_seed(9)
    x = (3 * torch.randn(R, D + 4, generator=g)).to(DEV, dtype)[:, 2:D + 2]
    w = (1 + 0.1 * torch.randn(L, D, generator=g)).to(DEV, dtype)
    out = kernels.norms(x, w, 1e-5)
    assert out.shape == (L, R, D)
    assert out.dtype == dtype
    for i in range(L):
        want = F.rms_norm(x.float(), (D,), w[i].float(), 1e-5)
        torch.testing.assert_close(out[i].float(), _rnd(want, dtype), rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("splits", [1, 4])
def test_attend_reads_no_hidden_slot(splits):
    """Hidden slots may hold anything (a discarded row's NaN at the global cache's dummy slot):
    they stay out of the sums, and a row that sees no key gets zeros, not 0/0."""
    B, N, H, S = 2, 2, 16, 70
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, N, H, generator=g).to(DEV)
    k = torch.randn(B, N, S, H, generator=g).to(DEV)
    v = torch.randn(B, N, S, H, generator=g).to(DEV)
    visible = torch.zeros(B, S, dtype=torch.bool)
    visible[0, [3, 40, 69]] = True  # row 1 sees nothing
    mask = torch.full((B, 1, 1, S), float("-inf")).masked_fill_(visible[:, None, None], 0.0).to(DEV)
    want = F.scaled_dot_product_attention(q[:1, :, None], k[:1], v[:1], attn_mask=visible[:1, None, None].to(DEV))
    k[~visible.to(DEV)[:, None].expand(B, N, S)] = float("nan")
    v[~visible.to(DEV)[:, None].expand(B, N, S)] = float("nan")
    out = kernels.attend(q, k, v, mask, splits=splits)
    torch.testing.assert_close(out[:1], want[:, :, 0], rtol=0, atol=1e-5)
    assert not out[1].any()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("per_row", [False, True])
def test_attend_reads_no_slot_after_last(per_row, splits):
    """`last` bounds the slots read (a cache's unfilled tail: the global cache past a row's
    patches, a ring before it wraps), one bound for all rows or one a row: the slots after it
    hold NaN and the mask shows them, so only the bound keeps them out; the splits share the
    slots up to the bound (row 2 sees its slots 0..0 alone, row 1 all of them)."""
    B, N, H, S = 3, 2, 16, 150
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, N, H, generator=g).to(DEV)
    k = torch.randn(B, N, S, H, generator=g).to(DEV)
    v = torch.randn(B, N, S, H, generator=g).to(DEV)
    last_rows = [97, S + 5, 0] if per_row else [97] * B  # past the cache: all S slots
    for row, last in enumerate(last_rows):
        k[row, :, last + 1:] = float("nan")
        v[row, :, last + 1:] = float("nan")
    mask = torch.zeros(B, 1, 1, S, device=DEV)
    last = torch.tensor(last_rows if per_row else last_rows[:1], device=DEV)
    out = kernels.attend(q, k, v, mask, splits=splits, last=last if per_row else last[0])
    for row, n in enumerate(last_rows):
        n = min(S, n + 1)
        want = F.scaled_dot_product_attention(q[row:row + 1, :, None], k[row:row + 1, :, :n], v[row:row + 1, :, :n])
        torch.testing.assert_close(out[row], want[0, :, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_attend_reads_only_first_to_last(splits, attend_blocks):
    """`first` and `last` bound each row's slots from both sides (the encoder's cached bytes of
    the open patch), without a mask: every slot in between is seen, and the slots outside hold
    NaN, so only the bounds keep them out; grouped queries (8 query heads on 2 key/value heads,
    as the patch step's units ask); a row whose range is empty gets zeros."""
    B, N, NK, H, S = 4, 8, 2, 16, 150
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, N, H, generator=g).to(DEV)
    k = torch.randn(B, NK, S, H, generator=g).to(DEV)
    v = torch.randn(B, NK, S, H, generator=g).to(DEV)
    ranges = [(40, 97), (0, 149), (120, 120), (60, 59)]  # (first, last); the last row's is empty
    for row, (a, b) in enumerate(ranges):
        for t in (k, v):
            t[row, :, :a] = float("nan")
            t[row, :, b + 1:] = float("nan")
    first = torch.tensor([a for a, _ in ranges], device=DEV)
    last = torch.tensor([b for _, b in ranges], device=DEV)
    out = kernels.attend(q, k, v, None, splits=splits, last=last, first=first)
    for row, (a, b) in enumerate(ranges[:-1]):
        want = F.scaled_dot_product_attention(q[row:row + 1, :, None], k[row:row + 1, :, a:b + 1],
                                              v[row:row + 1, :, a:b + 1], enable_gqa=True)
        torch.testing.assert_close(out[row], want[0, :, 0], rtol=0, atol=1e-5)
    assert not out[-1].any()


@pytest.mark.parametrize("splits", [1, 3])
def test_first_block_loaded_early_sums_as_the_loop(splits, monkeypatch):
    """The first block of slots loaded with the row's bounds (kernels.ATTEND_FIRST_BLOCK) joins the
    online softmax as the loop's first block would: where a row's slots start at 0 (masks, rings,
    `last` alone) the blocks and their sums are the same, so the output is the same bit for bit;
    with `first` past 0 the blocks after it are cut at other slots, the same within rounding.
    Loading each block before the one before it is summed (kernels.ATTEND_AHEAD) changes no sum."""
    B, N, H, S = 4, 4, 16, 150
    monkeypatch.setattr(kernels, "ATTEND_CONFIG", {(H, False): (16, 1)})
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, N, H, generator=g).to(DEV)
    k = torch.randn(B, N, S, H, generator=g).to(DEV)
    v = torch.randn(B, N, S, H, generator=g).to(DEV)
    mask = torch.where(torch.rand(B, 1, 1, S, generator=g) < 0.7, 0.0, float("-inf")).to(DEV)
    last = torch.tensor([149, 15, 16, 70], device=DEV)
    first = torch.tensor([0, 3, 16, 40], device=DEV)
    outs = {}
    for early, ahead in ((True, True), (False, True), (True, False), (False, False)):
        monkeypatch.setattr(kernels, "ATTEND_FIRST_BLOCK", early)
        monkeypatch.setattr(kernels, "ATTEND_AHEAD", ahead)
        outs[early, ahead] = (kernels.attend(q, k, v, mask, splits=splits),
                              kernels.attend(q, k, v, None, splits=splits, last=last),
                              kernels.attend(q, k, v, None, splits=splits, last=last, first=first))
    want = outs[False, False]  # every block after the bounds, one at a time: the loop as it was
    for got in outs.values():
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-6)
    assert torch.equal(outs[True, True][2], outs[True, False][2])  # the blocks ahead change no sum


@pytest.mark.parametrize(("switched", "rows"), [
    pytest.param(False, 2, marks=INTERPRETER_SLOW),  # the block kernels' global step
    pytest.param(False, 5, marks=INTERPRETER_SLOW),  # cuBLAS's (past KERNEL_MAX_ROWS)
    (True, 2),
    pytest.param(True, 5, marks=INTERPRETER_SLOW),
])
def test_generator_with_kernels_across_documents(switched, rows, monkeypatch):
    """Generated EOS bytes start new documents: a row that opens one and closes no patch sees
    no global key in its discarded step, and its NaN-free result keeps later steps exact (the
    ninth session's GPU run found the attention kernel's 0/0 there poisoning the dummy slot).
    With the attention kernel the global step bounds each row to its document's slots
    (generate.GLOBAL_BOUNDS: no mask built), and so do the rings' self-attention steps
    (generate.RING_BOUNDS: by each row's document start); without it masks hide the others."""
    from bltkit import generate

    monkeypatch.setattr(generate, "ATTEND_KERNEL", switched)
    monkeypatch.setattr(generate, "LINEAR_KERNEL", switched)
    monkeypatch.setattr(kernels, "ATTEND_MIN_CHUNK", 4)  # the tiny caches' keys split too
    masks = []
    global_mask = Generator._global_mask

    def counted_mask(self, L):
        masks.append(L)
        return global_mask(self, L)

    monkeypatch.setattr(Generator, "_global_mask", counted_mask)
    model = eos_heavy(make_model(seed=0, window=8, mode="space", max_patch_length=4)).to(DEV)
    prompts = random_prompts(seed=1, n=rows)
    want = reference_generate(model, prompts, 12, stop_at_eos=False)
    assert sum(row.count(EOS_ID) for row in want) >= 4
    masks.clear()  # (the reference builds none; a Generator's own prefill neither)
    gen = Generator(model, kernels=True)
    assert gen.generate_ids(prompts, 12, stop_at_eos=False) == want
    assert bool(masks) != switched
    assert gen.enc.bounded == gen.dec.bounded == switched


@pytest.mark.parametrize(("mode", "switched"), [
    ({}, False),
    pytest.param({}, True, marks=INTERPRETER_SLOW),
    pytest.param({"mode": "space", "max_patch_length": 4}, True, marks=INTERPRETER_SLOW),
])
def test_generator_with_kernels_equals_reference(mode, switched, monkeypatch):
    """Greedy bytes equal the full-forward oracle, and every step's logits the PyTorch step's
    within 1e-5 (fp32), with a window shorter than the text (the ring slots wrap); with the
    kernels that module constants switch (kernels.attend, kernels.linear_add) on and off."""
    from bltkit import generate

    monkeypatch.setattr(generate, "ATTEND_KERNEL", switched)
    monkeypatch.setattr(generate, "LINEAR_KERNEL", switched)
    monkeypatch.setattr(kernels, "ATTEND_MIN_CHUNK", 4)  # the tiny caches' keys split too
    model = make_model(seed=4, window=8, **mode).to(DEV)
    _kernels_equal_pytorch_and_reference(model, random_prompts(seed=5, n=2), 12)


def _kernels_equal_pytorch_and_reference(model, prompts, new_bytes: int) -> Generator:
    """Generate greedily with and without the kernels: every step's logits equal within 1e-5
    (fp32), and the kernels' bytes equal the full-forward oracle's. Returns the kernels' Generator."""
    logits = {}
    for use in (False, True):
        gen = Generator(model, kernels=use)
        rows = []
        out = gen.generate_ids(prompts, new_bytes, stop_at_eos=False,
                               on_step=lambda row, tok, close, rows=rows, gen=gen: rows.append(gen.logits[row].clone()))
        logits[use] = torch.stack(rows)
    assert out == reference_generate(model, prompts, new_bytes, stop_at_eos=False)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    return gen


def test_generator_ring_bounds_after_documents_in_the_prompt():
    """Prompts holding EOS start documents that the prefill sees (and, in the longer prompt, that
    the steps read after it): the rings' bounds (RING_BOUNDS) start each row at its document, so
    with windows of 8 over prompts of up to 13 bytes every step's logits equal the masked PyTorch
    step's within 1e-5 (fp32) and the bytes the full-forward oracle's."""
    model = make_model(seed=10, window=8).to(DEV)
    prompts = [[*encode("ab"), EOS_ID, *encode("cdefghij")], [*encode("x"), EOS_ID, *encode("yz"), EOS_ID, *encode("w")]]
    gen = _kernels_equal_pytorch_and_reference(model, prompts, 8)
    assert [r.bounded for r in (gen.ent, gen.enc, gen.dec)] == [True] * 3


def test_generator_kernels_refuse_what_they_cannot_run(monkeypatch):
    model = make_model()
    with pytest.raises(ValueError, match="fuse=True"):
        Generator(model, kernels=True, fuse=False)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        Generator(model, kernels=True)


@pytest.mark.parametrize(("decoder_norms", "rope_attend", "cross_attend"), [
    (True, True, True),
    pytest.param(False, False, False, marks=INTERPRETER_SLOW),
])
def test_generator_kernels_only_for_few_rows(decoder_norms, rope_attend, cross_attend, monkeypatch):
    """Past KERNEL_MAX_ROWS rows the matrix-vector kernels give way to cuBLAS's products, the
    global stack's on the kernels' fused copies (q|k|v, w1|w3), and the attention kernel stays,
    with the reference's bytes; the decoder's cross-attention as one kernel with its q product
    (generate.CROSS_ATTEND) or after cuBLAS's; the decoder's residual adds with the norms after
    them in one kernel, or not (generate.DECODER_NORMS), and the self-attention with RoPE and the
    cache writes in one kernel, or after them (here: caches longer than
    generate.ROPE_ATTEND_MAX_KEYS); each step's byte embedded by kernels.hash_embed, or not
    (generate.HASH_EMBED), and each byte's advance and feed by kernels.advance and kernels.feed, or
    not (generate.STEP_KERNELS; both switched with CROSS_ATTEND here)."""
    from bltkit import generate

    monkeypatch.setattr(generate, "DECODER_NORMS", decoder_norms)
    monkeypatch.setattr(generate, "ROPE_ATTEND_MAX_KEYS", 10**9 if rope_attend else 0)
    monkeypatch.setattr(generate, "CROSS_ATTEND", cross_attend)
    monkeypatch.setattr(generate, "HASH_EMBED", cross_attend)
    monkeypatch.setattr(generate, "STEP_KERNELS", cross_attend)

    model = make_model(seed=6).to(DEV)
    prompts = random_prompts(seed=7, n=generate.KERNEL_MAX_ROWS + 1)
    want = reference_generate(model, prompts, 12, stop_at_eos=False)
    assert Generator(model).generate_ids(prompts, 12, stop_at_eos=False) == want

    def refuse(*a, **k):
        raise AssertionError("a Triton kernel ran for a large batch")

    monkeypatch.setattr(kernels, "norm_qkv_rope", refuse)
    monkeypatch.setattr(kernels, "norm_swiglu", refuse)
    monkeypatch.setattr(kernels, "norm_cross_attend", refuse)
    attend, calls, slots = kernels.attend, [], set()  # the attention kernel reads no weights: it serves every batch

    def counted(*a, **k):
        calls.append(a[0].shape[0])
        slots.add(a[1].shape[2])
        return attend(*a, **k)

    monkeypatch.setattr(kernels, "attend", counted)
    swiglu, swiglu_rows = kernels.swiglu, []  # after cuBLAS's w1|w3 products

    def counted_swiglu(y):
        swiglu_rows.append(y.shape[0])
        return swiglu(y)

    monkeypatch.setattr(kernels, "swiglu", counted_swiglu)
    residual, residual_rows, betas = kernels.residual_norm, [], []  # after cuBLAS's wo and w2 products

    def counted_residual(x, *a, **k):
        residual_rows.append(x.shape[0])
        betas.append(k.get("beta", 1.0))
        return residual(x, *a, **k)

    norms, norms_calls = kernels.norms, []  # the decoder's cross K/V norms of a closed patch

    def counted_norms(*a, **k):
        norms_calls.append(1)
        return norms(*a, **k)

    monkeypatch.setattr(kernels, "norms", counted_norms)
    rope_attend_fn, fused_rows = kernels.rope_attend, []  # RoPE, cache writes and attention in one

    def counted_rope_attend(y, *a, **k):
        fused_rows.append(y.shape[0])
        return rope_attend_fn(y, *a, **k)

    monkeypatch.setattr(kernels, "rope_attend", counted_rope_attend)
    cross_attend_fn, cross_calls = kernels.cross_attend, []  # the decoder's q product and cross-attention

    def counted_cross_attend(xn, w_q, k, v):
        cross_calls.append((xn.shape[0], k.shape[2]))
        return cross_attend_fn(xn, w_q, k, v)

    monkeypatch.setattr(kernels, "cross_attend", counted_cross_attend)
    hash_embed, hash_rows = kernels.hash_embed, []

    def counted_hash_embed(x, *a, **k):
        hash_rows.append(x.shape[0])
        return hash_embed(x, *a, **k)

    monkeypatch.setattr(kernels, "hash_embed", counted_hash_embed)
    step_calls = collections.Counter()  # kernels.advance, feed, commit_rows and greedy

    def counted_step(name):
        fn = getattr(kernels, name)

        def run(*a):
            step_calls[name] += 1
            return fn(*a)
        return run

    for name in ("advance", "feed", "commit_rows", "greedy"):
        monkeypatch.setattr(kernels, name, counted_step(name))

    monkeypatch.setattr(kernels, "residual_norm", counted_residual)
    monkeypatch.setattr(generate, "ATTEND_KERNEL", True)
    gen = Generator(model, kernels=True)
    assert gen.fused_global is not None
    assert gen.generate_ids(prompts, 12, stop_at_eos=False) == want
    assert calls
    assert set(calls) == set(swiglu_rows) == set(residual_rows) == {len(prompts)}
    assert (2.0 in betas) == decoder_norms  # the cross-attention's doubled residual, fused or not
    assert bool(norms_calls) == decoder_norms
    assert set(fused_rows) == ({len(prompts)} if rope_attend else set())
    # the decoder's cross-attention over a patch's units: by cross_attend, else among the attention
    # kernel's calls (the calls are counted as the steps are traced: once a step on a CPU, at the
    # warm-up and capture on a GPU)
    K = model.config.cross_attn_k
    assert set(cross_calls) == ({(len(prompts), K)} if cross_attend else set())
    assert (K in slots) != cross_attend
    # at least a step's decoder cross layers (the self-attention's calls are rope_attend's with it)
    assert len(calls) + len(fused_rows) + len(cross_calls) >= 12 * len(model.local_decoder.cross_attn_layers)
    assert set(hash_rows) == ({len(prompts)} if cross_attend else set())
    # a call a step on a CPU; on a GPU the CUDA graphs replay what was traced once or twice
    traced = 12 if model.device.type == "cpu" else 1
    assert len(hash_rows) >= traced * cross_attend
    assert min(step_calls["advance"], step_calls["feed"]) >= traced * cross_attend
    assert bool(step_calls["advance"] + step_calls["feed"]) == cross_attend
    # the decoder's cross K/V committed and the greedy byte taken by their kernels (COMMIT_KERNEL,
    # GREEDY_KERNEL) whatever the other switches
    assert min(step_calls["commit_rows"], step_calls["greedy"]) >= 1


def test_generator_products_equal_reference(monkeypatch):
    """generate.DECODER_PRODUCTS, GLOBAL_PRODUCTS and FRONT_PRODUCTS: past KERNEL_MAX_ROWS rows
    every stack runs on the Triton products (each residual product with its sums of squares, the
    next product norming on the way in) with the reference's bytes: the products write every
    ring and the global cache, the decoder's and the entropy model's output heads are products,
    and neither residual_norm nor rope_attend runs."""
    from bltkit import generate

    for name in ("DECODER_PRODUCTS", "GLOBAL_PRODUCTS", "FRONT_PRODUCTS"):
        monkeypatch.setattr(generate, name, True)
    model = make_model(seed=6).to(DEV)
    prompts = random_prompts(seed=7, n=generate.KERNEL_MAX_ROWS + 1)
    want = reference_generate(model, prompts, 10, stop_at_eos=False)
    calls, touched = collections.Counter(), collections.defaultdict(set)

    def counted(name, arg):
        fn = getattr(kernels, name)

        def run(*a, **k):
            calls[name, k.get("beta", 1.0)] += 1
            touched[name].add(a[arg].data_ptr())  # the key cache it writes, or the weight it reads
            return fn(*a, **k)
        return run

    for name, arg in (("product", 1), ("product_residual", 1), ("product_rope", 6), ("product_swiglu", 1),
                      ("residual_norm", 2), ("rope_attend", 4)):
        monkeypatch.setattr(kernels, name, counted(name, arg))
    gen = Generator(model, kernels=True)
    assert gen.generate_ids(prompts, 10, stop_at_eos=False) == want
    dec, em = model.local_decoder, model.entropy_model
    assert touched["product"] == {dec.output.weight.data_ptr(), em.output.weight.data_ptr()}
    steps = calls["product", 1.0] // 2  # a decoder step and an entropy step each
    assert steps >= (10 if model.device.type == "cpu" else 1)  # (a GPU replays its graphs)
    assert calls["product_residual", 2.0] == len(dec.cross_attn_layers) * steps
    rings = [gen.ent, gen.enc, gen.dec]
    assert touched["product_rope"] == {k.data_ptr() for r in rings for k in r.k} | {k.data_ptr() for k in gen.g_k}
    assert not calls["rope_attend", 1.0]
    assert not calls["residual_norm", 1.0] + calls["residual_norm", 2.0]


@INTERPRETER_SLOW
def test_attend_kernel_only_for_short_caches(monkeypatch):
    """kernels.attend runs over caches of at most ATTEND_MAX_KEYS slots, SDPA over longer ones,
    with the reference's bytes either way; over the rings by their bounds (RING_BOUNDS, no mask),
    or by their masks with RING_BOUNDS off."""
    from bltkit import generate

    model = make_model(seed=8, window=8).to(DEV)
    prompts = random_prompts(seed=9, n=2)
    want = reference_generate(model, prompts, 10, stop_at_eos=False)
    attend, sizes, bounded = kernels.attend, [], []

    def counted(q, k, v, mask, n_keys=None, splits=None, last=None, first=None, ring=None, period=None):
        if splits is None:  # the self-attention (the patch step's open-patch call sets one split)
            sizes.append(k.shape[2] if n_keys is None else n_keys)
            bounded.append((ring is not None, mask is None))
        return attend(q, k, v, mask, n_keys, splits, last, first, ring, period)

    monkeypatch.setattr(kernels, "attend", counted)
    monkeypatch.setattr(generate, "ATTEND_KERNEL", True)
    runs = []
    # all caches; the rings' 8 slots, not the global cache's; those by their masks
    for limit, ring_bounds in ((10**9, True), (8, True), (8, False)):
        monkeypatch.setattr(generate, "ATTEND_MAX_KEYS", limit)
        monkeypatch.setattr(generate, "RING_BOUNDS", ring_bounds)
        sizes.clear()
        bounded.clear()
        assert Generator(model, kernels=True).generate_ids(prompts, 10, stop_at_eos=False) == want
        runs.append((set(sizes), set(bounded)))
    assert min(runs[0][0]) == 8 < max(runs[0][0])
    assert runs[1] == ({8}, {(True, True)})
    assert runs[2] == ({8}, {(False, False)})
