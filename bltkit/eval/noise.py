"""Character-level noise for robustness evaluation, after the noised benchmarks of the BLT paper
(Pagnoni et al. 2024, §6.1): a byte-level model should degrade less than a tokenized one when the
text it reads is perturbed below the word level.

Kinds (`spec` is "kind" or "kind:p"):
- `antspeak`: every character upper-cased and the characters joined by single spaces;
- `drop`: each character removed with probability p (default 0.1);
- `randomcase`: each character upper-cased with probability p (default 0.5), else lower-cased;
- `repeat`: each character, with probability p (default 0.2), written 2 to 4 times;
- `uppercase`: every character upper-cased.
A text's noise depends only on the seed and the text (not on the order texts come in), so a
batch and its reruns see the same perturbations.
"""

from __future__ import annotations

import random

DEFAULT_P = {"antspeak": None, "drop": 0.1, "randomcase": 0.5, "repeat": 0.2, "uppercase": None}


def parse(spec: str) -> tuple[str, float | None]:
    """"kind" or "kind:p" -> (kind, p), checked; p is None for the kinds that take none."""
    kind, _, p_text = spec.partition(":")
    if kind not in DEFAULT_P:
        raise ValueError(f"unknown noise {kind!r}; choose from {', '.join(DEFAULT_P)} (e.g. drop:0.1)")
    if DEFAULT_P[kind] is None:
        if p_text:
            raise ValueError(f"noise {kind} takes no probability, got {spec!r}")
        return kind, None
    try:
        p = float(p_text) if p_text else DEFAULT_P[kind]
    except ValueError:
        raise ValueError(f"noise {spec!r}: the probability after ':' must be a number") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise {spec!r}: the probability must lie in [0, 1]")
    return kind, p


def apply(text: str, spec: str, seed: int = 0) -> str:
    """`text` with the noise `spec`, drawn from a generator seeded by (seed, text)."""
    kind, p = parse(spec)
    if kind == "uppercase":
        return text.upper()
    if kind == "antspeak":
        return " ".join(text.upper())
    rng = random.Random(f"{seed}:{kind}:{p}:{text}")  # (str seeds hash stably, PYTHONHASHSEED aside)
    if kind == "drop":
        return "".join(c for c in text if rng.random() >= p)
    if kind == "randomcase":
        return "".join(c.upper() if rng.random() < p else c.lower() for c in text)
    return "".join(c * (rng.randint(2, 4) if rng.random() < p else 1) for c in text)  # repeat
