"""Cached, batched, streaming BLT generation, exactly equal to the uncached model (spec §13).

State is kept for all four networks: ring KV caches for the entropy model, the local encoder and
the local decoder (their attention is local: the last `window` positions suffice), the encoder's
per-byte cross-attention keys/values and running max for the open patch, a KV cache over closed
patches for the global transformer, and the decoder's cross-attention K/V of the latest closed
patch. Boundaries are decided online from the entropy of the byte just read (spec §13.4); the
global transformer runs once per closed patch. All rows advance in lockstep over byte positions
(a row still in its prompt is teacher-forced), each with its own patches, patch count and state.

`reference_generate` is the slow, obviously correct oracle: one full forward per new byte.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native as native_steps
from .bytes import BOS_ID, EOS_ID, OFFSET, Utf8Stream, encode, to_bytes
from .model import BLT, hashing
from .model.layers import rope_cos_sin
from .model.patching import _space_like, starts_to_lengths
from .sampling import check_sampling, row_key, sample


def _stop_bytes(stop) -> list[bytes]:
    """Stop strings (str, UTF-8 encoded, or bytes; one alone or a list of them) as bytes."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, (str, bytes)) else list(stop)
    out = []
    for s in items:
        if not isinstance(s, (str, bytes)):
            raise TypeError(f"a stop string is str or bytes, got {type(s).__name__}")
        if not s:
            raise ValueError("stop strings must not be empty (an empty one would match before any byte)")
        out.append(s.encode() if isinstance(s, str) else bytes(s))
    return out


def _encode_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts is a list of prompts (each str, bytes or a list of ids), got {type(prompts).__name__}")
    out = []
    for p in prompts:
        if not isinstance(p, (str, bytes, bytearray, list, tuple)) and p is not None:
            raise TypeError(f"a prompt is str, bytes or a list of ids, got {type(p).__name__}")
        if isinstance(p, (list, tuple)):
            ids = list(p)
        else:
            ids = encode(p if p is not None else b"", bos=True, eos=False)
        if not ids or ids[0] != BOS_ID:
            ids = [BOS_ID, *ids]
        out.append(ids)
    return out


@dataclass
class _Ring:
    """Self-attention KV for one stack over the last `size` positions (slot = position % size)."""

    k: torch.Tensor  # L B Nkv R H
    v: torch.Tensor
    pos: torch.Tensor  # R, position stored in each slot (-1 = empty); shared by all rows
    doc: torch.Tensor  # B R, document id of each slot
    window: int | None
    bounded: bool = False  # the attention kernel's bounds in place of the mask (RING_BOUNDS)

    @classmethod
    def new(cls, n_layers, B, n_kv, head_dim, size, window, dtype, device) -> _Ring:
        z = torch.zeros(n_layers, B, n_kv, size, head_dim, dtype=dtype, device=device)
        return cls(z, z.clone(), torch.full((size,), -1, dtype=torch.long, device=device),
                   torch.zeros(B, size, dtype=torch.int32, device=device), window)

    def advance(self, n: torch.Tensor, doc_B: torch.Tensor,
                start_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | _RingBounds]:
        """Claim the slot of position n; return it and the additive attention mask [B, 1, 1, R]
        (0 visible, -inf not) in the ring's dtype, or where the ring is `bounded` its bounds
        (`start_B`: each row's document start), in one kernel where the mask took about ten."""
        slot = (n % self.pos.shape[0]).view(1)
        if self.bounded:  # pos and doc, which only the mask reads, are left as they are
            return slot, _RingBounds(start_B, self.window or 0)
        self.pos.index_copy_(0, slot, n.view(1))
        self.doc.index_copy_(1, slot, doc_B.view(-1, 1).to(torch.int32))
        valid = (self.pos >= 0) & (self.pos <= n)
        if self.window is not None:
            valid = valid & (n - self.pos < self.window)
        mask = valid[None, :] & (self.doc == doc_B.view(-1, 1))
        return slot, _additive(mask[:, None, None, :], self.k.dtype)


class _RingBounds(NamedTuple):
    """A ring's visibility for the attention kernel in place of its mask (RING_BOUNDS): a row
    sees the slots of positions max(start, n - window + 1) to the step's n (kernels.attend's
    `ring`; `_attend` passes n, the steps' `last`)."""

    start: torch.Tensor  # [B] each row's document start (a position)
    window: int  # 0: none


