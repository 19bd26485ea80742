"""Attention masks and the two attention paths that must agree.

Every mask is one `mask_mod(b, h, q, kv) -> bool` built from 1-D lookups (document ids, patch
ids), so the dense boolean mask used by the SDPA reference path and the FlexAttention BlockMask
come from the same function. Rows with no visible key return 0 on both paths (spec §6.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IMPLS = ("sdpa", "flex")
FLEX_BLOCK = 128  # FlexAttention's default tile: BlockMasks are built for it
_compiled_flex = None


def allow_recompiles(limit: int = 128) -> None:
    """Raise dynamo's recompile limit (8 per function) to `limit`. A BLT step compiles one
    function (a block, the Flex kernel) for several (shape, dtype) variants: the local and global
    blocks, the encoder and decoder cross-attention, the entropy model, and three more for each new
    padded patch count. Past the limit dynamo runs the function eagerly: eager Flex is ~50x slower
    and memory-hungry (seen on an H100: 370k -> 34k bytes/s, 11 -> 71 GB). Call it outside compiled
    code: a config change made while dynamo traces becomes a guard of that trace, and every later
    call recompiles (seen on an H200: compiled blocks ran at half the eager speed)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)


def _flex_attention():
    """flex_attention, compiled on CUDA (eager flex is a slow reference there), eager elsewhere.
    The compiled function is made on first use by `Mask.prepare`, outside any compiled block."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        allow_recompiles()  # one compiled function serves every call site
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return flex_attention, _compiled_flex


class Mask:
    """A boolean mask over (batch, query, key), given as a mask_mod; materialised on demand."""

    def __init__(self, mask_mod: Callable, B: int, Q: int, K: int, device: torch.device, impl: str = "sdpa"):
        if impl not in IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
        self.mask_mod, self.B, self.Q, self.K, self.device, self.impl = mask_mod, B, Q, K, device, impl
        # a sliding window: query i (at key position i + q_offset) sees keys in
        # (i + q_offset - band, i + q_offset] only, so the reference path can attend block by block
        self.band: int | None = None
        self.q_offset = 0
        # query t sees exactly the `units` keys sel(t)*units ... (the decoder's cross-attention):
        # the reference path gathers them instead of masking all P x units
        self.select: tuple[torch.Tensor, int] | None = None
        self._selection: tuple[torch.Tensor, torch.Tensor] | None = None
        # block_size -> (lo, hi) [B, Q blocks]: the key blocks lo..hi-1 hold every key a query
        # block may see. Given, the FlexAttention BlockMask is built from it in O(B x blocks)
        # instead of by evaluating mask_mod over all B x Q x K pairs (create_block_mask)
        self.kv_block_range: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
        # (block_size, query tiles [nQ], key tiles [B, nQ, W]) -> bool [B, nQ, W]: every pair of the
        # tile is visible. Such "full" tiles skip mask_mod in the kernel; None: all tiles partial
        self.kv_block_full: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._dense: torch.Tensor | None = None
        self._bands: list | None = None
        self._block = None

    def dense(self) -> torch.Tensor:
        """Boolean [B, 1, Q, K], True = may attend."""
        if self._dense is None:
            self._dense = self.dense_block(0, self.Q, 0, self.K)
        return self._dense

    def dense_block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """Boolean [B, 1, q1 - q0, k1 - k0]: queries q0..q1-1 against keys k0..k1-1."""
        b = torch.arange(self.B, device=self.device)[:, None, None, None]
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=self.device)
        q = torch.arange(q0, q1, device=self.device)[None, None, :, None]
        kv = torch.arange(k0, k1, device=self.device)[None, None, None, :]
        return self.mask_mod(b, h, q, kv).expand(self.B, 1, q1 - q0, k1 - k0)

    def bands(self) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """For a sliding window: (q0, q1, k0, k1, dense block) per block of `band` queries, the
        keys being all those the block can see; built once, shared by every layer."""
        if self._bands is None:
            W, off = self.band, self.q_offset
            self._bands = []
            for q0 in range(0, self.Q, W):
                q1 = min(self.Q, q0 + W)
                k0, k1 = max(0, q0 + off - W + 1), min(self.K, q1 + off)
                self._bands.append((q0, q1, k0, k1, self.dense_block(q0, q1, k0, k1)))
        return self._bands

    def selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For a `select` mask: the key index of every query's units [B, 1, Q x units, 1] and which
        queries see any [B, 1, Q, 1]; built once, shared by every layer."""
        if self._selection is None:
            sel_BQ, units = self.select
            n, sel = self.K // units, sel_BQ.long()
            idx = sel.clamp(0, n - 1)[:, :, None] * units + torch.arange(units, device=sel.device)
            self._selection = idx.view(self.B, 1, -1, 1), ((sel >= 0) & (sel < n))[:, None, :, None]
        return self._selection

    def prepare(self) -> Mask:
        """For Flex: make the compiled kernel and build the BlockMask now. The mask factories call
        it, outside any compiled region, so a compiled block takes the built mask as an input:
        traced inside a block, the BlockMask's construction became part of that block's graph (and
        failed to compile on a CPU), and making the kernel there put dynamo's recompile limit into
        the trace's guards. The reference path's masks stay lazy (plain tensor work, traced fine)."""
        if self.impl == "flex":
            _flex_attention()
            self.block_mask()
        return self

    def block_mask(self):
        if self._block is None:
            from torch.nn.attention.flex_attention import BlockMask, create_block_mask

            if self.kv_block_range is None:
                self._block = create_block_mask(self.mask_mod, self.B, None, self.Q, self.K, device=self.device)
            else:
                part_num, part_idx, full_num, full_idx = (t[:, None].to(torch.int32) for t in self.tiles(FLEX_BLOCK))
                self._block = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                                       mask_mod=self.mask_mod, seq_lengths=(self.Q, self.K))
        return self._block

    def tiles(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """From `kv_block_range` and `kv_block_full`: per query tile the partial key tiles (count
        [B, nQ], indices first [B, nQ, nK]) and the full ones, as BlockMask.from_kv_blocks takes them."""
        n_kv = -(-self.K // bs)
        lo, hi = self.kv_block_range(bs)
        kv = lo.clamp(0, n_kv)[..., None] + torch.arange(n_kv, device=lo.device)  # B nQ nK candidates
        listed = kv < hi.clamp(max=n_kv)[..., None]
        kv = kv.clamp(max=n_kv - 1)
        full = listed & self.kv_block_full(bs, torch.arange(lo.shape[1], device=lo.device), kv) \
            if self.kv_block_full is not None else torch.zeros_like(listed)
        out = []
        for chosen in (listed & ~full, full):  # the chosen tiles first, in order
            order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
            out += [chosen.sum(-1), kv.gather(-1, order)]
        return tuple(out)


def attend(q_BNQH: torch.Tensor, k_BNKH: torch.Tensor, v_BNKH: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(H)); GQA when k/v have fewer heads."""
    gqa = q_BNQH.shape[1] != k_BNKH.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q_BNQH, k_BNKH, v_BNKH, enable_gqa=gqa)
    if mask.impl == "flex" and (q_BNQH.shape[-1] >= 16 or not q_BNQH.is_cuda):
        # (the compiled Flex kernel needs head_dim >= 16; smaller heads, as in the tiny presets,
        # take the reference path below)
        eager, compiled = _flex_attention()
        fn = compiled if q_BNQH.is_cuda else eager
        return fn(q_BNQH, k_BNKH, v_BNKH, block_mask=mask.block_mask(), enable_gqa=gqa)
    if mask.select is not None:
        return _attend_selected(q_BNQH, k_BNKH, v_BNKH, mask)
    if mask.band is not None and mask.K > 2 * mask.band:
        return _attend_banded(q_BNQH, k_BNKH, v_BNKH, mask, gqa)
    return _attend_dense(q_BNQH, k_BNKH, v_BNKH, mask.dense(), gqa)


def _attend_dense(q, k, v, dense: torch.Tensor, gqa: bool) -> torch.Tensor:
    has_key = dense.any(-1, keepdim=True)  # B 1 Q 1; a query with no key gives 0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense | ~has_key, enable_gqa=gqa)
    return out.masked_fill(~has_key, 0.0)


def _attend_banded(q, k, v, mask: Mask, gqa: bool) -> torch.Tensor:
    """The reference path for a sliding window: blocks of `band` queries against the
    2 x band - 1 keys they can see. Same result as the dense mask (the other keys are masked
    there), in O(T x band) instead of O(T^2) time and mask memory: on a CPU, the 512-byte
    windows of a 4,096-byte row run ~4x faster."""
    outs = [_attend_dense(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], dense, gqa)
            for q0, q1, k0, k1, dense in mask.bands()]
    return torch.cat(outs, dim=2)


def _attend_selected(q, k, v, mask: Mask) -> torch.Tensor:
    """The reference path when query t sees exactly keys sel(t)*units .. sel(t)*units + units-1
    (none when sel(t) is not a patch): gather those keys and take a softmax over `units` scores,
    O(T x units) instead of O(T x P x units). Same result as the dense mask; fp32 scores as SDPA."""
    B, N, T, H = q.shape
    G, units = k.shape[1], mask.select[1]  # G kv heads, each shared by N // G query heads
    idx, valid = mask.selection()
    idx = idx.expand(B, G, T * units, H)
    k_sel = k.gather(2, idx).view(B, G, 1, T, units, H).float()
    v_sel = v.gather(2, idx).view(B, G, 1, T, units, H).float()
    q_g = q.float().view(B, G, N // G, T, 1, H)
    w = ((q_g * k_sel).sum(-1) * H ** -0.5).softmax(-1)  # B G R T units
    out = (w[..., None] * v_sel).sum(-2).view(B, N, T, H).to(q.dtype)
    return out.masked_fill(~valid, 0.0)


# ---------------------------------------------------------------------------------------------
# Mask factories (spec §6.5). `doc_*` lookups are None when document masking is off.


def document_ids(tokens_BT: torch.Tensor, eos_id: int = 2) -> torch.Tensor:
    """Document index of every byte: a document ends after each EOS (the EOS belongs to it)."""
    is_eos = (tokens_BT == eos_id).to(torch.int32)
    return (is_eos.cumsum(1) - is_eos).to(torch.int32)


def _full_causal_tiles(bs: int, qt: torch.Tensor, kt: torch.Tensor, n: int, ids: list[torch.Tensor],
                       window: int | None = None, q_offset: int = 0) -> torch.Tensor:
    """`kv_block_full` for a causal mask (query i at key position i + q_offset), with a window,
    and with equal `ids` ([B or 1, n] each, never decreasing along a row: documents, rows of a
    packed batch): the tiles, query tiles `qt` x key tiles `kt` [B, nQ, W], whose every pair is
    visible. A tile cut short by the sequence's end (n) stays partial, as create_block_mask has it."""
    q_first = (qt * bs + q_offset)[None, :, None]
    q_last = q_first + bs - 1
    k_first, k_last = kt * bs, kt * bs + bs - 1
    full = (k_last <= q_first) & (q_last < n)
    if window is not None:
        full = full & (q_last - k_first < window)
    q_in = q_last.clamp(max=n - 1).expand_as(kt).flatten(1)
    for id_Bn in ids:  # equal at the tile's first key and last query: equal in between
        id_Bn = id_Bn.long().expand(kt.shape[0], -1)
        full = full & (id_Bn.gather(1, k_first.flatten(1)) == id_Bn.gather(1, q_in)).view_as(kt)
    return full


def local_mask(T: int, window: int | None, doc_BT: torch.Tensor | None, B: int, device, impl: str,
               q_offset: int = 0) -> Mask:
    """Causal, sliding window of `window` keys (query included), same document."""

    def mask_mod(b, h, q, kv):
        qa = q + q_offset
        m = kv <= qa
        if window is not None:
            m = m & (qa - kv < window)
        if doc_BT is not None:
            m = m & (doc_BT[b, qa] == doc_BT[b, kv])
        return m

    mask = Mask(mask_mod, B, T - q_offset, T, device, impl)
    mask.band, mask.q_offset = window, q_offset

    def kv_block_range(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        q0 = torch.arange(0, T - q_offset, bs, device=device)
        last = (q0 + bs).clamp(max=T - q_offset) - 1 + q_offset  # the block's last query, in key positions
        first = (q0 + q_offset - window + 1).clamp(min=0) if window is not None else torch.zeros_like(q0)
        return (first // bs).expand(B, -1), (last // bs + 1).expand(B, -1)

    def kv_block_full(bs: int, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        return _full_causal_tiles(bs, qt, kt, T, [] if doc_BT is None else [doc_BT], window, q_offset)

    mask.kv_block_range, mask.kv_block_full = kv_block_range, kv_block_full
    return mask.prepare()


def global_mask(P: int, pdoc_BP: torch.Tensor | None, B: int, device, impl: str) -> Mask:
    """Causal over patches, same patch-document."""

    def mask_mod(b, h, q, kv):
        m = kv <= q
        if pdoc_BP is not None:
            m = m & (pdoc_BP[b, q] == pdoc_BP[b, kv])
        return m

    mask = Mask(mask_mod, B, P, P, device, impl)

    def kv_block_range(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        last = (torch.arange(0, P, bs, device=device) + bs).clamp(max=P) - 1
        return torch.zeros_like(last).expand(B, -1), (last // bs + 1).expand(B, -1)

    def kv_block_full(bs: int, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        return _full_causal_tiles(bs, qt, kt, P, [] if pdoc_BP is None else [pdoc_BP])

    mask.kv_block_range, mask.kv_block_full = kv_block_range, kv_block_full
    return mask.prepare()


def packed_global_mask(row_C: torch.Tensor, pdoc_C: torch.Tensor | None, row_start_C: torch.Tensor,
                       impl: str) -> Mask:
    """`global_mask` for the patches of a batch packed into one sequence of C slots: causal, same
    row, same patch-document. `row_start_C` is the slot where each slot's row begins."""
    C = row_C.shape[0]

    def mask_mod(b, h, q, kv):
        m = (kv <= q) & (row_C[q] == row_C[kv])
        if pdoc_C is not None:
            m = m & (pdoc_C[q] == pdoc_C[kv])
        return m

    mask = Mask(mask_mod, 1, C, C, row_C.device, impl)

    def kv_block_range(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        q0 = torch.arange(0, C, bs, device=row_C.device)  # rows are contiguous: a tile's keys start
        last = (q0 + bs).clamp(max=C) - 1                 # where its first slot's row starts
        return (row_start_C[q0] // bs)[None], (last // bs + 1)[None]

    def kv_block_full(bs: int, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        # rows are contiguous, patch-documents never decrease within one
        return _full_causal_tiles(bs, qt, kt, C, [row_C[None]] + ([] if pdoc_C is None else [pdoc_C[None]]))

    mask.kv_block_range, mask.kv_block_full = kv_block_range, kv_block_full
    return mask.prepare()


def encoder_cross_mask(pid_BT: torch.Tensor, P: int, K: int, impl: str) -> Mask:
    """Unit u = p*K + r (query) sees the bytes t of patch p: pid(t) = p."""
    B, T = pid_BT.shape

    def mask_mod(b, h, q, kv):
        return pid_BT[b, kv] == q // K

    mask = Mask(mask_mod, B, P * K, T, pid_BT.device, impl)

    def kv_block_range(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        # units u0..u1-1 pool patches u0//K .. (u1-1)//K, whose bytes are contiguous (pid grows with t)
        u0 = torch.arange(0, P * K, bs, device=pid_BT.device)
        p_first, p_last = u0 // K, ((u0 + bs).clamp(max=P * K) - 1) // K
        pid = pid_BT.contiguous()
        t_first = torch.searchsorted(pid, p_first.expand(B, -1).contiguous())
        t_end = torch.searchsorted(pid, p_last.expand(B, -1).contiguous(), right=True)
        lo = t_first // bs
        return lo, torch.where(t_end > t_first, (t_end - 1) // bs + 1, lo)

    mask.kv_block_range = kv_block_range
    return mask.prepare()


def decoder_cross_mask(dec_BT: torch.Tensor, P: int, K: int, impl: str) -> Mask:
    """Byte t (query) sees the K units of patch d(t) (spec §4.8)."""
    B, T = dec_BT.shape

    def mask_mod(b, h, q, kv):
        return dec_BT[b, q] == kv // K

    mask = Mask(mask_mod, B, T, P * K, dec_BT.device, impl)
    mask.select = (dec_BT, K)

    def kv_block_range(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        # bytes t0..t1-1 read the units of patches min..max of their d(t) (those in 0..P-1)
        n_q = -(-T // bs)
        d = F.pad(dec_BT.long(), (0, n_q * bs - T), value=-1).view(B, n_q, bs)
        valid = (d >= 0) & (d < P)
        d_min = torch.where(valid, d, P).amin(-1)
        d_max = torch.where(valid, d, -1).amax(-1)
        lo = d_min * K // bs
        return lo, torch.where(valid.any(-1), ((d_max + 1) * K - 1) // bs + 1, lo)

    mask.kv_block_range = kv_block_range
    return mask.prepare()
