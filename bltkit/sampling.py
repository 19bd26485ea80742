"""Sampling without host synchronisation, reproducible per row.

Noise comes from a counter-based hash (splitmix64) of (row key, step, token), so a row's draws do
not depend on which other rows share its batch, on the device, or on how many steps ran before on
other rows. A categorical draw is the "exponential race": argmax_v p_v / E_v with E_v ~ Exp(1).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

_MASK64 = (1 << 64) - 1


def _s64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _M1, _M2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def row_key(seed: int, prompt: bytes) -> int:
    """A row's noise key: depends only on the seed and its prompt."""
    h = seed & _MASK64
    for chunk in range(0, len(prompt), 8):
        h = (h * 0x100000001B3 ^ int.from_bytes(prompt[chunk:chunk + 8], "little")) & _MASK64
    return _s64(h ^ (len(prompt) << 48))


def uniform(keys_B: torch.Tensor, step: torch.Tensor | int, n: int) -> torch.Tensor:
    """U(0, 1] noise [B, n] in float64 from (key, step, index)."""
    idx = torch.arange(n, device=keys_B.device, dtype=torch.int64)
    z = splitmix64(splitmix64(keys_B[:, None] ^ (torch.as_tensor(step, device=keys_B.device) * _M1)) + idx)
    return (_shr(z, 11).to(torch.float64) + 1.0) / float(1 << 53)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would otherwise be read as something else (a negative
    temperature as greedy, top_p = 2 as no filter), saying which values are allowed."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0):
        raise ValueError(f"top_k must be a whole number >= 1 (None or 0: no top-k filter), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (None or 1: no nucleus filter), got {top_p!r}")


def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
                  ) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (drop tokens whose preceding mass exceeds top_p)."""
    logits = logits_BV.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits_BV: torch.Tensor, keys_B: torch.Tensor, step: torch.Tensor | int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Next ids [B] (int64). temperature 0 is greedy. `out`: an int64 [B] to write them into (the
    argmax's own output: no copy after it)."""
    if temperature > 0.0:
        probs = filter_logits(logits_BV, temperature, top_k, top_p).softmax(-1).double()
        logits_BV = probs / -torch.log(uniform(keys_B, step, probs.shape[-1]))  # the race
    return torch.argmax(logits_BV, dim=-1, out=out)