def _seen(mask, n_keys: int | None, first: torch.Tensor | None) -> dict:
    """The attention kernel's arguments for which slots a row sees: a ring's bounds
    (`_RingBounds`), or the additive mask (or None) over the first `n_keys` slots from `first`."""
    if isinstance(mask, _RingBounds):
        return {"mask": None, "first": mask.start, "ring": mask.window}
    return {"mask": mask, "n_keys": n_keys, "first": first}


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible`, -inf elsewhere: what SDPA makes of a boolean mask (three kernels) in
    every call, made once a step (two kernels) and shared by the stack's layers."""
    return torch.full(visible.shape, float("-inf"), dtype=dtype, device=visible.device).masked_fill_(visible, 0.0)


class _Fused:
    """Per-block inference copies of the projections, concatenated: q|k|v as one matrix and
    w1|w3 as another, so a one-byte block step runs 4 matrix-vector products instead of 7. The
    byte-level stacks (entropy model, encoder, decoder: every byte) are always fused; the global
    stack, which runs once a patch and is the large one, only for the Triton kernels (when its
    copy fits: `Generator`), which keeps the extra memory small otherwise. `refresh()` copies
    changed weights in place, so the addresses captured by CUDA graphs stay valid.

    On a CPU the copies are stored column-major (shape [out, in], contiguous along out, so
    F.linear's x @ W.T reads rows of out values): a one-row product with more outputs than inputs,
    as q|k|v and w1|w3 have, then runs about twice as fast from memory (MKL; this session's 2-core
    AMD EPYC: the bundled model's [1536, 256] w1|w3 87 µs against 181, its [768, 256] q|k|v 53
    against 92, with weights that do not fit in cache; CUDA keeps them row-major, as cuBLAS and
    the Triton kernels read them; `row_major` keeps them so on a CPU too, for the kernels under
    Triton's interpreter in tests)."""

    def __init__(self, blocks, row_major: bool = False):
        self.blocks = list(blocks)
        self.qkv, self.w13 = {}, {}
        layout = (lambda w: w) if row_major else self._layout
        with torch.no_grad():
            for b, qkv, w13 in self._sources():
                self.qkv[id(b)], self.w13[id(b)] = layout(torch.cat(qkv)), layout(torch.cat(w13))
        self.version = self._version()

    @staticmethod
    def _layout(w: torch.Tensor) -> torch.Tensor:
        return w.t().contiguous().t() if w.device.type == "cpu" else w

    @staticmethod
    def sources(blocks):
        """(block, (wq, wk, wv), (w1, w3)) of each block: the weights a fused copy concatenates."""
        for b in blocks:
            a, f = b.attention, b.feed_forward
            yield b, (a.wq.weight, a.wk.weight, a.wv.weight), (f.w1.weight, f.w3.weight)

    def _sources(self):
        return self.sources(self.blocks)

    def _version(self) -> int:
        return sum(w._version for _, qkv, w13 in self._sources() for w in (*qkv, *w13))

    @torch.no_grad()
    def refresh(self) -> None:
        if self._version() != self.version:
            for b, qkv, w13 in self._sources():
                self.qkv[id(b)].copy_(torch.cat(qkv))
                self.w13[id(b)].copy_(torch.cat(w13))
            self.version = self._version()


class _CrossKV:
    """The decoder's cross-attention keys and values of a closed patch for every cross layer at
    once: each layer's wk|wv in one stacked copy [layers, 2 x Nkv x H, D], so one batched product
    replaces two products a layer on the patch step's chain (blt-1b at 64 rows on an H200: 18
    cuBLAS calls of ~4.5 µs each, nineteenth session), and the result [2, layers, B, Nkv, K, H]
    is committed to the state's keys and values in one `torch.where`. Refreshed in place like
    `_Fused` (the state's CUDA graphs keep its address)."""

    def __init__(self, layers, kernel: bool = False):
        self.layers = list(layers)
        norms = [lay.cross_attn_norm_kv for lay in self.layers]
        # with `kernel`, the layers' key/value norms in one kernel (bltkit.kernels.norms) over a
        # stacked copy of their weights, where they were a norm a layer and a stack
        self.kernel = kernel and len({n.eps for n in norms}) == 1
        with torch.no_grad():
            self.w = torch.stack(self._parts())
            self.norm_w = torch.stack([n.weight for n in norms]) if self.kernel else None
        self.version = self._version()

    def _parts(self) -> list[torch.Tensor]:
        return [torch.cat((lay.wk.weight, lay.wv.weight)) for lay in self.layers]

    def _version(self) -> int:
        return sum(lay.wk.weight._version + lay.wv.weight._version + lay.cross_attn_norm_kv.weight._version
                   for lay in self.layers)

    @torch.no_grad()
    def refresh(self) -> None:
        if self._version() != self.version:
            torch.stack(self._parts(), out=self.w)  # in place: CUDA graphs keep the address
            if self.norm_w is not None:
                torch.stack([lay.cross_attn_norm_kv.weight for lay in self.layers], out=self.norm_w)
            self.version = self._version()

    def __call__(self, units_BKD: torch.Tensor) -> torch.Tensor:
        """[2 (keys, values), layers, B, Nkv, K, H]: what each layer's `kv(units)` returns."""
        (B, K, D), n, lay = units_BKD.shape, len(self.layers), self.layers[0]
        if self.kernel:
            from . import kernels

            normed = kernels.norms(units_BKD.reshape(B * K, D), self.norm_w, lay.cross_attn_norm_kv.eps)
        else:
            normed = torch.stack([la.cross_attn_norm_kv(units_BKD) for la in self.layers]).view(n, B * K, D)
        y = torch.bmm(normed, self.w.transpose(1, 2))  # n, B*K, 2*Nkv*H
        return y.view(n, B, K, 2, lay.n_kv_heads, lay.head_dim).permute(3, 0, 1, 4, 2, 5)


def _rope_matrices(cos_TH2: torch.Tensor, sin_TH2: torch.Tensor) -> torch.Tensor:
    """RoPE at T positions as [T, H, H] fp32 matrices R, so that `x @ R[t]` rotates every
    interleaved pair of x's heads as `apply_rope` does at position t: one matrix product per
    layer in place of the elementwise chain. cos, sin: [T, H/2] (sin's + half)."""
    c, s = cos_TH2, sin_TH2
    T, h2 = c.shape
    blocks = torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2)  # T, H/2, 2 (in), 2 (out)
    R = torch.diag_embed(blocks.permute(0, 2, 3, 1))  # T, 2, 2, H/2, H/2: [t, a, b, i, i] = blocks[t, i, a, b]
    return R.permute(0, 3, 1, 4, 2).reshape(T, 2 * h2, 2 * h2)  # row 2i+a, column 2j+b


def _rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`_rope_matrices` at one position [H, H], from `rope_cos_sin`'s tables for it."""
    return _rope_matrices(cos.reshape(1, -1), sin.reshape(1, -1, 2)[:, :, 1])[0]


# Generator._make_rope_tables keeps each stack's RoPE rotation matrices for every position (for
# the fused steps without the kernels) where they take at most this many bytes
ROPE_MATRIX_BYTES = 64 << 20


class _KernelChoice(NamedTuple):
    """The kernels that module constants switch (ATTEND_KERNEL, LINEAR_KERNEL, ROPE_ATTEND), as
    read when a Generator is made; all False without Generator(kernels=...)."""

    attend: bool = False  # kernels.attend for the self-attention, at every row count
    linear: bool = False  # kernels.linear_add in the Triton block steps (a few rows)
    rope_attend: bool = False  # past them, kernels.rope_attend where kernels.attend runs


def _rope_attend(y_BF: torch.Tensor, rope: tuple, att, kc: torch.Tensor, vc: torch.Tensor, slot: torch.Tensor,
                 mask: torch.Tensor | None, choice: _KernelChoice, n_keys: int | None = None,
                 last: torch.Tensor | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE, the cache writes at `slot` and the attention [B, N, H] after cuBLAS's q|k|v product
    y: one kernel (kernels.rope_attend) where the attention kernel runs over at most
    ROPE_ATTEND_MAX_KEYS slots and ROPE_ATTEND is on, else kernels.rope_write, then `_attend`."""
    from . import kernels

    S = kc.shape[2] if n_keys is None else n_keys
    if choice.rope_attend and _uses_kernel(choice.attend, S) and S <= ROPE_ATTEND_MAX_KEYS:
        return kernels.rope_attend(y_BF, *rope, att.n_heads, kc, vc, slot, last=last, **_seen(mask, n_keys, first))
    q = kernels.rope_write(y_BF, *rope, att.n_heads, att.n_kv_heads, kc, vc, slot)  # B N H
    return _attend(q, kc, vc, mask, n_keys, kernel=choice.attend, last=last, first=first)


_DEFAULT_KERNELS = _KernelChoice()


def _block_step(layer, kc, vc, x_B1D, cos, sin, slot, mask, fused: _Fused | None = None,
                rope: torch.Tensor | tuple | None = None, choice: _KernelChoice = _DEFAULT_KERNELS,
                last: torch.Tensor | None = None, own: bool = False, normed: torch.Tensor | None = None,
                norm_out=None):
    """One pre-norm block for one new position, writing its K/V into the ring first. With
    `fused`, q|k|v come from one matrix product, and `rope` is either the step's rotation
    matrix (`_rope_matrix`: RoPE is one more product) or its (cos, sin) halves for the Triton
    kernels (`bltkit.kernels`; up to KERNEL_MAX_ROWS rows norm, q|k|v, RoPE and the ring writes
    in one kernel, and norm, w1|w3 and SwiGLU in another; more rows cuBLAS's products, then
    RoPE and the ring writes in one kernel). `choice`: the kernels that module constants switch (the attention
    kernel also on the PyTorch path, for more rows than the block kernels take). `last`: the
    attention kernel's bound on the slots it reads (`_attend`). `own`: x_B1D is the caller's
    temporary, which the fused path's residual adds may overwrite (cuBLAS's products, no copy of x
    first). Past the block kernels' rows (`rope` a tuple, more than KERNEL_MAX_ROWS rows) `normed`
    may hold attention_norm(x), made by the step before, and with `norm_out` (the norm the next
    step applies first) the w2 residual add and that norm run in one kernel: it returns (x,
    norm_out(x))."""
    att = layer.attention
    if isinstance(rope, tuple) and x_B1D.shape[0] <= KERNEL_MAX_ROWS:
        return _block_step_kernels(layer, kc, vc, x_B1D, slot, mask, fused, rope, choice=choice, last=last)
    xn = layer.attention_norm(x_B1D) if normed is None else normed
    N, Nk, H = att.n_heads, att.n_kv_heads, att.head_dim
    if isinstance(rope, tuple):  # more rows than the block kernels take: RoPE and the ring writes in one
        # kernel, with the attention where its kernel runs
        out = _rope_attend(F.linear(xn, fused.qkv[id(layer)])[:, 0], rope, att, kc, vc, slot, mask, choice, last=last)
    else:
        if fused is None:
            q, k, v = att.qkv(xn, cos, sin)  # B 1 N H
        else:  # the same products from one fused matrix; RoPE on the adjacent q|k columns at once
            y = F.linear(xn, fused.qkv[id(layer)]).view(*xn.shape[:2], N + 2 * Nk, H)
            q, k = (y[:, :, :N + Nk].float() @ rope).to(y.dtype).split([N, Nk], dim=2)
            v = y[:, :, N + Nk:]
        kc.index_copy_(2, slot, k.transpose(1, 2))
        vc.index_copy_(2, slot, v.transpose(1, 2))
        out = _attend(q[:, 0], kc, vc, mask, kernel=choice.attend, last=last)  # B N H
    if fused is None:
        h = x_B1D + att.wo(out.flatten(1)[:, None])
        return h + layer.feed_forward(layer.ffn_norm(h))
    if isinstance(rope, tuple):  # the residual add and the FFN's norm in one kernel after wo
        h = _owned(x_B1D, own)
        hn = _residual_norm(h, out, att.wo.weight, layer.ffn_norm)
    else:  # the residual adds ride in the matrix products (addmm: x + a @ W.T), one kernel each
        h = _linear_add(x_B1D, out, att.wo.weight, inplace=own)
        hn = layer.ffn_norm(h)
    m = _swiglu(layer.feed_forward, hn, fused.w13[id(layer)], kernel=isinstance(rope, tuple))
    if norm_out is not None:  # h: this step's own (`_owned` above)
        assert isinstance(rope, tuple), "norm_out needs the kernels' step (rope as cos, sin halves)"
        return h, _residual_norm(h, m, layer.feed_forward.w2.weight, norm_out)
    return _linear_add(h, m, layer.feed_forward.w2.weight, inplace=True)


def _owned(x: torch.Tensor, own: bool) -> torch.Tensor:
    """x itself where it is the caller's temporary (`own`) and contiguous, else a contiguous copy:
    what `_residual_norm` may write into."""
    return x if own and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)


def _residual_norm(x_BTD: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, norm, beta: float = 1.0) -> torch.Tensor:
    """x = beta * x + a @ weight.T in place (x the step's own, contiguous) -> norm(x), by
    bltkit.kernels.residual_norm: the product in fp32 (cuBLAS), then the add, its rounding and
    the RMSNorm in one kernel, where addmm and the norm took two or three."""
    from . import kernels

    B, T, D = x_BTD.shape
    return kernels.residual_norm(x_BTD.view(B * T, D), a.reshape(B * T, -1), weight, norm.weight,
                                 norm.eps, beta=beta).view(B, T, D)


def _swiglu(ff, hn: torch.Tensor, w13: torch.Tensor | None = None, kernel: bool = False) -> torch.Tensor:
    """silu(w1 hn) * w3 hn, the FFN before w2; `w13` ([w1; w3], a fused copy): one product, then
    with `kernel` silu and the product in one kernel (bltkit.kernels.swiglu; two strided
    elementwise kernels otherwise)."""
    if w13 is None:
        return F.silu(ff.w1(hn)) * ff.w3(hn)
    y = F.linear(hn, w13)
    if kernel:
        from . import kernels

        return kernels.swiglu(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], -1)
    a, b = y.chunk(2, dim=-1)
    return F.silu(a) * b


def _prologue(norm, x_BD: torch.Tensor, ss: torch.Tensor | None) -> tuple[torch.Tensor, tuple | None]:
    """A product's input and its `norm` argument (bltkit.kernels' products): x with the sums of
    squares its residual product wrote (the product norms x on the way in), or, where no residual
    product made x, norm(x) made here."""
    return (x_BD, (ss, norm.weight, norm.eps)) if ss is not None else (norm(x_BD), None)


def _product_block(layer, x_BD: torch.Tensor, ss: torch.Tensor | None, fused: _Fused, rope: tuple,
                   kc: torch.Tensor, vc: torch.Tensor, slot: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block for one new position on bltkit.kernels' products (DECODER_PRODUCTS,
    GLOBAL_PRODUCTS, FRONT_PRODUCTS): norm, q|k|v, RoPE and the cache writes at `slot` in one
    kernel, `attend(q)` (the attention over the caches), wo with its residual, norm, w1|w3 and
    SwiGLU in one, w2 with its residual. x [B, D] unnormed and `ss` its sums of squares (None:
    x is not a residual product's) -> the block's (x, ss); x is not overwritten."""
    from . import kernels

    att, B = layer.attention, x_BD.shape[0]
    a, norm = _prologue(layer.attention_norm, x_BD, ss)
    q = kernels.product_rope(a, fused.qkv[id(layer)], *rope, att.n_heads, att.n_kv_heads, kc, vc, slot, norm=norm)
    x_BD, ss = kernels.product_residual(attend(q).reshape(B, -1), att.wo.weight, x_BD)
    a, norm = _prologue(layer.ffn_norm, x_BD, ss)
    gated = kernels.product_swiglu(a, fused.w13[id(layer)], norm=norm)
    return kernels.product_residual(gated, layer.feed_forward.w2.weight, x_BD)


def _block_step_kernels(layer, kc, vc, x_B1D, slot, mask, fused: _Fused, rope: tuple,
                        n_keys: int | None = None, choice: _KernelChoice = _DEFAULT_KERNELS,
                        last: torch.Tensor | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
    """`_block_step` with bltkit.kernels: k, v written at `slot` (shared, or a row's own), then
    attention over the first `n_keys` cache slots (all by default; `first`, `last` as `_attend`'s)."""
    from . import kernels

    att, B = layer.attention, x_B1D.shape[0]
    an, fn = layer.attention_norm, layer.ffn_norm
    q = kernels.norm_qkv_rope(x_B1D.reshape(B, -1), an.weight, an.eps, fused.qkv[id(layer)], *rope,
                              att.n_heads, att.n_kv_heads, kc, vc, slot)  # B N H
    h = _linear_add(x_B1D, _attend(q, kc, vc, mask, n_keys, kernel=choice.attend, last=last, first=first),
                    att.wo.weight, kernel=choice.linear)
    m = kernels.norm_swiglu(h.reshape(B, -1), fn.weight, fn.eps, fused.w13[id(layer)])
    return _linear_add(h, m, layer.feed_forward.w2.weight, kernel=choice.linear)


def _attend(q_BNH: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor | None,
            n_keys: int | None = None, kernel: bool = False, last: torch.Tensor | None = None,
            first: torch.Tensor | None = None) -> torch.Tensor:
    """One position's attention over the first `n_keys` cache slots (all by default) with the
    step's additive mask -> [B, N, H]: SDPA, or with `kernel`, over at most ATTEND_MAX_KEYS
    slots, bltkit.kernels.attend (SDPA runs a many-query kernel for the one query: 20-39 µs a
    call at 64 rows on an H200), which reads no slot after `last` (a device tensor: the last slot
    any row sees, or each row's; the mask hides those slots anyway, so SDPA, which reads them
    all, ignores it). `mask` None (the kernel only, `_uses_kernel`): each row sees the slots from
    `first` (a device tensor [B]) to `last`. `mask` a ring's bounds (`_RingBounds`; the kernel
    only): `last` is the step's position."""
    if _uses_kernel(kernel, kc.shape[2] if n_keys is None else n_keys):
        from . import kernels

        return kernels.attend(q_BNH, kc, vc, last=last, **_seen(mask, n_keys, first))
    assert isinstance(mask, torch.Tensor), "SDPA needs the mask (bounds alone are the attention kernel's)"
    out = F.scaled_dot_product_attention(q_BNH[:, :, None], kc[:, :, :n_keys], vc[:, :, :n_keys], attn_mask=mask,
                                         enable_gqa=q_BNH.shape[1] != kc.shape[1])
    return out[:, :, 0]


def _uses_kernel(kernel: bool, n_keys: int) -> bool:
    """Does `_attend` run bltkit.kernels.attend (switched on, at most ATTEND_MAX_KEYS slots)?"""
    return kernel and n_keys <= ATTEND_MAX_KEYS


def _linear_add(x_BTD: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, beta: float = 1.0,
                kernel: bool = False, inplace: bool = False) -> torch.Tensor:
    """beta * x + a @ weight.T as one kernel (x [B, T, D]; a [B, T, ...]): addmm, or with
    `kernel` bltkit.kernels.linear_add (a few rows, T = 1). `inplace` (x contiguous, a temporary
    nothing else reads): addmm writes into x, where out of place it first copies x into its
    result (a copy kernel, ~1.5 µs a call in a batch-64 step on an H200)."""
    B, T, D = x_BTD.shape
    if kernel:
        from . import kernels

        return kernels.linear_add(x_BTD.reshape(B, D), a.reshape(B, -1), weight, beta).view_as(x_BTD)
    if inplace and x_BTD.is_contiguous():
        x_BTD.view(B * T, D).addmm_(a.reshape(B * T, -1), weight.t(), beta=beta)
        return x_BTD
    return torch.addmm(x_BTD.reshape(B * T, D), a.reshape(B * T, -1), weight.t(), beta=beta).view_as(x_BTD)


def _cross_step(layer, x_BTD: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask,
                kernel: bool = False, linear_kernel: bool = False, attend_kernel: bool = False,
                own: bool = False, normed: torch.Tensor | None = None, norm_out=None, q_kernel: bool = False):
    """2x + CrossAttention(x) over cached keys/values (the double residual, spec §16.1), the
    residual inside the output projection. `kernel`: norm, q and the attention in one Triton
    kernel (one position a row, no mask; bltkit.kernels.norm_cross_attend). `attend_kernel`:
    the q product by cuBLAS, then the attention by bltkit.kernels.attend (one position a row, no
    mask: more rows than norm_cross_attend takes, where SDPA ran a prefill kernel for the one
    query and the patch's cross_attn_k keys, 7.6 µs a call at 64 rows on an H200). `own`: x_BTD
    is the caller's temporary, which the residual product may overwrite (no copy of x first).
    With `attend_kernel`, `normed` may hold cross_attn_norm_q(x), made by the step before, and
    with `norm_out` (the norm the next step applies first) the residual product, its add and that
    norm run as bltkit.kernels.residual_norm: it returns (x, norm_out(x)). `q_kernel` (with
    `attend_kernel`): the q product and the attention as one kernel (bltkit.kernels.cross_attend)."""
    if kernel or attend_kernel:
        from . import kernels

        B, _, D = x_BTD.shape
        nq = layer.cross_attn_norm_q
        if kernel:
            heads = kernels.norm_cross_attend(x_BTD.reshape(B, D), nq.weight, nq.eps, layer.wq.weight, k, v)
        else:
            xn = nq(x_BTD) if normed is None else normed
            if q_kernel:
                heads = kernels.cross_attend(xn.reshape(B, D), layer.wq.weight, k, v).view(B, 1, -1)
            else:
                heads = kernels.attend(layer.wq(xn).view(B, layer.n_heads, layer.head_dim), k, v, None).view(B, 1, -1)
            if norm_out is not None:
                x = _owned(x_BTD, own)
                return x, _residual_norm(x, heads, layer.wo.weight, norm_out, beta=2.0)
    else:
        heads = layer.heads(x_BTD, k, v, mask)
    assert norm_out is None, "norm_out needs attend_kernel"
    return _linear_add(x_BTD, heads, layer.wo.weight, beta=2.0, kernel=linear_kernel, inplace=own)


# with the native steps, prompts are read byte by byte (not by one full forward: `_prefill`) where
# the shortest prompt's bytes times the model's parameters (less its embedding tables) are at
# most this: there the steps are faster. On a 2-core EPYC (eighteenth session, fp32), a forward's
# fixed cost is ~8 ms for the tiny preset (~190k such parameters: 64 bytes forward 9.5 ms, stepped
# 3.0; even at ~230 bytes) and ~25 ms for the bundled model (18.4M: even at ~8; docs/benchmarks.md)
NATIVE_STEP_PROMPT_WORK = 40_000_000

# the step functions that take L, the global-cache slots they attend (`Generator._global_slots`)
_SLOT_STEPS = frozenset({"patch", "front_patch"})

# Generator.generate_ids reads the generated bytes back (a host sync) once every this many steps
# (every step while streaming): the host launches the next steps while the GPU runs the last ones,
# and stops at most READ_EVERY - 1 steps after the last row is done (their bytes are discarded)
READ_EVERY = 16
# on CUDA, the bytes of those steps are copied back without waiting (a pinned buffer and an event)
# and handed out at the next read, so the GPU never waits for the host's reading: stopping
# at EOS or a stop string may then run up to 2 x READ_EVERY - 1 steps past the last row's end
READ_AHEAD = True


def _reads_ahead(buf: torch.Tensor) -> bool:
    """Does generate_ids read the bytes back ahead (READ_AHEAD, on CUDA)?"""
    return READ_AHEAD and buf.is_cuda


# from this many rows on nearly every step closes some row's patch: the patch step then runs every
# step without asking the GPU (a host sync), and decoding before the boundary is known would
# nearly always be repeated (Generator(speculate=...))
PATCH_EVERY_BYTE_ROWS = 8

# Generator(kernels=...) runs bltkit.kernels.attend for the steps' self-attention, at every row
# count, over caches of at most ATTEND_MAX_KEYS slots where this is True (longer ones keep SDPA).
# On an H200 (eleventh session, blt-1b, benchmarks/generate.py --attend-kernel on / off) the
# kernel, which reads no slot past a row's last, won with 64-byte prompts (caches of 192 slots:
# batch 1 709 against 655 bytes/s, batch 64 14,350 against 12,662) and lost with 2,048-byte ones
# (rings of 512 slots, the global cache's 512: batch 1 934 against 993, batch 8 1,272 against
# 1,326, batch 64 6,703 against 6,802), where its splits need a second kernel to combine them.
# Since the attention kernel loads the mask, keys and values at once (twelfth session) it no
# longer loses there: with 2,048-byte prompts (fourteenth session, benchmarks/generate.py
# --attend-max-keys 256 / 512 / 1024) batch 1 made 907 / 911 / 908 bytes/s, batch 8 2,438 /
# 2,427 / 2,410 and batch 64 7,517 / 7,497 / 8,548, where the global cache reached 768 slots
ATTEND_KERNEL = True
ATTEND_MAX_KEYS = 1024  # read as the steps are traced (and captured into CUDA graphs)

# the Triton block steps (up to KERNEL_MAX_ROWS rows) run their output and down projections with
# bltkit.kernels.linear_add where this is True (one kernel instead of cuBLAS's split-K product
# and its reduction): on since the tenth session's H200 run, 2.07 -> 1.92 ms a byte at batch 1
# (benchmarks/profile_generate.py --variants kernels-plain,kernels); both are read when a
# Generator is made
LINEAR_KERNEL = True

# Generator(kernels=True) bounds the global step's attention by each row's first slot of its document
# and its own slot (kernels.attend's `first` and `last`) where this is True, instead of building
# the additive mask (~8 small kernels a patch step; twenty-first session, not yet timed on a GPU,
# where `profile_generate.py --variants kernels-nobounds,kernels` compares); read when a Generator
# is made. Where the attention kernel does not run (ATTEND_KERNEL off, or more than
# ATTEND_MAX_KEYS slots) the mask is built as before
GLOBAL_BOUNDS = True

# Generator(kernels=True) bounds the self-attention over each ring (the entropy model's, the
# encoder's, the decoder's) by the step's position, each row's document start and the window
# (kernels.attend's `ring`) where this is True and the attention kernel runs over the ring,
# instead of writing the ring's positions and documents and building its additive mask: one
# kernel a ring and step where that took about ten (twenty-third session; twenty-fifth session, H200, blt-1b, bf16, `profile_generate.py --batch 64 --steps 32`: 2.26 ms a step with every switch on,
# 2.29 with this off); read when a Generator is made
RING_BOUNDS = True

# Generator(kernels=True) runs the decoder past KERNEL_MAX_ROWS rows with each residual add (the
# cross-attention's wo, the blocks' w2) and the norm after it as kernels.residual_norm, and its
# cross-attention key/value norms of a closed patch as kernels.norms, where this is True (twenty-
# first session: 18 + 9 kernels fewer a byte for blt-1b; not yet timed on a GPU, where
# `profile_generate.py --batch 64 --variants kernels-nodecnorms,kernels` compares); read when a
# Generator is made
DECODER_NORMS = True

# Generator(kernels=True) runs RoPE, the cache writes and the attention of every block step past
# KERNEL_MAX_ROWS rows as one kernel (kernels.rope_attend) where the attention kernel runs over at
# most ROPE_ATTEND_MAX_KEYS slots and this is True: one kernel fewer a layer (kernels.rope_write's,
# 3-5.6 µs with its gap in a batch-64 step). On an H200 (twenty-second session, blt-1b, bf16,
# `profile_generate.py --batch 64 --variants kernels-noropeattend,kernels`) a step took 2.38
# against 2.47 ms after 64-byte prompts (caches of ~100-200 slots), and 4.92 against 4.85 after
# 2,048-byte ones (caches of ~450-512 slots, where the attention's extra loads before its key loop
# outweigh the kernel saved); read when a Generator is made
ROPE_ATTEND = True
ROPE_ATTEND_MAX_KEYS = 256  # read as the steps are traced

# Generator captures its CUDA graphs on a stream of the highest priority where the entropy model
# runs on a second stream (of the default priority, the lowest) and this is True: the GPU then
# schedules the waiting blocks of the step's chain (the global step, the decoder) before the
# entropy model's. A small gain on an H200 (twenty-second session, blt-1b, bf16,
# `profile_generate.py --batch 64 --variants kernels-nopriority,kernels`): 2.47 and 2.46 against
# 2.49 and 2.48 ms a step after 64-byte prompts, the same 2.14 at batch 8 and 5.12 after 2,048-byte
# prompts; read when a Generator is made
STREAM_PRIORITY = True

# with the global step beside the entropy model (Generator(overlap=True), batches of
# PATCH_EVERY_BYTE_ROWS rows or more, CUDA), the patch step's counts (the rows' patch positions,
# documents, the open patch's start, length and pooling: 14 small kernels) run on the second
# stream beside the decoder, which reads none of them, where this is True; the decoder's cross K/V
# stay on the chain (twenty-fourth session; `tests/test_generate.py::test_overlap_on_cuda_equals_plain_steps`
# checks it; twenty-fifth session, H200, blt-1b, bf16, `profile_generate.py --batch 64 --steps 32`: 2.26 ms a step with every switch on, 2.29 with this off); read as the steps are traced
SIDE_COUNTS = True

# with the global step beside the entropy model (Generator(overlap=True), batches of
# PATCH_EVERY_BYTE_ROWS rows or more, CUDA), the entropy model's stream runs in a CUDA green
# context of this many SMs where this is a number (None: every SM, as before). Its ~140 small
# kernels a byte spread over the whole GPU slow the global stack's layers beside them from ~64 to
# ~76 µs (~0.19 ms a step at 64 rows, twenty-second session, `benchmarks/entropy_contention.py`);
# confined to some SMs, they might leave the others to the chain. They did not: on an H200
# (twenty-fifth session, blt-1b, bf16, `profile_generate.py --batch 64 --steps 32 --variants
# kernels,kernels-sms16,kernels-sms32,kernels-sms48,kernels,kernels-sms32,kernels-sms64`) 16 SMs
# took 2.81 ms a step, 32 2.30 and 2.31, 48 2.30, 64 2.28, against 2.26 and 2.27 on every SM; so
# off. It works inside the captured graphs (test_entropy_model_on_fewer_sms_equals_plain_steps
# passed there); needs torch.cuda.green_contexts with GreenContext.Stream(); read when a
# Generator is made
ENTROPY_SMS: int | None = None

