"""Patching as pure functions (spec §4): patch starts, lengths, patch ids.

Everything works on `starts_BL`, a boolean [B, T+1] telling whether each position starts a patch
under the next-token convention (position T, the byte not seen yet, may start one). Every rule
looks only at positions < t to decide t, so patching is incremental (a prefix patches as the
prefix of the patching) and each row is computed on its own (batch-independent).
"""

from __future__ import annotations

import torch

from ..bytes import BOS_ID, EOS_ID, OFFSET


def _base_starts(B: int, T: int, device) -> torch.Tensor:
    """Positions 0 and 1 always start: patch 0 is the BOS alone (spec §4.2, §4.8)."""
    starts = torch.zeros(B, T + 1, dtype=torch.bool, device=device)
    starts[:, :2] = True
    return starts


def entropy_starts(entropies_BT: torch.Tensor, threshold: float, threshold_add: float | None = None,
                   monotonicity: bool = False) -> torch.Tensor:
    """Starts from next-byte entropies H (nats, fp32) with Meta's threshold rules (spec §4.2-4.3).

    global: t >= 2 starts iff H[t-1] > θ.  monotonicity: t = 2 starts; t >= 3 iff H[t-1]-H[t-2] > θ.
    threshold_add = a: 0,1,2 start, 3 never (reference quirk), t >= 4 iff H[t-1] > θ and
    H[t-1]-H[t-2] > a.
    """
    H = entropies_BT.float()
    B, T = H.shape
    starts = _base_starts(B, T, H.device)
    if T < 2:
        return starts
    prev = H[:, 1:]  # prev[:, t-2] = H[t-1], for t = 2..T
    diff = H[:, 1:] - H[:, :-1]  # diff[:, t-2] = H[t-1] - H[t-2], for t = 2..T (t = 2 unused)
    if monotonicity:
        starts[:, 2] = True
        starts[:, 3:] = diff[:, 1:] > threshold
    elif threshold_add is not None:
        starts[:, 2] = True
        starts[:, 4:] = (prev[:, 2:] > threshold) & (diff[:, 2:] > threshold_add)
    else:
        starts[:, 2:] = prev > threshold
    return starts


def _space_like(tokens_BT: torch.Tensor) -> torch.Tensor:
    b = tokens_BT - OFFSET
    return ((tokens_BT < OFFSET) | (b < 0x30) | ((b >= 0x3A) & (b <= 0x40)) | ((b >= 0x5B) & (b <= 0x60))
            | ((b >= 0x7B) & (b <= 0x7F)) | (b >= 0xC0))


def space_starts(tokens_BT: torch.Tensor) -> torch.Tensor:
    """A space-like byte ends its patch, unless it directly follows another space-like byte;
    special ids always end one (spec §4.4)."""
    B, T = tokens_BT.shape
    starts = _base_starts(B, T, tokens_BT.device)
    like = _space_like(tokens_BT)
    counts = like.clone()
    counts[:, 1:] &= ~like[:, :-1]
    counts |= tokens_BT < OFFSET
    starts[:, 2:] |= counts[:, 1:]
    return starts


def static_starts(B: int, T: int, size: int, device=None) -> torch.Tensor:
    """[1] then patches of `size` (spec §4.4: bltkit keeps the first patch of length 1)."""
    starts = _base_starts(B, T, device)
    pos = torch.arange(T + 1, device=device)
    starts |= (pos >= 1) & ((pos - 1) % size == 0)
    return starts


def byte_starts(B: int, T: int, device=None) -> torch.Tensor:
    return torch.ones(B, T + 1, dtype=torch.bool, device=device)


def document_starts(tokens_BT: torch.Tensor) -> torch.Tensor:
    """A patch starts right after every BOS and EOS, so patches never straddle documents."""
    B, T = tokens_BT.shape
    starts = torch.zeros(B, T + 1, dtype=torch.bool, device=tokens_BT.device)
    starts[:, 1:] = (tokens_BT == BOS_ID) | (tokens_BT == EOS_ID)
    return starts


