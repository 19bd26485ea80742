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


def _coefficients(sizes: list[int], n_functions: int, width: int) -> list[list[int]]:
    """Row n: the prime powers of table n laid over a window of `width` ids (oldest first), zero
    where the table's n-gram does not reach: hash_n = Σ_j window_j * coef[n][j] (wrapping)."""
    rows = []
    for f in range(n_functions):
        prime = PRIMES[f % len(PRIMES)]
        for g in sizes:
            rows.append([0] * (width - g) + prime_powers(prime, g))
    return rows


_COEF_CACHE: dict = {}


def _cached(key: tuple, make) -> torch.Tensor:
    """A constant tensor made once per key (its device among it): no host-to-device copy or small
    kernels per call (a copy would break CUDA graphs; the kernels cost a generation step)."""
    if key not in _COEF_CACHE:
        _COEF_CACHE[key] = make()
    return _COEF_CACHE[key]


def _coef_tensor(sizes: tuple[int, ...], n_functions: int, width: int, device: torch.device) -> torch.Tensor:
    """`_coefficients` on `device`, cached."""
    return _cached((sizes, n_functions, width, str(device)), lambda: torch.tensor(
        _coefficients(list(sizes), n_functions, width), dtype=torch.int64, device=device))


def _offsets(n_tables: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Each table's first row in the fused table, n * vocab, on `device`, cached."""
    return _cached(("offsets", n_tables, vocab, str(device)),
                   lambda: torch.arange(n_tables, dtype=torch.int64, device=device) * vocab)


def all_hash_ids(tokens_BT: torch.Tensor, sizes: list[int], n_functions: int, vocab: int,
                 history_BH: torch.Tensor | None = None) -> torch.Tensor:
    """Ids [B, T, n_tables] into the fused table, tables in order n = f*len(sizes) + gi.

    All tables at once: windows of the last max(sizes) ids times a coefficient matrix, in int64
    with wrap-around; equal to `hash_ids` per table (tested)."""
    B = tokens_BT.shape[0]
    width = max(sizes)
    tok = tokens_BT.to(torch.int64)
    if history_BH is None:
        pad = torch.zeros(B, width - 1, dtype=torch.int64, device=tok.device)
    else:
        pad = history_BH.to(torch.int64)[:, history_BH.shape[1] - (width - 1):]
    windows = torch.cat([pad, tok], dim=1).unfold(1, width, 1)  # B T width, oldest first
    coef = _coef_tensor(tuple(sizes), n_functions, width, tok.device)
    h = (windows[:, :, None, :] * coef).sum(-1)  # B T n_tables, wraps mod 2^64
    return torch.remainder(h, vocab) + _offsets(coef.shape[0], vocab, tok.device)