# Generator(kernels=True) runs a byte's advance (documents, n) and the feed of the next byte as
# kernels.advance and kernels.feed where this is True: one kernel each where PyTorch takes four,
# on the chain between the decoder and the next byte's front at every batch size (twenty-fourth
# session; twenty-fifth session, H200, blt-1b, bf16, `profile_generate.py --batch 64 --steps 32`: 2.26 ms a step with every switch on, 2.27 with this off); read when a Generator is made
STEP_KERNELS = True

# Generator(kernels=True) commits a patch step's decoder cross K/V (every cross layer's, of the rows
# whose patch closed) with kernels.commit_rows where this is True: it copies the closed rows only,
# where torch.where read and wrote every row's through a permuted view (15 µs at 64 rows on an
# H200, twenty-fifth session's trace, at the head of the decoder); read when a Generator is made
COMMIT_KERNEL = True

# Generator(kernels=True) decodes greedily (temperature 0) with kernels.greedy where this is True:
# the logits' cast to fp32 into the state and their argmax in one kernel, where the copy and
# torch.argmax took two (8 µs at 64 rows on an H200, the step's last kernels); read as the steps
# are traced
GREEDY_KERNEL = True

# Generator(kernels=True) embeds each step's byte (its byte row and hash n-gram rows: BLT.embed)
# with kernels.hash_embed, one kernel where the ids' window, products, sum, floor mod, offsets,
# bag lookup and add took about ten, on the chain before the encoder at every batch size
# (twenty-fourth session; twenty-fifth session, H200, blt-1b, bf16, `profile_generate.py --batch 64 --steps 32`: 2.26 ms a step with every switch on, 2.29 with this off); read when a Generator is made
HASH_EMBED = True

# Generator(kernels=True) runs the decoder's cross-attention past KERNEL_MAX_ROWS rows as
# kernels.cross_attend (the q product of the normed rows and the attention over the closed
# patch's units in one kernel, row blocks of q by tl.dot), where cuBLAS's q product and
# kernels.attend took two: one kernel fewer a decoder layer on the batch-64 chain (twenty-fourth
# session; twenty-fifth session, H200, blt-1b, bf16, `profile_generate.py --batch 64 --steps 32`: 2.26 ms a step with every switch on, 2.28 with this off); read when a Generator is made
CROSS_ATTEND = True

# Generator(kernels=True) runs the decoder past KERNEL_MAX_ROWS rows on bltkit.kernels' Triton
# products where this is True: each residual product writes its rows' sums of squares beside them
# (kernels.product_residual), and the next one RMS-norms its input on the way in
# (kernels.product_rope: the norm, q|k|v, RoPE and the ring writes; kernels.product_swiglu: the
# norm, w1|w3 and SwiGLU; kernels.cross_attend's q; kernels.product: the final norm and the output
# head). A decoder layer then takes 7 kernels where cuBLAS's products with the norms, RoPE and
# SwiGLU kernels after them took 11: 37 fewer on blt-1b's batch-64 chain (count_step_ops.py). The
# twenty-first session's Triton products lost in the global stack (2.67-2.73 against 2.55-2.59 ms
# a step), beside the entropy model's stream; the decoder runs after that stream has finished
# (twenty-fifth session's trace). Written in the twenty-eighth session without a GPU (tested under Triton's
# interpreter, compiled for sm_90 on the CPU); off until a GPU times it (`decode_gap.py --variants
# base DECODER_PRODUCTS=True`); read when a Generator is made
DECODER_PRODUCTS = False

# Generator(kernels=True) runs the global stack past KERNEL_MAX_ROWS rows on the same products
# (DECODER_PRODUCTS') where this is True: 5 kernels a layer where it takes 8 (75 fewer for blt-1b's
# 25 layers). The twenty-first session's Triton products there (with residual_norm kept after wo
# and w2) lost beside the entropy model's stream, so off; written in the twenty-eighth session, for
# a GPU to time (`decode_gap.py --variants base GLOBAL_PRODUCTS=True`); read when a Generator is made
GLOBAL_PRODUCTS = False

# Generator(kernels=True) runs the entropy model's and the encoder's steps past KERNEL_MAX_ROWS rows
# on the same products where this is True: 5 kernels a block where they take 8 (blt-1b: 14 + 1
# blocks; the entropy model's final norm and output head one kernel for two). The entropy model runs
# beside the global stack, and its ~140 kernels a byte slow the stack's layers (twenty-second
# session); written in the twenty-eighth session, off until a GPU times it (`decode_gap.py
# --variants base FRONT_PRODUCTS=True`); read when a Generator is made
FRONT_PRODUCTS = False

# Generator(kernels=True) runs its Triton block steps up to this many rows: their programs each
# read a block of weights (a share of a head's q|k|v, some rows of w1|w3) for one row
# (matrix-vector products), which is what one to a few rows need; more rows share cuBLAS's matrix
# products better. On an H200 (twelfth session, blt-1b, 64-byte prompts, benchmarks/generate.py
# --kernel-max-rows 8 against 1) the Triton steps won at 2 rows (933 against 610 bytes/s) and 4
# (1,143 against 1,095) and lost at 6 (1,285 against 1,552; at 8 the eleventh session's 5.56 ms a
# step against 4.49 on cuBLAS at 64 rows)
KERNEL_MAX_ROWS = 4


def _conditional_nodes() -> bool:
    """Can CUDA graphs captured here hold conditional nodes (a CUDA 12.4+ build of PyTorch that
    captures into them: torch.cuda.CUDAGraph.begin_capture_to_if_node)?"""
    version = torch.version.cuda
    if not version or not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return False
    return tuple(int(v) for v in version.split(".")[:2]) >= (12, 4)


def _green_stream(dev: torch.device, n_sms: int) -> tuple[object, torch.cuda.Stream]:
    """A stream whose kernels run on `n_sms` of `dev`'s SMs only (a CUDA green context) -> (the
    context, which the stream needs alive, the stream). A clear error where this PyTorch or driver
    has none."""
    try:
        from torch.cuda.green_contexts import GreenContext

        index = dev.index if dev.index is not None else torch.cuda.current_device()
        ctx = GreenContext.create(num_sms=n_sms, device_id=index)
        return ctx, ctx.Stream()
    except (ImportError, AttributeError, AssertionError, RuntimeError, TypeError) as e:  # (no CUDA: an assert)
        raise RuntimeError(
            f"generate.ENTROPY_SMS = {n_sms} runs the entropy model in a CUDA green context, which this "
            f"PyTorch or driver does not offer ({type(e).__name__}: {e}); set generate.ENTROPY_SMS = None "
            "to run it on every SM") from e


def _kernels_refusal(device: torch.device, fuse: bool, stacks) -> str | None:
    """Why bltkit.kernels cannot run the steps of `stacks` on `device` (None: they can)."""
    from . import kernels as K

    if not fuse:
        return "Generator(kernels=True) runs the fused projections: leave fuse=True"
    if not K.available(device):
        return ("Generator(kernels=True) needs the triton package and a CUDA model "
                "(or TRITON_INTERPRET=1, Triton's CPU interpreter, for tests)")
    bad = [c.head_dim for c in stacks if not K.supported(c.head_dim)]
    if bad:
        return f"Generator(kernels=True) needs power-of-two head dims >= 4; this model has {bad}"
    return None


def _fused_bytes(blocks) -> int:
    """Bytes that `_Fused(blocks)` allocates: one more copy of each block's q, k, v, w1, w3."""
    return sum(w.numel() * w.element_size() for _, qkv, w13 in _Fused.sources(blocks) for w in (*qkv, *w13))


def _fits(nbytes: int, device: torch.device) -> bool:
    """`nbytes` is at most half of the device's free memory (CUDA), leaving room for the caches."""
    return device.type != "cuda" or 2 * nbytes <= torch.cuda.mem_get_info(device)[0]