def starts_for(pc, tokens_BT: torch.Tensor, entropies_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, T+1]: the patch starts of `tokens_BT` under a PatcherConfig `pc` (its mode,
    document boundaries and max_patch_length); entropy mode needs `entropies_BT`."""
    B, T = tokens_BT.shape
    if pc.mode == "entropy":
        if entropies_BT is None:
            raise ValueError("entropy patching needs the entropies of an entropy model")
        starts = entropy_starts(entropies_BT, pc.threshold, pc.threshold_add, pc.monotonicity)
    elif pc.mode == "space":
        starts = space_starts(tokens_BT)
    elif pc.mode == "static":
        starts = static_starts(B, T, int(pc.patch_size), tokens_BT.device)
    else:
        starts = byte_starts(B, T, tokens_BT.device)
    if pc.doc_boundaries:
        starts = starts | document_starts(tokens_BT)
    if pc.max_patch_length is not None:
        starts = limit_patch_length(starts, pc.max_patch_length)
    return starts


def limit_patch_length(starts_BL: torch.Tensor, max_len: int) -> torch.Tensor:
    """A patch that reaches `max_len` positions closes (spec §4.7, Meta's rule on L = T+1)."""
    L = starts_BL.shape[1]
    pos = torch.arange(L, device=starts_BL.device).expand_as(starts_BL)
    last_start = torch.where(starts_BL, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return starts_BL | ((pos - last_start) % max_len == 0)


def starts_to_lengths(starts_BL: torch.Tensor) -> torch.Tensor:
    """Lengths [B, P] summing to L per row, right-padded with zeros (P = the most patches of a row)."""
    B, L = starts_BL.shape
    counts = starts_BL.sum(1)
    P = int(counts.max())
    pos = torch.arange(L, device=starts_BL.device).expand(B, L)
    idx = torch.where(starts_BL, starts_BL.long().cumsum(1) - 1, torch.full_like(pos, P))
    start_pos = torch.full((B, P + 1), L, dtype=torch.long, device=starts_BL.device)
    start_pos.scatter_(1, idx, pos)  # non-starts all land in the dummy column P
    start_pos[:, P] = L
    return start_pos[:, 1:] - start_pos[:, :-1]


def lengths_to_starts(lengths_BP: torch.Tensor, L: int) -> torch.Tensor:
    """Inverse of `starts_to_lengths` for lengths summing to L (zero-length patches vanish)."""
    B = lengths_BP.shape[0]
    ends = lengths_BP.long().cumsum(1)
    starts = torch.zeros(B, L + 1, dtype=torch.bool, device=lengths_BP.device)
    starts[:, 0] = True
    starts.scatter_(1, ends.clamp(max=L), True)
    return starts[:, :L]


def normalize_lengths(lengths_BP: torch.Tensor, T: int, validate: bool = True) -> torch.Tensor:
    """Check explicit lengths and bring them to the T+1 convention (spec §4.6).

    Rows may sum to T+1 (Meta) or T (transformers: a zero-length patch right after the last
    non-empty one marks a patch starting at position T). The first patch must have length 1.
    `validate=False` checks only the shape and expects the T+1 convention already (as
    `starts_to_lengths` gives it): the value checks read the tensor on the host, a device sync
    each on a GPU.
    """
    lengths = torch.as_tensor(lengths_BP)
    if lengths.dim() == 1:
        lengths = lengths[None]
    if lengths.dim() != 2:
        raise ValueError(f"patch_lengths must be [batch, patches], got shape {tuple(lengths.shape)}")
    lengths = lengths.long()
    if not validate:
        return lengths
    if (lengths < 0).any():
        raise ValueError("patch_lengths must be >= 0")
    if lengths.shape[1] == 0 or (lengths[:, 0] != 1).any():
        raise ValueError("the first patch must have length 1 (the BOS alone, spec §4.8); "
                         f"got first lengths {lengths[:, 0].tolist() if lengths.shape[1] else []}")
    nonzero = lengths > 0
    seen_zero = (~nonzero).long().cumsum(1) > 0
    if (nonzero & seen_zero).any():
        raise ValueError("patch_lengths: a non-empty patch follows an empty one (pad only at the right)")
    sums = lengths.sum(1)
    bad = ~((sums == T) | (sums == T + 1))
    if bad.any():
        raise ValueError(f"patch_lengths must sum to the sequence length {T} or {T + 1}; "
                         f"row sums are {sums.tolist()}")
    short = sums == T
    if short.any():
        n = nonzero.sum(1)  # non-empty patches form a prefix of each row
        P = lengths.shape[1]
        lengths = torch.cat([lengths, torch.zeros_like(lengths[:, :1])], dim=1)
        rows = torch.arange(lengths.shape[0], device=lengths.device)
        marker = short & (n < P)  # a zero right after the last patch: a phantom patch at T
        bos_only = short & ~marker & (n == 1)  # position 1 always starts a patch of its own
        grow = short & ~marker & ~bos_only  # otherwise position T joins the last (open) patch
        lengths[rows[marker | bos_only], n[marker | bos_only]] = 1
        lengths[rows[grow], n[grow] - 1] += 1
        if not lengths[:, -1].any():
            lengths = lengths[:, :-1]
    return lengths


def patch_ids(lengths_BP: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder patch id pid(t) and decoder patch id d(t) = pid(t+1) - 1 for t < T (spec §4.8).

    `lengths_BP` must follow the T+1 convention (see `normalize_lengths`).
    """
    ends = lengths_BP.long().cumsum(1)  # B P
    pos = torch.arange(T + 1, device=lengths_BP.device).expand(lengths_BP.shape[0], T + 1).contiguous()
    pid = torch.searchsorted(ends, pos, right=True)  # number of patches ending at or before t
    return pid[:, :T], pid[:, 1:] - 1
