"""Hash n-gram ids (spec §5): rolling polynomial hash of the last g ids, int64 wrap-around.

id = (Σ_i w_i p^i mod 2^64, read as signed) floor-mod V_h, with w_0 the oldest id, BOE (0) left
padding per row, primes cycled per hash function. Table n = f*len(sizes) + gi in a fused table.
"""

from __future__ import annotations

import torch

PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
          9576890767, 3628273133, 2860486313, 5463458053, 3367900313)


def _wrap_int64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def prime_powers(prime: int, g: int) -> list[int]:
    """p^0 .. p^(g-1), each reduced to signed 64 bits (the products then wrap in int64 too)."""
    return [_wrap_int64(pow(prime, i, 1 << 64)) for i in range(g)]


def hash_ids(tokens_BT: torch.Tensor, g: int, prime: int, vocab: int, history_BH: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Hash ids [B, T] of the g-grams ending at each position.

    `history_BH` (the ids just before `tokens_BT`, oldest first) replaces the BOE left padding;
    the generator passes the last 7 ids so a single new byte hashes exactly as in a full pass.
    """
    B, T = tokens_BT.shape
    tok = tokens_BT.to(torch.int64)
    if history_BH is None:
        pad = torch.zeros(B, g - 1, dtype=torch.int64, device=tok.device)
    else:
        hist = history_BH.to(torch.int64)
        pad = hist[:, hist.shape[1] - (g - 1):] if g > 1 else hist[:, :0]
    padded = torch.cat([pad, tok], dim=1)  # B, T+g-1
    acc = torch.zeros(B, T, dtype=torch.int64, device=tok.device)
    for i, p in enumerate(prime_powers(prime, g)):
        acc += padded[:, i:i + T] * p  # int64 arithmetic wraps mod 2^64
    return torch.remainder(acc, vocab)  # floor semantics: always in [0, vocab)


def all_hash_ids(tokens_BT: torch.Tensor, sizes: list[int], n_functions: int, vocab: int,
                 history_BH: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Ids into the fused table, one [B, T] tensor per table, in table order (function-major)."""
    out = []
    for f in range(n_functions):
        prime = PRIMES[f % len(PRIMES)]
        for gi, g in enumerate(sizes):
            n = f * len(sizes) + gi
            out.append(hash_ids(tokens_BT, g, prime, vocab, history_BH) + n * vocab)
    return out