class Generator:
    """Fast generation for a `BLT`: `generate()` for batches, `stream()` for one prompt.

    Args:
        model: a BLT in eval mode (any device, any dtype; fp32 is exact against the reference).
        cuda_graphs: replay the step functions as CUDA graphs (default: on CUDA).
        compile: `torch.compile` the step functions (fewer, fused kernels; minutes to compile).
            It turns the default Triton kernels and speculation off, and on CUDA those are faster
            (fifth session: compiled 2.73 ms a byte against 2.83 with plain CUDA graphs; the
            kernels since: 1.40x over plain graphs; docs/benchmarks.md). On a CPU it helps
            small models at batch 1 (docs/generation.md).
        prefill: read prompts with one full forward (default) rather than byte by byte.
        kernels: run the blocks' steps with the Triton kernels of `bltkit.kernels` for batches of
            up to KERNEL_MAX_ROWS rows, and for larger ones RoPE with the cache writes after
            cuBLAS's products (`kernels.rope_write`) and each residual add with the norm after it
            (`kernels.residual_norm`); at any batch size the attention over short
            caches (`ATTEND_KERNEL`) (needs `triton` and a CUDA model). Default (None): on
            where they can run (a CUDA model, `triton` installed, power-of-two head dims, `fuse`,
            no `compile`); 1.40x faster a byte for blt-1b on an H200 (docs/benchmarks.md). The
            global patch step runs them on one more copy of the global stack's q|k|v and w1|w3
            (blt-1b: 1.8 GB in bf16), by default only where that copy takes at most half of the
            free GPU memory.
        fuse: run the byte-level stacks with fused q|k|v and w1|w3 matrices, the decoder's
            cross-attention keys and values of a closed patch from one stacked wk|wv copy (every
            layer in one product; `_CrossKV`), and the encoder's of each byte from one product a
            layer over its stacked wk|wv (default; costs one more copy of those weights,
            refreshed when the model's weights change).
        speculate: for batches under PATCH_EVERY_BYTE_ROWS rows, decode each byte before its
            boundary is known, as if no patch closes, beside the entropy model (a second CUDA
            stream), and decode again after the patch step when one closes. The same bytes either
            way (tests/test_generate.py). Default (None): on for a CUDA model that patches by
            entropy, without `compile` (blt-1b on an H200: 2.17 -> 2.07 ms a byte;
            docs/benchmarks.md).
        overlap: for batches of PATCH_EVERY_BYTE_ROWS rows or more (whose patch step runs every
            byte), run the global step for every row as if each row's patch closed, beside the
            entropy model (a second CUDA stream), and keep its results for the rows whose patch
            does close once the entropy model has decided. The same bytes either way
            (tests/test_generate.py). On by default; without an entropy model (other patching
            modes) it only runs the two steps as one.
        byte_graph: with CUDA graphs, capture all of a byte's steps as one graph (one per bucket of
            global-cache slots the call can reach) in place of one graph per launch. Where
            the patch step runs only when some row closes a patch (fewer than
            PATCH_EVERY_BYTE_ROWS rows) it sits in the graph's conditional node, which the GPU
            enters or skips by itself: the host never waits for the GPU between bytes. Needs
            CUDA graphs that hold conditional nodes: CUDA 12.4 or later and a PyTorch with
            `torch.cuda.CUDAGraph.begin_capture_to_if_node` (2.13 has it, 2.11 does not).
            Default (None): off; it has not yet run on a GPU (`test_byte_graph_on_cuda_equals_step_graphs`
            skips where the binding is missing, as on the PyTorch 2.11 of the sixteenth session's H200).
        native: run the step functions in C (`bltkit.native`: compiled on first use by the system's
            C compiler) on a CPU model in fp32. Default (None): on where that can run (a CPU fp32
            model, a C compiler, no `compile` or `kernels`). The tiny preset's byte takes ~0.1 ms
            there against ~3.4 eagerly; the state and bytes are the PyTorch steps' to fp32
            rounding (tests/test_native.py; docs/generation.md).
    """

    def __init__(self, model, cuda_graphs: bool | None = None, compile: bool = False, prefill: bool = True,
                 fuse: bool = True, kernels: bool | None = None, speculate: bool | None = None,
                 overlap: bool = True, byte_graph: bool | None = None, native: bool | None = None):
        if not isinstance(model, BLT):
            raise ValueError(f"Generator needs a BLT, got {type(model).__name__}: an entropy model's directory holds "
                             "the patcher alone; pass the BLT's directory (the one that holds it)")
        self.model = model.eval()
        self.prefill = prefill  # read prompts with one full forward (else byte by byte through `step`)
        self.use_cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        fns = {"front": self._run_front, "patch": self._run_patch, "back": self._run_back,
               "speculative": self._run_speculative, "decode": self._run_decode, "advance": self._run_advance,
               "front_patch": self._run_front_patch, "feed": self._run_feed, "flag": self._run_flag}
        # compile fuses the many small elementwise kernels of a one-byte step (norms, RoPE, SwiGLU)
        self._fns = {k: torch.compile(f, dynamic=False) for k, f in fns.items()} if compile else fns
        self.compiled = compile
        self.speculate = speculate
        self.overlap = overlap
        if byte_graph and not _conditional_nodes():
            raise ValueError("byte_graph=True needs CUDA graphs with conditional nodes: a CUDA 12.4+ build of a "
                             "PyTorch with torch.cuda.CUDAGraph.begin_capture_to_if_node (2.13 has it, 2.11 does "
                             f"not; this is {torch.__version__}); leave byte_graph None")
        self.byte_graph = bool(byte_graph)
        self.global_bucket = 256  # global-cache slots per patch-step shape (see _global_slots)
        self.sampling: tuple = (0.0, None, None)
        self.graphs = None
        self.cfg = model.config
        pc = self.cfg.patcher
        if pc.mode == "entropy" and model.entropy_model is None:
            raise ValueError("this model patches by entropy but has no entropy model attached")
        # fused q|k|v and w1|w3 for the byte-level stacks (see _Fused)
        ent_layers = list(model.entropy_model.layers) if pc.mode == "entropy" else []
        stacks = [self.cfg.encoder, self.cfg.decoder, self.cfg.global_transformer] + \
            ([self.cfg.entropy_model] if ent_layers else [])
        auto = kernels is None
        if auto:  # where they can run (Triton's CPU interpreter, for tests, only when asked)
            kernels = model.device.type == "cuda" and not compile and _kernels_refusal(model.device, fuse, stacks) is None
        elif kernels and (refusal := _kernels_refusal(model.device, fuse, stacks)):
            raise ValueError(refusal)
        self.kernels = kernels
        if native is None:  # where it can run
            native = not compile and not kernels and native_steps.refusal(model) is None \
                and native_steps.unavailable() is None
            low = model.device.type == "cpu" and next(model.parameters()).dtype != torch.float32
            if low and not compile:  # (load_model keeps the stored dtype: the bundled model's is bf16)
                warnings.warn(f"this model's weights are {next(model.parameters()).dtype} on a CPU, where PyTorch's "
                              "steps in that dtype are slow (about 30x the C steps of fp32 weights); load it with "
                              "dtype=torch.float32, or call model.float(), to run those", stacklevel=2)
        elif native:
            refusal = ("compile=True runs the PyTorch steps" if compile else "kernels=True runs the Triton steps"
                       if kernels else native_steps.refusal(model) or native_steps.unavailable())
            if refusal:
                raise ValueError(f"Generator(native=True): {refusal}")
        self.native = native
        if native:  # the C steps, handed each new state by `_init_state`
            # a byte's work for NATIVE_STEP_PROMPT_WORK: the parameters less the embedding tables
            tables = (torch.nn.Embedding, torch.nn.EmbeddingBag)
            self._work = sum(p.numel() for mod in model.modules() if not isinstance(mod, tables)
                             for p in mod.parameters(recurse=False))
            self._native = native_steps.Steps(self)
            self._fns = self._native.functions()
        fuse = fuse and not native  # the native steps read the model's own weights
        self.fused = _Fused([*ent_layers, *model.local_encoder.layers, *model.local_decoder.layers],
                            row_major=bool(kernels)) if fuse else None
        # the global stack's fused copies too when the kernels run its patch step (blt-1b: +1.8 GB);
        # chosen by default only where they take at most half of the free memory (else the byte
        # stacks run the kernels and the patch step stays on cuBLAS)
        glob = model.global_transformer.layers
        wanted = kernels and fuse and (not auto or _fits(_fused_bytes(glob), model.device))
        self.fused_global = _Fused(glob, row_major=True) if wanted else None
        # the kernels that module constants switch; the decoder's cross-attention steps take the
        # Triton kernel where its heads fit
        self._kernel_choice = _KernelChoice(attend=bool(kernels) and ATTEND_KERNEL, linear=bool(kernels) and LINEAR_KERNEL,
                                            rope_attend=bool(kernels) and ROPE_ATTEND)
        self._cross_kernel = bool(kernels) and _kernels_refusal(
            model.device, fuse, model.local_decoder.cross_attn_layers) is None
        self._global_bounds = bool(kernels) and GLOBAL_BOUNDS
        self._ring_bounds = self._kernel_choice.attend and RING_BOUNDS
        self._decoder_norms = self._cross_kernel and DECODER_NORMS
        from . import kernels as _k  # (its constants need no Triton)

        self._decoder_products = self._cross_kernel and DECODER_PRODUCTS and self.cfg.decoder.dim % _k.SS_COLS == 0
        self._global_products = (self.fused_global is not None and GLOBAL_PRODUCTS
                                 and self.cfg.global_transformer.dim % _k.SS_COLS == 0)
        front = [self.cfg.encoder.dim] + ([self.cfg.entropy_model.dim] if model.entropy_model is not None else [])
        self._front_products = self._cross_kernel and FRONT_PRODUCTS and all(d % _k.SS_COLS == 0 for d in front)
        self._cross_q = self._cross_kernel and CROSS_ATTEND  # kernels.cross_attend past the block kernels' rows
        self._step_kernels = bool(kernels) and STEP_KERNELS  # kernels.advance and kernels.feed
        self._commit_kernel = bool(kernels) and COMMIT_KERNEL  # kernels.commit_rows
        self._greedy_kernel = bool(kernels)  # kernels.greedy (where GREEDY_KERNEL, at temperature 0)
        # each step's byte embedded by one kernel (kernels.hash_embed), where the model has hash tables
        self._hash_coef = None
        if kernels and HASH_EMBED and model.encoder_hash_tok_embedding is not None:
            c = self.cfg
            self._hash_coef = hashing._coef_tensor(tuple(c.hash_sizes), c.hash_functions, max(c.hash_sizes),
                                                   model.device)
        # the decoder's cross keys and values of a closed patch, every layer in one product (and
        # with DECODER_NORMS their norms in one kernel)
        self.cross_kv = _CrossKV(model.local_decoder.cross_attn_layers, kernel=self._decoder_norms) \
            if fuse and model.local_decoder.cross_attn_layers else None
        # the encoder's cross-attention keys and values of each byte, every layer's wk|wv stacked
        # (one product a byte and layer; only the stacked weights `w` are read)
        self.enc_cross_kv = _CrossKV(model.local_encoder.cross_attn_layers) \
            if fuse and model.local_encoder.cross_attn_layers else None
        # the encoder's cross-attention over the open patch in the patch step (`_open_patch_heads`)
        self._open_kernel = bool(kernels) and _kernels_refusal(
            model.device, fuse, model.local_encoder.cross_attn_layers) is None

    # -- state ----------------------------------------------------------------------------------

    def _init_state(self, B: int, capacity: int, keys: list[int]) -> None:
        m, c = self.model, self.cfg
        for fused in (self.fused, self.fused_global, self.cross_kv, self.enc_cross_kv):
            if fused is not None:
                fused.refresh()  # weights changed since the last call (training in between)
        dev, dt = m.device, m.local_encoder.tok_embeddings.weight.dtype
        enc, dec, g, K = c.encoder, c.decoder, c.global_transformer, c.cross_attn_k

        def ring(stack_cfg, n_layers, window, dtype=dt):
            size = min(window, capacity) if window else capacity
            r = _Ring.new(n_layers, B, stack_cfg.n_kv_heads, stack_cfg.head_dim, size, window, dtype, dev)
            r.bounded = self._ring_bounds and _uses_kernel(self._kernel_choice.attend, size)
            return r

        em = m.entropy_model if c.patcher.mode == "entropy" else None
        self.ent = ring(em.config, em.config.n_layers, em.config.window,
                        em.output.weight.dtype) if em is not None else None
        self.enc = ring(enc, enc.n_layers, enc.window)
        self.dec = ring(dec, dec.n_layers, dec.window)
        n_enc_cross = len(m.local_encoder.cross_attn_layers)
        ch = enc.dim // enc.cross_attn_n_heads
        # encoder cross-attention keys/values of every byte (a patch can be arbitrarily long)
        # keys and values in one tensor, so that a step writes both in one copy
        self.enc_xkv = torch.zeros(2, n_enc_cross, B, enc.cross_attn_n_kv_heads, capacity, ch, dtype=dt, device=dev)
        self.enc_xk, self.enc_xv = self.enc_xkv[0], self.enc_xkv[1]
        self.runmax = torch.full((B, enc.dim), float("-inf"), dtype=dt, device=dev)
        self.p_cap = min(c.max_patches, capacity + 1)
        self.g_used = 1  # host-side bound on every row's p + 1 (p = 0 now)
        self.g_k = torch.zeros(g.n_layers, B, g.n_kv_heads, self.p_cap + 1, g.head_dim, dtype=dt, device=dev)
        self.g_v = torch.zeros_like(self.g_k)
        self.g_doc = torch.zeros(B, self.p_cap + 1, dtype=torch.long, device=dev)
        n_dec_cross = len(m.local_decoder.cross_attn_layers)
        dh = dec.dim // dec.cross_attn_n_heads
        # keys and values in one tensor, so that `_commit` keeps a patch step's in one kernel
        self.dec_xkv = torch.zeros(2, n_dec_cross, B, dec.cross_attn_n_kv_heads, K, dh, dtype=dt, device=dev)
        self.dec_xk, self.dec_xv = self.dec_xkv[0], self.dec_xkv[1]
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        self.n = torch.zeros((), dtype=torch.long, device=dev)
        self.hist = torch.zeros(B, max(c.hash_sizes, default=1) - 1, dtype=torch.long, device=dev)
        self.doc = zeros.clone()  # document of the current byte
        # the position where it starts, for the rings' bounds (RING_BOUNDS), where a ring has them
        bounded = any(r is not None and r.bounded for r in (self.ent, self.enc, self.dec))
        self.doc_start = zeros.clone() if bounded else None
        self.h_prev = torch.zeros(B, dtype=torch.float32, device=dev)
        self.like_prev = torch.zeros(B, dtype=torch.bool, device=dev)
        self.open_len, self.open_start, self.p, self.pdoc = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        # the global slot of the first patch of the open patch's document (GLOBAL_BOUNDS' alone)
        self.doc_first = zeros.clone() if self._global_bounds else None
        self.open_eos = torch.zeros(B, dtype=torch.bool, device=dev)
        self.keys = torch.tensor(keys, dtype=torch.long, device=dev)
        self.capacity = capacity
        self._make_rope_tables(capacity)
        self.graphs = None
        self.h = torch.zeros(B, 1, enc.dim, dtype=dt, device=dev)  # encoder output of byte n
        self.close = torch.zeros(B, dtype=torch.bool, device=dev)
        self.any_close = torch.zeros((), dtype=torch.bool, device=dev)  # the branch (`_run_flag`)
        self.x = torch.zeros(B, dtype=torch.long, device=dev)  # byte n (input of the step)
        # every row's bytes by position (prompt, then generated; generate_ids reads them back) and
        # prompt lengths: the feed step takes byte n from here or from `next` (`_run_feed`)
        self.buf = torch.zeros(B, capacity + 1, dtype=torch.long, device=dev)
        self.lens = torch.zeros(B, dtype=torch.long, device=dev)
        self._pending: tuple[str, ...] = ()  # step functions of the last byte not yet run (`_next_byte`)
        self._dec_prep = None  # the decoder's RoPE, slot and mask for byte n, made ahead (`_back_prep`)
        self.next = torch.zeros(B, dtype=torch.long, device=dev)  # sampled byte n+1
        self.logits = torch.zeros(B, c.vocab_size, dtype=torch.float32, device=dev)
        self.H = torch.zeros(B, dtype=torch.float32, device=dev)  # entropy of byte n+1
        # speculating pays where the entropy model can run beside the decoder: on CUDA, uncompiled
        spec = self.speculate
        if spec is None:
            spec = dev.type == "cuda" and not self.compiled and self.ent is not None
        self.speculating = spec and B < PATCH_EVERY_BYTE_ROWS
        self.overlapping = self.overlap and B >= PATCH_EVERY_BYTE_ROWS
        # the entropy model's stream beside the decoder's or the global step's (not under compile,
        # which traces one)
        side = (self.speculating or self.overlapping) and self.ent is not None and dev.type == "cuda" \
            and not self.compiled
        self._green = None  # the green context of the entropy model's stream (ENTROPY_SMS)
        if side and self.overlapping and ENTROPY_SMS is not None:
            # made once a Generator and SM count (a context costs more than a stream)
            cached = getattr(self, "_green_cache", None)
            if cached is None or cached[0] != (dev, ENTROPY_SMS):
                self._green_cache = cached = ((dev, ENTROPY_SMS), *_green_stream(dev, ENTROPY_SMS))
            _, self._green, self._side = cached
        else:
            self._side = torch.cuda.Stream(dev) if side else None
        # the captured chain on a stream of the highest priority, the entropy model's at the
        # default (the lowest): where both have blocks waiting, the chain's go first
        self._capture_stream = torch.cuda.Stream(dev, priority=-100) if side and STREAM_PRIORITY else None
        self._side_pending = False  # work on the second stream that `_run_back` joins (SIDE_COUNTS)
        if self.native:  # the C steps over this state's addresses
            self._native.bind()

    # -- one byte ----------------------------------------------------------------------------------

    def _rope_at(self, pos: torch.Tensor, stack_cfg, form: bool = True):
        """RoPE at `pos` ([1, 1] shared, [B, 1] a row's own) -> (cos, sin, R), gathered from the
        tables made with the state (`_make_rope_tables`): one indexing kernel each, where
        computing them took about ten small kernels a stack and step (on a CPU, tiny preset:
        4.2 -> 3.7 ms a byte). cos, sin: apply_rope's tables. R (with `form`): the form
        `_block_step` takes: with the kernels the (cos, sin) halves, else the rotation
        matrix of one shared position (None unfused); where the steps read only R (the kernels,
        the fused steps with a table of matrices), cos and sin are None."""
        t = self._rope_tables[(stack_cfg.head_dim, stack_cfg.rope_theta)]
        if self.kernels and form:
            cs = t["halves"][pos.reshape(-1)]  # B|1, 2, H/2
            return None, None, (cs[0, 0], cs[0, 1]) if cs.shape[0] == 1 else (cs[:, 0], cs[:, 1])
        if form and self.fused is not None and "R" in t and pos.numel() == 1:  # the fused steps read R only
            return None, None, t["R"][pos.reshape(-1)][0]
        cos, sin = t["cos"][pos], t["sin"][pos]  # B|1, 1, H/2, 1 and .., 2: rope_cos_sin(pos)'s shapes
        if not form or self.fused is None:
            return cos, sin, None
        return cos, sin, _rope_matrix(cos, sin)

    def _make_rope_tables(self, capacity: int) -> None:
        """Every stack's RoPE at every position a step can reach, made by `rope_cos_sin` at once
        (the same values): apply_rope's cos [T, H/2, 1] and sin [T, H/2, 2]; with the kernels
        their halves [T, 2 (cos, sin), H/2]; for the fused steps without them the rotation
        matrices [T, H, H] (`_rope_matrix`), where those take at most ROPE_MATRIX_BYTES."""
        self._rope_tables = {}
        c = self.cfg
        stacks = [(c.encoder, capacity + 1), (c.decoder, capacity + 1), (c.global_transformer, self.p_cap + 2)]
        if self.ent is not None:
            stacks.append((self.model.entropy_model.config, capacity + 1))
        for sc, size in sorted(stacks, key=lambda s: -s[1]):  # a key's longest first
            key = (sc.head_dim, sc.rope_theta)
            if key in self._rope_tables:
                continue
            pos = torch.arange(size, device=self.model.device).view(1, -1)
            cos, sin = rope_cos_sin(pos, sc.head_dim, sc.rope_theta)  # 1 T H/2 1, 1 T H/2 2
            t = {"cos": cos[0], "sin": sin[0]}
            if self.kernels:
                t["halves"] = torch.stack((cos[0, :, :, 0], sin[0, :, :, 1]), dim=1).contiguous()
            elif self.fused is not None and size * sc.head_dim ** 2 * 4 <= ROPE_MATRIX_BYTES:
                t["R"] = _rope_matrices(cos[0, :, :, 0], sin[0, :, :, 1])
            self._rope_tables[key] = t

    def _entropy_step(self, x_B: torch.Tensor) -> torch.Tensor:
        em = self.model.entropy_model
        ec = em.config
        slot, mask = self.ent.advance(self.n, self.doc, self.doc_start)
        cos, sin, R = self._rope_at(self.n.view(1, 1), ec)
        h = em.tok_embeddings(x_B[:, None])
        if self._products(R, x_B):  # FRONT_PRODUCTS
            from . import kernels

            x, ss = h.view(h.shape[0], -1), None
            for i, layer in enumerate(em.layers):
                x, ss = self._ring_block(layer, x, ss, self.ent, i, R, slot, mask)
            a, norm = _prologue(em.norm, x, ss)
            logits = kernels.product(a, em.output.weight, norm=norm).float()
        else:
            for i, layer in enumerate(em.layers):
                h = _block_step(layer, self.ent.k[i], self.ent.v[i], h, cos, sin, slot, mask, self.fused, R,
                                self._kernel_choice, self.n, own=True)
            logits = em.output(em.norm(h))[:, 0].float()
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def _products(self, R, x_B: torch.Tensor) -> bool:
        """Do the entropy model's and the encoder's steps run on bltkit.kernels' products
        (FRONT_PRODUCTS; the kernels' RoPE halves `R`, more rows than the block kernels take)?"""
        return self._front_products and isinstance(R, tuple) and x_B.shape[0] > KERNEL_MAX_ROWS

    def _ring_block(self, layer, x: torch.Tensor, ss: torch.Tensor | None, ring: _Ring, i: int, R: tuple,
                    slot: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i of a byte-level stack over its ring on the products (`_product_block`)."""
        kc, vc = ring.k[i], ring.v[i]
        return _product_block(layer, x, ss, self.fused, R, kc, vc, slot,
                              lambda q: _attend(q, kc, vc, mask, kernel=self._kernel_choice.attend, last=self.n))

    def _close_decision(self, x_B: torch.Tensor, H_B: torch.Tensor | None) -> torch.Tensor:
        """Does the patch holding byte n close after it (= does n+1 start a patch)? spec §13.4."""
        pc, n = self.cfg.patcher, self.n
        if pc.mode == "entropy":
            if pc.monotonicity:
                close = (n == 1) | ((n >= 2) & (H_B - self.h_prev > pc.threshold))
            elif pc.threshold_add is not None:
                close = (n == 1) | ((n >= 3) & (H_B > pc.threshold) & (H_B - self.h_prev > pc.threshold_add))
            else:
                close = (n >= 1) & (H_B > pc.threshold)
        elif pc.mode == "space":
            like = _space_like(x_B)
            close = (n >= 1) & ((x_B < OFFSET) | (like & ~self.like_prev))
            self.like_prev.copy_(like)
        elif pc.mode == "static":
            close = (n % int(pc.patch_size) == 0).expand_as(x_B)
        else:
            close = torch.ones_like(x_B, dtype=torch.bool)
        close = close | (n == 0)
        if pc.doc_boundaries:
            close = close | (x_B == BOS_ID) | (x_B == EOS_ID)
        if pc.max_patch_length is not None:
            close = close | (self.open_len + 1 >= pc.max_patch_length)
        return close

    def _front(self, x_B: torch.Tensor) -> torch.Tensor:
        """Entropy, hash embedding, encoder and boundary decision for byte n. Returns `close`."""
        H = self._entropy_step(x_B) if self.ent is not None else None
        self._encode(x_B)
        return self._decide(x_B, H)

    def _encode(self, x_B: torch.Tensor) -> None:
        """Hash embedding and encoder for byte n: self.h, the encoder's caches and the open patch's
        pooling (it reads nothing the entropy model or the boundary decision writes)."""
        m, c = self.model, self.cfg
        if self._hash_coef is not None:  # HASH_EMBED
            from . import kernels

            # into self.h, the encoder's output of byte n (read by the decoder after this step's
            # encoder; the last byte's decoder is done): where the layers run in place (cuBLAS's
            # products), the copy of their output into it is saved
            e = self.h
            kernels.hash_embed(x_B, self.hist, m.local_encoder.tok_embeddings.weight,
                               m.encoder_hash_tok_embedding.weight, self._hash_coef, c.hash_vocab, out=e[:, 0])
        else:
            e = m.embed(x_B[:, None], history_BH=self.hist)
        slot, mask = self.enc.advance(self.n, self.doc, self.doc_start)
        cos, sin, R = self._rope_at(self.n.view(1, 1), c.encoder)
        enc = m.local_encoder
        h = e
        pooled_yet = False
        at = self.n.view(1)
        products, ss = self._products(R, x_B), None  # FRONT_PRODUCTS
        for i, layer in enumerate(enc.layers):
            if products:
                x, ss = self._ring_block(layer, h.view(h.shape[0], -1), ss, self.enc, i, R, slot, mask)
                h = x.view_as(h)
            else:
                h = _block_step(layer, self.enc.k[i], self.enc.v[i], h, cos, sin, slot, mask, self.fused, R,
                                self._kernel_choice, self.n, own=True)
            j = enc.cross_index(i)
            if j is not None:
                cross = enc.cross_attn_layers[j]
                if self.enc_cross_kv is not None:  # wk|wv as one product, both written in one copy
                    B, Nkv, H = h.shape[0], cross.n_kv_heads, cross.head_dim
                    y = F.linear(cross.cross_attn_norm_kv(h), self.enc_cross_kv.w[j])  # B 1 2*Nkv*H
                    self.enc_xkv[:, j].index_copy_(3, at, y.view(B, 2, Nkv, 1, H).transpose(0, 1))
                else:
                    k, v = cross.kv(h)  # B Nkv 1 H
                    self.enc_xk[j].index_copy_(2, at, k)
                    self.enc_xv[j].index_copy_(2, at, v)
                if not pooled_yet:  # units are pooled once, from the first cross layer's input
                    torch.maximum(self.runmax, h[:, 0], out=self.runmax)
                    pooled_yet = True
        if h is not self.h:  # (the embedding kernel wrote e into self.h, and the layers ran in place)
            self.h.copy_(h)

    def _decide(self, x_B: torch.Tensor, H_B: torch.Tensor | None) -> torch.Tensor:
        """Does a patch close after byte n (H_B: the entropy of byte n+1)? Then byte n joins the
        open patch's counts and the hash history. Returns `close` (also in self.close)."""
        close = self._close_decision(x_B, H_B)  # reads open_len before byte n is counted
        if H_B is not None:
            self.h_prev.copy_(H_B)
        self.open_len.add_(1)
        self.open_eos.logical_or_(x_B == EOS_ID)
        if self.hist.shape[1]:
            self.hist.copy_(torch.cat([self.hist[:, 1:], x_B[:, None]], dim=1))
        self.close.copy_(close)
        return close

    def _patch_step(self, close: torch.Tensor, L: int | None = None) -> None:
        """Close the open patch of every row with `close`: encoder cross-attention, one global
        step at the row's next patch position, and the decoder's cross K/V (spec §13.4 step 4)."""
        self._commit(close, self._global_step(L))

    def _global_mask(self, L: int) -> torch.Tensor:
        """The global step's additive mask over the first L slots: a row sees its document's
        patches up to its own slot p (not the dummy slot p_cap)."""
        j_pos = torch.arange(L, device=self.p.device)
        return _additive(((j_pos[None] <= self.p[:, None]) & (j_pos[None] < self.p_cap)
                          & (self.g_doc[:, :L] == self.pdoc[:, None]))[:, None, None, :], self.g_k.dtype)

    def _global_step(self, L: int | None = None) -> torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]:
        """The patch step of every row as if its open patch closed after byte n: encoder
        cross-attention over the open patch, one global step at the row's patch position p (its K/V
        written at slot p), and the decoder's cross K/V of its output, returned for `_commit`.
        It reads nothing the entropy model or the boundary decision writes, so it can run before
        the boundary is known (Generator(overlap=...)). A row whose patch stays open wrote
        nothing that is read before its patch closes: slot p is rewritten then, and the
        decoder's cross K/V keep the last closed patch's (`_commit`)."""
        m, c = self.model, self.cfg
        B, K, enc = self.p.shape[0], c.cross_attn_k, m.local_encoder
        dev = self.p.device
        units = enc.split_units(self.runmax[:, None])  # B K De
        if not self._open_kernel:
            t = torch.arange(self.capacity, device=dev)
            in_patch = _DenseMask(((t[None] >= self.open_start[:, None]) & (t[None] <= self.n))[:, None, None, :])
        for i in range(len(enc.layers)):
            j = enc.cross_index(i)
            if j is None:
                continue
            layer = enc.cross_attn_layers[j]
            # units: this step's temporaries (split_units' product, then each addmm's), so the
            # residual product writes into them (no copy first)
            if self._open_kernel:  # the open patch's bytes only, not every cached byte under a mask
                units = _linear_add(units, self._open_patch_heads(layer, units, j), layer.wo.weight, beta=2.0,
                                    inplace=True)
            else:
                units = _cross_step(layer, units, self.enc_xk[j], self.enc_xv[j], in_patch, own=True)
        gt = m.global_transformer
        x = gt.project(units.reshape(B, 1, K * c.encoder.dim))
        idx = self.p  # every row's slot (p_cap, hidden by the mask, once a row has every patch)
        fg = self.fused_global  # made for the kernels; more rows run cuBLAS on the same copies
        cos, sin, kernel_rope = self._rope_at(self.p.view(B, 1), c.global_transformer, form=fg is not None)
        # (kept with GLOBAL_BOUNDS too: a later step past ATTEND_MAX_KEYS slots builds the mask)
        self.g_doc.scatter_(1, idx[:, None], self.pdoc[:, None])
        # attend the first L slots only: L bounds every row's p + 1 (see _global_slots)
        L = self.p_cap + 1 if L is None else L
        g_first = gmask = None
        if self._global_bounds and kernel_rope is not None and _uses_kernel(self._kernel_choice.attend, L):
            # the slots a row sees are its document's up to its own: [doc_first, p] (p_cap, where
            # a row has every patch, is the dummy slot), bounds for the attention kernel, no mask
            g_first, g_last = self.doc_first, torch.clamp(self.p, max=self.p_cap - 1)
        else:
            gmask, g_last = self._global_mask(L), self.p
        widx = idx.view(B, 1, 1, 1)
        xn = None  # the next layer's attention norm of x, where the last layer's w2 kernel made it
        x2, ss = x.view(B, -1), None  # with GLOBAL_PRODUCTS: the residual stream, its rows' sums of squares
        for i, layer in enumerate(gt.layers):
            att = layer.attention
            kc, vc = self.g_k[i], self.g_v[i]
            if kernel_rope is not None and B <= KERNEL_MAX_ROWS:  # the Triton block step
                x = _block_step_kernels(layer, kc, vc, x, idx, gmask, fg, kernel_rope, L, self._kernel_choice, g_last,
                                        g_first)
                continue
            if kernel_rope is not None and self._global_products:  # GLOBAL_PRODUCTS: Triton's products, each
                # norm in the next one; x2 the residual stream, ss its sums of squares
                x2, ss = _product_block(
                    layer, x2, ss, fg, kernel_rope, kc, vc, idx,
                    lambda q, kc=kc, vc=vc: _attend(q, kc, vc, gmask, L, kernel=self._kernel_choice.attend,
                                                    last=g_last, first=g_first))
                if i + 1 == len(gt.layers):
                    x = x2.view(B, 1, -1)
                continue
            if kernel_rope is not None:  # cuBLAS's products; RoPE, the cache writes and the attention in
                # one kernel, and each residual add with the norm after it in another
                y = F.linear(layer.attention_norm(x) if xn is None else xn, fg.qkv[id(layer)])
                out = _rope_attend(y.view(B, -1), kernel_rope, att, kc, vc, idx, gmask, self._kernel_choice, L,
                                   last=g_last, first=g_first)
                hn = _residual_norm(x, out, att.wo.weight, layer.ffn_norm)  # x: this step's temporary
                gated = _swiglu(layer.feed_forward, hn, fg.w13[id(layer)], kernel=True)
                if i + 1 < len(gt.layers):
                    xn = _residual_norm(x, gated, layer.feed_forward.w2.weight, gt.layers[i + 1].attention_norm)
                else:
                    x = _linear_add(x, gated, layer.feed_forward.w2.weight, inplace=True)
                continue
            q, k, v = att.qkv(layer.attention_norm(x), cos, sin)
            kc.scatter_(2, widx.expand(B, att.n_kv_heads, 1, att.head_dim), k.transpose(1, 2))
            vc.scatter_(2, widx.expand(B, att.n_kv_heads, 1, att.head_dim), v.transpose(1, 2))
            out = _attend(q[:, 0], kc, vc, gmask, L, kernel=self._kernel_choice.attend, last=self.p)
            x = _linear_add(x, out, att.wo.weight, inplace=True)  # x: this step's temporary
            gated = _swiglu(layer.feed_forward, layer.ffn_norm(x))
            x = _linear_add(x, gated, layer.feed_forward.w2.weight, inplace=True)
        dunits = m.local_decoder.split_units(x)  # B K Dd
        if self.cross_kv is not None:  # every layer's at once: [2, layers, B, Nkv, K, H]
            return self.cross_kv(dunits)
        return [layer.kv(dunits) for layer in m.local_decoder.cross_attn_layers]

    def _open_patch_heads(self, layer, units_BKD: torch.Tensor, j: int) -> torch.Tensor:
        """The encoder's cross-attention of the patch units over the open patch's cached bytes
        (slots open_start..n of each row) before `wo` -> [B, K, N*H], with kernels.attend bounded
        to those slots: SDPA reads every cached byte under a mask (265 µs a patch step at 64 rows
        after 2,048-byte prompts on an H200, seventeenth session). Head h of unit u is the kernel's
        query head u*N + h, the q product's own layout, and the kernel's `period` N maps it to h's
        key/value head: no copy of q into head-major order, nor of the output back (two kernels
        each patch step, twenty-fourth session)."""
        from . import kernels

        B, K, _ = units_BKD.shape
        N, H = layer.n_heads, layer.head_dim
        q = layer.wq(layer.cross_attn_norm_q(units_BKD)).view(B, K * N, H)
        out = kernels.attend(q, self.enc_xk[j], self.enc_xv[j], None, splits=1, last=self.n, first=self.open_start,
                             period=N)
        return out.view(B, K, N * H)

    def _commit(self, close: torch.Tensor, dec_kv: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The patch step's effects on the rows with `close` (`_global_step` ran for every row):
        the decoder's cross K/V, the patch counts, the open patch's start, length and pooling."""
        self._commit_kv(close, dec_kv)
        self._commit_counts(close)

    def _commit_kv(self, close: torch.Tensor, dec_kv: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The decoder's cross K/V of the rows with `close`: what the decoder reads of a patch step."""
        if isinstance(dec_kv, torch.Tensor) and self._commit_kernel:  # the closed rows copied (COMMIT_KERNEL)
            from . import kernels

            kernels.commit_rows(dec_kv, self.dec_xkv, close)
        elif isinstance(dec_kv, torch.Tensor):  # stacked (`_CrossKV`): one kernel for every layer
            torch.where(close.view(1, 1, -1, 1, 1, 1), dec_kv, self.dec_xkv, out=self.dec_xkv)
        else:
            sel = close.view(-1, 1, 1, 1)
            for j, (k, v) in enumerate(dec_kv):
                self.dec_xk[j].copy_(torch.where(sel, k, self.dec_xk[j]))
                self.dec_xv[j].copy_(torch.where(sel, v, self.dec_xv[j]))

    def _commit_counts(self, close: torch.Tensor) -> None:
        """The patch counts and the open patch's start, length and pooling of the rows with
        `close`: what the next byte's front and patch step read (the decoder and the byte's
        advance read none of it; this reads n, which the advance writes)."""
        # the closed patch's successor starts at n+1
        self.p.add_(close.long())
        if self.doc_first is not None:  # a patch that held EOS closes: a document starts at the new p
            torch.where(close & self.open_eos, self.p, self.doc_first, out=self.doc_first)
        self.pdoc.add_((close & self.open_eos).long())
        self.open_eos.logical_and_(~close)
        self.open_start.copy_(torch.where(close, self.n + 1, self.open_start))
        self.open_len.masked_fill_(close, 0)
        self.runmax.masked_fill_(close[:, None], float("-inf"))

    def _back_prep(self) -> tuple[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """The decoder's RoPE for byte n and its ring slot and mask (they read n and the document
        alone, so `_run_front_patch` makes them beside the global step)."""
        return self._rope_at(self.n.view(1, 1), self.cfg.decoder), self.dec.advance(self.n, self.doc, self.doc_start)

    def _back(self) -> torch.Tensor:
        """Decoder for byte n (cross-attending the latest closed patch) -> logits [B, V] in the model's
        dtype (`_run_decode` casts them to fp32 as it copies them into the state)."""
        dec = self.model.local_decoder
        prep, self._dec_prep = self._dec_prep, None
        (cos, sin, R), (slot, mask) = prep if prep is not None else self._back_prep()
        z = self.h
        kern = isinstance(R, tuple) and self._cross_kernel and z.shape[0] <= KERNEL_MAX_ROWS  # block kernels run
        if isinstance(R, tuple) and self._decoder_products and not kern:  # DECODER_PRODUCTS
            return self._back_products(z, R, slot, mask)
        if isinstance(R, tuple) and self._decoder_norms and not kern:  # DECODER_NORMS
            return self._back_fused(z, cos, sin, R, slot, mask)
        for i, layer in enumerate(dec.layers):
            j = dec.cross_index(i)
            if j is not None:
                z = _cross_step(dec.cross_attn_layers[j], z, self.dec_xk[j], self.dec_xv[j], None, kernel=kern,
                                linear_kernel=kern and self._kernel_choice.linear,
                                attend_kernel=self._cross_kernel and not kern, own=z is not self.h,
                                q_kernel=self._cross_q)
            z = _block_step(layer, self.dec.k[i], self.dec.v[i], z, cos, sin, slot, mask, self.fused, R,
                            self._kernel_choice, self.n, own=z is not self.h)
        return dec.output(dec.norm(z))[:, 0]  # (dec.head's, in the model's dtype: `_run_decode` casts)

    def _back_fused(self, z, cos, sin, R, slot, mask) -> torch.Tensor:
        """`_back` past the block kernels' rows with the kernels: each residual product (the cross
        steps' wo, the blocks' w2) runs with its add and the next step's first norm as
        bltkit.kernels.residual_norm (an fp32 product and one kernel, where addmm and the norm
        took two or three), the final norm's too; the first norm as the model runs it."""
        dec = self.model.local_decoder

        def first_norm(i: int):  # the norm layer i's steps apply first (past the last layer: the final norm)
            if i == len(dec.layers):
                return dec.norm
            j = dec.cross_index(i)
            return dec.layers[i].attention_norm if j is None else dec.cross_attn_layers[j].cross_attn_norm_q

        xn = first_norm(0)(z)
        for i, layer in enumerate(dec.layers):
            j = dec.cross_index(i)
            if j is not None:
                z, xn = _cross_step(dec.cross_attn_layers[j], z, self.dec_xk[j], self.dec_xv[j], None,
                                    attend_kernel=True, own=z is not self.h, normed=xn, norm_out=layer.attention_norm,
                                    q_kernel=self._cross_q)
            z, xn = _block_step(layer, self.dec.k[i], self.dec.v[i], z, cos, sin, slot, mask, self.fused, R,
                                self._kernel_choice, self.n, own=z is not self.h, normed=xn, norm_out=first_norm(i + 1))
        return dec.output(xn)[:, 0]

    def _back_products(self, z: torch.Tensor, R: tuple, slot: torch.Tensor, mask) -> torch.Tensor:
        """`_back` past the block kernels' rows on bltkit.kernels' products (DECODER_PRODUCTS):
        the residual stream x stays unnormed, each residual product writes its rows' sums of
        squares `ss`, and the next product (or cross_attend) norms x on the way in; the first
        norm as the model runs it. Per layer: cross_attend, its wo with the doubled residual,
        then `_product_block`."""
        from . import kernels

        dec = self.model.local_decoder
        x, ss = z.reshape(z.shape[0], -1), None
        for i, layer in enumerate(dec.layers):
            j = dec.cross_index(i)
            if j is not None:
                cl = dec.cross_attn_layers[j]
                a, norm = _prologue(cl.cross_attn_norm_q, x, ss)
                heads = kernels.cross_attend(a, cl.wq.weight, self.dec_xk[j], self.dec_xv[j], norm=norm)
                x, ss = kernels.product_residual(heads, cl.wo.weight, x, beta=2.0)
            x, ss = self._ring_block(layer, x, ss, self.dec, i, R, slot, mask)
        a, norm = _prologue(dec.norm, x, ss)
        return kernels.product(a, dec.output.weight, norm=norm)

    @torch.no_grad()
    def _prefill(self, tokens_BT: torch.Tensor) -> None:
        """Read positions 0..N-1 of every row with one full forward and fill every cache, leaving
        the state exactly as N calls of `step` would (tests compare both paths)."""
        m, c = self.model, self.cfg
        B, N = tokens_BT.shape
        dev = tokens_BT.device
        ent_kv: list = []
        H = None
        if self.ent is not None:
            H = m.entropy_model.entropies(tokens_BT, impl=m.attn_impl, doc_masks=c.doc_masks, kv_out=ent_kv)
        starts = m.patch_starts(tokens_BT, H)  # B, N+1
        lay = m.layout(starts_to_lengths(starts), N, B)
        cap: dict = {}
        logits = m.forward_layout(tokens_BT, lay, capture=cap)
        pos = torch.arange(N, device=dev)
        doc = (torch.cumsum((tokens_BT == EOS_ID).long(), 1) - (tokens_BT == EOS_ID).long())  # B N
        for ring, kvs in ((self.ent, ent_kv), (self.enc, cap["enc_kv"]), (self.dec, cap["dec_kv"])):
            if ring is None:
                continue
            R = ring.pos.shape[0]
            keep = pos[max(0, N - R):]
            slots = keep % R
            ring.pos.index_copy_(0, slots, keep)
            ring.doc.index_copy_(1, slots, doc[:, keep].to(torch.int32))
            for i, (k, v) in enumerate(kvs):  # k, v: B N Nkv H
                ring.k[i].index_copy_(2, slots, k[:, keep].transpose(1, 2).to(ring.k.dtype))
                ring.v[i].index_copy_(2, slots, v[:, keep].transpose(1, 2).to(ring.v.dtype))
        enc = m.local_encoder
        at = torch.arange(N + 1, device=dev)
        open_start = torch.where(starts, at, 0).max(1).values  # the last start <= N
        in_open = pos[None] >= open_start[:, None]  # B N
        pooled = False
        for i, h in enumerate(cap["enc_h"]):
            j = enc.cross_index(i)
            if j is None:
                continue
            k, v = enc.cross_attn_layers[j].kv(h)  # B Nkv N H
            self.enc_xk[j][:, :, :N] = k
            self.enc_xv[j][:, :, :N] = v
            if not pooled:
                self.runmax.copy_(h.masked_fill(~in_open[..., None], float("-inf")).amax(1))
                pooled = True
        p = starts.sum(1) - 1  # closed patches
        P = lay.n_patches
        for i, (k, v) in enumerate(cap["g_kv"]):  # B P Nkv H; entries >= p are rewritten when they close
            self.g_k[i][:, :, :P] = k.transpose(1, 2)
            self.g_v[i][:, :, :P] = v.transpose(1, 2)
        pdoc_all = m.patch_documents(tokens_BT, lay)  # B P
        has_eos = torch.zeros(B, P, dtype=torch.long, device=dev).scatter_reduce_(
            1, lay.pid_BT, (tokens_BT == EOS_ID).long(), reduce="amax")
        self.g_doc[:, :P] = pdoc_all
        closed = torch.arange(P, device=dev)[None] < p[:, None]
        self.pdoc.copy_((has_eos * closed).sum(1))
        if self.doc_first is not None:  # documents run in slot order
            self.doc_first.copy_(((pdoc_all < self.pdoc[:, None]) & closed).sum(1))
        last = cap["g"].gather(1, (p - 1).view(B, 1, 1).expand(B, 1, cap["g"].shape[-1]))  # B 1 Dg
        dunits = m.local_decoder.split_units(last)
        for j, layer in enumerate(m.local_decoder.cross_attn_layers):
            k, v = layer.kv(dunits)
            self.dec_xk[j].copy_(k)
            self.dec_xv[j].copy_(v)
        self.p.copy_(p)
        self.g_used = P + 1  # p <= P
        self.open_start.copy_(open_start)
        self.open_len.copy_(N - open_start)
        self.open_eos.copy_(((tokens_BT == EOS_ID) & in_open).any(1))
        self.doc.copy_((tokens_BT == EOS_ID).long().sum(1))
        if self.doc_start is not None:  # one past the prompt's last EOS, or 0
            self.doc_start.copy_(torch.where(tokens_BT == EOS_ID, pos + 1, 0).amax(1))
        if self.hist.shape[1]:
            W = self.hist.shape[1]
            padded = torch.cat([torch.zeros(B, W, dtype=torch.long, device=dev), tokens_BT.long()], 1)
            self.hist.copy_(padded[:, -W:])
        if H is not None:
            self.h_prev.copy_(H[:, -1])
        self.like_prev.copy_(_space_like(tokens_BT[:, -1]))
        self.close.copy_(starts[:, N])
        self.x.copy_(tokens_BT[:, -1])
        self.logits.copy_(logits[:, -1])
        self.next.copy_(sample(logits[:, -1], self.keys, N - 1, *self.sampling))
        self.n.fill_(N)

    def _run_front(self) -> None:
        self._front(self.x)

    def _run_patch(self, L: int | None = None) -> None:
        self._patch_step(self.close, L)

    def _global_slots(self) -> int:
        """Global-cache slots the next patch step reads: the host's bound on every row's p + 1,
        rounded up to a multiple of `global_bucket` (one CUDA graph per bucket), so a step costs
        what the patches so far cost, not the whole capacity. Compiled steps read all slots
        (one shape, one compile)."""
        full = self.p_cap + 1
        if self.compiled:
            return full
        G = self.global_bucket
        return min(full, -(-self.g_used // G) * G)

    def _run_back(self) -> None:
        self._run_decode()
        self._join_side()
        self._run_advance()

    def _join_side(self) -> None:
        """The current stream waits for `_run_front_patch`'s counts on the second stream
        (SIDE_COUNTS), if they wait to be joined: after the decoder, before the advance (in the
        same CUDA graph), and after `_prepare_graphs`' warm-up calls."""
        if self._side_pending:
            torch.cuda.current_stream().wait_stream(self._side)
            self._side_pending = False

    def _run_decode(self) -> None:
        """The decoder for byte n: logits and the sampled byte n+1 (a function of the row's key and
        n alone, so running it again at the same n gives the same byte)."""
        if self._greedy_kernel and GREEDY_KERNEL and self.sampling[0] == 0.0:  # the cast and argmax in one
            from . import kernels

            kernels.greedy(self._back(), self.logits, self.next)
            return
        self.logits.copy_(self._back())  # the cast to fp32 in the copy (no kernel of its own)
        sample(self.logits, self.keys, self.n, *self.sampling, out=self.next)

    def _run_advance(self) -> None:
        if self._step_kernels:  # STEP_KERNELS
            from . import kernels

            kernels.advance(self.x, self.doc, self.n, self.doc_start, EOS_ID)
            return
        eos = self.x == EOS_ID
        self.doc.add_(eos)  # (a bool added to int64 in place: no cast kernel)
        self.n.add_(1)
        if self.doc_start is not None:  # the byte after an EOS starts a document
            torch.where(eos, self.n, self.doc_start, out=self.doc_start)

    def _run_feed(self) -> None:
        """Byte n into the step's input: the prompt's byte while a row still reads its prompt,
        else the byte sampled for position n, written into the row's bytes (`buf`) too. On the
        device, so that no host work stands between a byte's graphs (`_next_byte`)."""
        if self._step_kernels:  # STEP_KERNELS
            from . import kernels

            kernels.feed(self.n, self.lens, self.buf, self.next, self.x)
            return
        at = self.n.view(1)
        torch.where(self.n < self.lens, self.buf.index_select(1, at)[:, 0], self.next, out=self.x)
        self.buf.index_copy_(1, at, self.x[:, None])

    def _run_flag(self) -> None:
        """Does some row close a patch after byte n (`any_close`: the branch of `_next_byte`)?"""
        torch.any(self.close, dim=0, out=self.any_close)

    def _run_speculative(self) -> None:
        """Byte n's front and decoder step, the decoder run as if no patch closes after byte n
        (step() decodes again, after the patch step, when one does). The decoder then need not
        wait for the entropy model, whose output only decides the boundary: on CUDA the entropy
        model runs on a second stream beside the encoder and the decoder (in the CUDA graph too:
        a fork and a join), each a chain of small kernels that leaves most of the GPU idle."""
        x = self.x
        H, _ = self._beside_entropy(x, lambda: (self._encode(x), self._run_decode()))
        self._decide(x, H)

    def _beside_entropy(self, x: torch.Tensor, main):
        """The entropy model for byte n (into self.H) and `main()` at once: on CUDA the entropy
        model on the second stream, forked before `main` and joined after it (inside a CUDA graph
        too). Returns (self.H, or None without an entropy model; what `main` returned)."""
        side = self._side
        if self.ent is not None:
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.H.copy_(self._entropy_step(x))
            else:
                self.H.copy_(self._entropy_step(x))
        out = main()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        return (self.H if self.ent is not None else None), out

    def _run_front_patch(self, L: int | None = None) -> None:
        """Byte n's front and patch step for batches whose patch step runs every byte: the global
        step for every row (`_global_step`) beside the entropy model (on CUDA a second stream, in
        the CUDA graph a fork and a join), then the boundary decision, and the global step's
        results kept for the rows whose patch closes (`_commit`). The global step, the long chain
        of a byte, no longer waits for the entropy model's."""
        x, side = self.x, self._side
        if side is None:
            H, dec_kv = self._beside_entropy(x, lambda: (self._encode(x), self._global_step(L))[1])
            self._commit(self._decide(x, H), dec_kv)
            return
        # the boundary decision goes beside the global step too, on the entropy model's stream
        # once the encoder has read the hash history that it updates (~20 small kernels off the
        # step's chain); the global step reads nothing the decision writes. The encoder is
        # captured before the entropy model: in a kernel trace at 64 rows (H200) the graph ran
        # the entropy model's first ~10 small kernels ahead of the encoder's, ~28 µs on the chain
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        self._encode(x)
        with torch.cuda.stream(side):
            self.H.copy_(self._entropy_step(x))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._decide(x, self.H)
            self._dec_prep = self._back_prep()  # and the decoder's slot and RoPE, for `_back`
        dec_kv = self._global_step(L)
        main.wait_stream(side)
        if not SIDE_COUNTS:
            self._commit(self.close, dec_kv)
            return
        self._commit_kv(self.close, dec_kv)
        # the counts (14 small kernels) beside the decoder, after the global step that reads
        # them (p, the open patch's start, the pooling); joined before the byte's advance writes n
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._commit_counts(self.close)
        self._side_pending = True

    def _segments(self) -> tuple[tuple[str, ...], tuple[str, ...] | None, tuple[str, ...]]:
        """A byte's step functions as (before, branch, after): `branch` runs only when some row
        closes a patch after byte n (None: no branch, every step in `before`). Speculating, the
        decoder has run as if no patch closed and runs again after a patch step; overlapping, the
        global step runs for every row beside the entropy model; otherwise the patch step runs
        between the front and the decoder, for batches of PATCH_EVERY_BYTE_ROWS or more at every
        byte (where that is nearly every byte anyway). Every byte ends with the feed of the next
        (`_run_feed`); "back" is "decode" then "advance"."""
        if self.overlapping:
            return ("front_patch", "back", "feed"), None, ()
        if self.speculating:
            return ("speculative", "flag"), ("patch", "decode"), ("advance", "feed")
        if self.x.shape[0] >= PATCH_EVERY_BYTE_ROWS:
            return ("front", "patch", "back", "feed"), None, ()
        return ("front", "flag"), ("patch",), ("back", "feed")

    def _launches(self) -> list[tuple[str, ...]]:
        """The step-function sequences `_next_byte` and `_flush` run as one CUDA graph each: a
        byte's steps before its branch (alone, or after the last byte's steps after the branch),
        the branch, and the steps after the branch alone."""
        before, branch, after = self._segments()
        out = [before]
        if branch is not None:
            out += [after + before, branch, after]
        return out

    def _launch(self, names: tuple[str, ...], L: int | None = None) -> None:
        """Run step functions in order: their CUDA graph (for L global-cache slots, where one of
        them takes L), or the calls."""
        if self.graphs is not None:
            graph = self.graphs[names]
            (graph[L] if isinstance(graph, dict) else graph).replay()
        else:
            self._calls(names, L)

    def _call(self, name: str, L: int | None = None) -> None:
        self._fns[name](L) if name in _SLOT_STEPS else self._fns[name]()

    def _calls(self, names: tuple[str, ...], L: int | None = None) -> None:
        """Call step functions in order (L to those that take it)."""
        for name in names:
            self._call(name, L)

    def _next_byte(self, L: int) -> None:
        """Byte n (in self.x, fed by the last byte) through every step. The steps after the
        branch wait for the next byte's launch: they and the next byte's steps before its branch
        are one CUDA graph, so that once the host has read the branch (a sync) it launches one
        graph and the GPU waits for nothing else (`_flush` runs them alone)."""
        if self.graphs is not None and "byte" in self.graphs:
            self._byte_graph(L).replay()
            return
        before, branch, after = self._segments()
        self._launch(self._pending + before, L)
        self._pending = after
        if branch is not None:
            self._host_branch(lambda: self._launch(branch, L))

    def _flush(self) -> None:
        """Run the last byte's steps after its branch, if they wait (`_next_byte`)."""
        if self._pending:
            self._launch(self._pending)
            self._pending = ()

    def _byte(self, L: int, branch) -> None:
        """A byte's step functions in order (`_segments`), called; `branch(body)` runs `body` only
        if some row closes a patch after byte n."""
        before, cond, after = self._segments()
        self._calls(before, L)
        if cond is not None:
            branch(lambda: self._calls(cond, L))
        self._calls(after, L)

    def _host_branch(self, body) -> None:
        """A byte's branch decided by the host (a host sync)."""
        if bool(self.any_close):
            body()

    def _graph_branch(self, body) -> None:
        """`_byte`'s branch inside the CUDA graph being captured: `body` goes into a conditional
        node that the GPU enters only when some row closes a patch (no host sync)."""
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        graph.begin_capture_to_if_node(self.any_close)
        try:
            body()
        finally:
            graph.end_capture_to_conditional_node()

    @staticmethod
    @contextlib.contextmanager
    def _collected():
        """The garbage collector run, then off, for CUDA graph captures.

        No garbage collection inside a capture: a collection there may free an unreachable
        object that holds CUDA resources (an earlier Generator's graphs and their memory pool,
        compiled kernels), and freeing them is not allowed while a stream captures, which
        invalidates the capture (cudaErrorStreamCaptureInvalidated: once in the first GPU test
        run on two fresh H200s, after test_kernels.py had made many Generators; PyTorch's
        torch.cuda.graph no longer collects before capturing by default). So collect first,
        then capture with the collector off."""
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if enabled:
                gc.enable()

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._capture_stream):  # None: PyTorch's capture stream
            fn()
        return graph

    def _byte_graph(self, L: int) -> torch.cuda.CUDAGraph:
        """The byte graph for L global-cache slots, captured in _prepare_graphs, or when first
        asked for if the steps go past what it was told (capturing runs nothing, so the state
        stays as it is; the steps were warmed up in _prepare_graphs)."""
        graphs = self.graphs["byte"]
        if L not in graphs:
            with self._collected():
                graphs[L] = self._capture_byte(L)
        return graphs[L]

    def _capture_byte(self, L: int) -> torch.cuda.CUDAGraph:
        try:
            return self._capture(lambda: self._byte(L, self._graph_branch))
        except RuntimeError as e:
            raise RuntimeError(f"capturing a byte's steps as one CUDA graph with a conditional node failed ({e}); "
                               "Generator(model, byte_graph=False) captures one graph per launch "
                               "instead") from e

    def _buckets(self, steps: int | None = None) -> list[int]:
        """The global-cache slot counts L (`_global_slots`) of the next `steps` steps (None: every
        bucket up to capacity): g_used grows by one a step."""
        full, G = self.p_cap + 1, self.global_bucket
        if self.compiled:
            return [full]
        last = full if steps is None else min(full, -(-(self.g_used + steps) // G) * G)
        return sorted({min(full, L) for L in range(self._global_slots(), last + 1, G)} | {min(full, last)})

    def _prepare_graphs(self, steps: int | None = None) -> None:
        """Capture the step functions as CUDA graphs (static buffers, no host sync inside), for
        every bucket of global-cache slots the next `steps` steps can reach (all ahead: None)."""
        self.graphs = None
        if not self.use_cuda_graphs:
            return
        snapshot = {k: v.clone() for k, v in self._state_tensors().items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        slots = self._buckets(steps)
        launches = self._launches()
        with torch.cuda.stream(stream):  # warm-up (compilation, allocator, library handles)
            for name in sorted({name for launch in launches for name in launch}):
                for L in slots if name in _SLOT_STEPS else [None]:
                    self._call(name, L)
            self._join_side()  # (the warm-up calls each step function alone: front_patch's counts wait)
        torch.cuda.current_stream().wait_stream(stream)

        def capture(launch, L=None):
            return self._capture(lambda: self._calls(launch, L))

        with self._collected():
            if self.byte_graph:
                graphs = {"byte": {L: self._capture_byte(L) for L in slots}}
            else:
                graphs = {launch: {L: capture(launch, L) for L in slots} if _SLOT_STEPS.intersection(launch)
                          else capture(launch) for launch in launches}
        for k, v in self._state_tensors().items():  # undo the warm-up's writes
            v.copy_(snapshot[k])
        self.graphs = graphs

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        for name in ("ent", "enc", "dec"):
            ring = getattr(self, name)
            if ring is not None:
                out.update({f"{name}.{f}": getattr(ring, f) for f in ("k", "v", "pos", "doc")})
        return out

    @torch.no_grad()
    def step(self, x_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume byte n for every row; return (logits for position n [B, V], close [B]).

        The patch step runs only when some row closes a patch (or always for batches of
        PATCH_EVERY_BYTE_ROWS or more, where that is nearly every byte and skipping the check
        saves a host sync; overlapping, for every row beside the entropy model). Speculating, the
        decoder has run already, as if no patch closed, and runs again after a patch step (`_byte`).
        With the byte graph (`byte_graph`) the whole step is one CUDA graph replay, whose
        conditional node makes the check on the GPU.
        """
        self._flush()
        self.x.copy_(x_B)
        self._step()
        self._flush()
        return self.logits, self.close

    def _step(self) -> None:
        """Byte n, already fed, through `_next_byte`; the native steps take a whole byte in one
        call (`native.Steps.byte`: the same steps, without a Python call for each)."""
        if self.native and not self.speculating:  # what waits is none, or the back and feed steps
            self._native.byte(bool(self._pending))
            self._pending = ("back", "feed")
        else:
            self._next_byte(self._global_slots())
        self.g_used += 1  # a row's p grows by at most one a step

    # -- public API -----------------------------------------------------------------------------

    def _check_lengths(self, ids: list[list[int]], max_new_bytes: int) -> int:
        longest = max(len(p) for p in ids)
        limit = self.cfg.max_bytes
        if longest > limit:
            raise ValueError(f"prompt of {longest} bytes (BOS included) exceeds the model's limit of {limit} "
                             "bytes (config.max_bytes); shorten the prompt")
        if longest + max_new_bytes > limit:
            raise ValueError(f"prompt ({longest} bytes) + max_new_bytes ({max_new_bytes}) exceeds the model's "
                             f"limit of {limit} bytes; ask for at most {limit - longest} new bytes")
        for p in ids:
            if any(not 0 <= i < self.cfg.vocab_size for i in p):
                raise ValueError("prompt ids must lie in 0..259")
        return longest + max_new_bytes

    @torch.no_grad()
    def generate_ids(self, prompts, max_new_bytes: int, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                     stop_at_eos: bool = True, on_step=None) -> list[list[int]]:
        """New ids per prompt (prompt excluded; EOS and stop strings excluded)."""
        ids = _encode_prompts(prompts)
        if isinstance(max_new_bytes, bool) or not isinstance(max_new_bytes, numbers.Integral) or max_new_bytes < 0:
            raise ValueError(f"max_new_bytes must be a whole number >= 0, got {max_new_bytes!r}")
        check_sampling(temperature, top_k, top_p)
        stop_bytes = _stop_bytes(stop)
        longest_stop = max(map(len, stop_bytes), default=0)  # the tail a new byte may complete one in
        if not ids:  # an empty batch
            self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "new_bytes": 0, "steps": 0, "patches": 0, "bytes_read": 0}
            return []
        capacity = self._check_lengths(ids, max_new_bytes)
        B = len(ids)
        keys = [row_key(seed or 0, to_bytes(p)) for p in ids]
        # compiled steps specialise on the cache shapes: size them by powers of two (>= 256) so
        # calls with other prompt lengths reuse the compiled code instead of recompiling
        self._init_state(B, max(256, 1 << (capacity - 1).bit_length()) if self.compiled else capacity, keys)
        self.sampling = (temperature, top_k, top_p)
        buf = self.buf  # the rows' bytes by position: the prompts now, then the steps' bytes (`_run_feed`)
        for r, p in enumerate(ids):
            buf[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.lens.copy_(torch.tensor([len(p) for p in ids]))
        out: list[list[int]] = [[] for _ in range(B)]
        done = [max_new_bytes == 0] * B
        lens_host = [len(p) for p in ids]
        longest, shortest = max(lens_host), min(lens_host)
        t0 = time.perf_counter()
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "new_bytes": 0, "steps": 0}
        first = 0
        # every row has real bytes at 0..shortest-1; short prompts of small models are read faster
        # by the native steps than by a forward (NATIVE_STEP_PROMPT_WORK)
        stepped = self.native and shortest * self._work <= NATIVE_STEP_PROMPT_WORK
        if self.prefill and shortest >= 2 and not stepped:
            self._prefill(buf[:, :shortest])
            first = shortest - 1  # position shortest-1 is read; its logits are in self.logits
        self._call("feed")  # the first byte a step reads
        # the graphs for the global-cache buckets these steps can reach (the prefill's patch count
        # known); capturing is neither prefill nor decode time (stats["graphs_s"])
        t = time.perf_counter()
        self._prepare_graphs(steps=capacity - 1 - first)
        self.stats["graphs_s"] = time.perf_counter() - t
        t0 += self.stats["graphs_s"]
        # generated bytes are read back (a host sync) every READ_EVERY steps, not every step, so
        # the host launches the next steps while the GPU runs these; streaming reads every step
        every = 1 if on_step is not None else READ_EVERY
        ahead = _reads_ahead(buf) and on_step is None
        unread = shortest  # first position not yet handed out (earlier ones are every row's prompt)
        fetched = shortest  # first position not yet copied back (READ_AHEAD)
        copies: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []  # copied, not yet handed out

        def hand(rows: list[list[int]], upto: int) -> None:
            """Hand positions unread..upto-1 (`rows`, by row) to their rows: EOS, max_new_bytes
            and stop strings as if each were read at its own step (the steps after a row is done
            are discarded)."""
            nonlocal unread
            closes = self.close.tolist() if on_step is not None else None  # every == 1: one position
            for i, pos in enumerate(range(unread, upto)):
                for r in range(B):
                    if done[r] or pos < lens_host[r]:
                        continue
                    tok = rows[r][i]
                    if stop_at_eos and tok == EOS_ID:
                        done[r] = True
                        continue
                    out[r].append(tok)
                    if on_step is not None:
                        on_step(r, tok, closes[r])  # closes[r]: this byte starts a patch
                    if stop_bytes:  # (also on the last byte max_new_bytes allows)
                        tail = to_bytes(out[r][-longest_stop - 1:])
                        hit = [s for s in stop_bytes if tail.endswith(s)]
                        if hit:
                            del out[r][len(out[r]) - len(hit[0]):]
                            done[r] = True
                    if len(out[r]) >= max_new_bytes:
                        done[r] = True
            unread = upto

        def read(upto: int, last: bool) -> None:
            """Positions up to upto-1 read back and handed out; READ_AHEAD: copied back without
            waiting, and the last read's copy handed out (all of them if `last`)."""
            nonlocal fetched
            self._flush()  # the last step's feed writes its byte
            lo, fetched = fetched, upto
            if not ahead:
                hand(buf[:, lo:upto].tolist(), upto)
                return
            host = torch.empty((B, upto - lo), dtype=buf.dtype, pin_memory=buf.is_cuda)
            host.copy_(buf[:, lo:upto], non_blocking=True)
            event = torch.cuda.Event() if buf.is_cuda else None
            if event is not None:
                event.record()
            copies.append((upto, host, event))
            while copies and (last or len(copies) > 1):
                upto_i, host_i, event_i = copies.pop(0)
                if event_i is not None:
                    event_i.synchronize()  # (the GPU has the steps since queued)
                hand(host_i.tolist(), upto_i)

        for n in range(first, capacity - 1):
            if n == longest - 1:  # every prompt is read: the rest is decoding
                self.stats["prefill_s"] = time.perf_counter() - t0
            if not (first and n == first):
                self._step()  # byte n (fed: the prompt's or the last step's), then byte n + 1 fed
                self.stats["steps"] += 1
            if n + 2 - fetched >= every or n + 2 == capacity:
                read(n + 2, last=n + 2 == capacity)
                if all(done):
                    break
        self._flush()
        self.stats["decode_s"] = time.perf_counter() - t0 - self.stats["prefill_s"]
        self.stats["new_bytes"] = sum(len(o) for o in out)
        self.stats["patches"] = int(self.p.sum())
        self.stats["bytes_read"] = int(self.n) * B
        return out

    def generate(self, prompts, max_new_bytes: int = 256, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None) -> list[bytes]:
        """Generate continuations (bytes, prompt excluded) for `prompts` (str, bytes or id lists).

        Greedy at temperature 0; stops at EOS, at any of `stop` (not included in the output) or
        after `max_new_bytes`. An empty prompt starts from BOS. A row's result does not depend on
        the other rows of the batch (sampling noise is keyed by seed and prompt).
        """
        single = isinstance(prompts, (str, bytes))
        rows = self.generate_ids([prompts] if single else prompts, max_new_bytes, temperature, top_k, top_p,
                                 seed, stop)
        return [to_bytes(r) for r in rows]

    def generate_in_batches(self, prompts, batch_size: int = 64, **kwargs) -> Iterator[tuple[int, bytes]]:
        """`generate` over many prompts, `batch_size` at a time: batches of prompts of similar
        lengths (rows share the step position, so a long prompt in a batch of short ones is read
        byte by byte while they decode), yielding (index, continuation) in the prompts' order as
        soon as every earlier one is done. The same bytes as one `generate` call (a row's result
        does not depend on its batch). `kwargs`: generate's."""
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
            raise TypeError(f"prompts is a list of prompts, got {type(prompts).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        lengths = [len(p.encode()) if isinstance(p, str) else len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])

        def batches() -> Iterator[tuple[int, bytes]]:  # (the checks above run at the call, not the first item)
            done: dict[int, bytes] = {}
            shown = 0
            for b in range(0, len(order), batch_size):
                rows = order[b:b + batch_size]
                done.update(zip(rows, self.generate([prompts[i] for i in rows], **kwargs), strict=True))
                while shown in done:
                    yield shown, done.pop(shown)
                    shown += 1

        return batches()

    def stream(self, prompt, max_new_bytes: int = 256, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
               patch_marker: str | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces that never split a UTF-8 character.

        Stop strings are cut from the output, so bytes are held back while they could still be
        the start of one. With `patch_marker`, the marker is inserted before every generated byte
        that starts a patch (at character granularity).
        """
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        err: list[BaseException] = []

        result: list[list[int]] = []  # the output as generate_ids returns it (a stop string cut)

        def work():
            try:
                result.extend(self.generate_ids([prompt], max_new_bytes, temperature, top_k, top_p, seed, stop,
                                                on_step=lambda r, tok, starts: q.put((tok, starts))))
            except BaseException as e:  # surfaced in the consumer
                err.append(e)
            finally:
                q.put(None)

        hold = max((len(s) for s in _stop_bytes(stop)), default=0)  # (bad stop strings refused here)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        emitted = 0  # bytes rendered so far
        pending: list[tuple[int, bool]] = []  # (byte id, starts a patch), held back for stop strings
        dec = Utf8Stream()

        def render(items) -> str:
            out = []
            for tok, starts in items:
                piece = dec.feed([tok])
                if patch_marker and starts:
                    out.append(patch_marker)
                out.append(piece)
            return "".join(out)

        while (item := q.get()) is not None:
            pending.append(item)
            if len(pending) > hold:
                emitted += len(pending) - hold
                text = render(pending[: len(pending) - hold])
                del pending[: len(pending) - hold]
                if text:
                    yield text
        thread.join()
        if err:
            raise err[0]
        # the bytes held back, less a stop string that ended the output (generate_ids cut it from
        # its result; the steps had already handed its bytes over)
        text = render(pending[: len(result[0]) - emitted]) + dec.flush()
        if text:
            yield text


class _DenseMask:
    """A precomputed boolean mask in the shape `attend` expects."""

    impl = "sdpa"
    band = select = None

    def __init__(self, dense: torch.Tensor):
        self._d = dense

    def dense(self) -> torch.Tensor:
        return self._d


@torch.no_grad()
def reference_generate(model, prompts, max_new_bytes: int, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True
                       ) -> list[list[int]]:
    """The oracle: for every new byte, patch the whole prefix and run the full model on it.

    Same sampling noise as `Generator` (keyed by seed, prompt and position), one row at a time.
    """
    check_sampling(temperature, top_k, top_p)
    if not isinstance(model, BLT):
        raise ValueError(f"reference_generate needs a BLT, got {type(model).__name__}")
    outs = []
    for ids in _encode_prompts(prompts):
        key = torch.tensor([row_key(seed or 0, to_bytes(ids))], device=model.device)
        seq = list(ids)
        new: list[int] = []
        for _ in range(max_new_bytes):
            x = torch.tensor([seq], device=model.device)
            logits = model(x)[:, -1]
            tok = int(sample(logits, key, len(seq) - 1, temperature, top_k, top_p)[0])
            if stop_at_eos and tok == EOS_ID:
                break
            new.append(tok)
            seq.append(tok)
        outs.append(new)
    return outs


__all__ = ["Generator", "reference_generate"]
