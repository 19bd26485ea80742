"""The FlexAttention path in bf16 against the fp32 SDPA reference path, on a blt-1b-shaped model.

Random weights, explicit patch lengths (first patch 1; row r has patches of 1..8+4r bytes, so the
rows' patch counts differ and the global transformer runs packed), two rows of 8,192 bytes by
default, with an EOS in the middle so the document masks are exercised. Prints the relative error
of fp32 Flex (same math, so any missing key tile shows) and of bf16 Flex logits against the fp32
reference, the agreement of the argmax, and the forward time of both paths.

    python benchmarks/flex_check.py --preset blt-1b --seq-len 8192
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import SAMPLE_TEXT, random_model, timed

from bltkit.bytes import EOS_ID, encode


def patch_lengths(T: int, seed: int = 0, longest: int = 8) -> list[int]:
    """Lengths 1..longest (mean 4.5 for 8), first patch 1, summing to T+1."""
    g = torch.Generator().manual_seed(seed)
    out, left = [1], T
    while left > 0:
        n = min(int(torch.randint(1, longest + 1, (1,), generator=g)), left)
        out.append(n)
        left -= n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=2,
                    help="rows of different patch counts (row r: patches of 1..8+4r bytes); 2+ packs the global model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    dev, T = args.device, args.seq_len
    model = random_model(args.preset, args.overrides, dev, torch.float32)
    ids = encode((SAMPLE_TEXT * (T // len(SAMPLE_TEXT) + 1)).encode()[: T - 1])
    ids[T // 2] = EOS_ID  # two documents
    x = torch.tensor([ids] * args.rows, device=dev)
    rows = [patch_lengths(T, seed=r, longest=8 + 4 * r) for r in range(args.rows)]
    P = max(map(len, rows))
    lengths = torch.tensor([r + [0] * (P - len(r)) for r in rows], device=dev)  # trailing empty patches pad
    with torch.no_grad():
        model.set_attn_impl("sdpa")
        ref, t_ref = timed(lambda: model(x, lengths), dev)
        # fp32 Flex: the same math as the reference up to summation order, so a key tile missing
        # from a BlockMask (or a packing slip) shows as an O(1) error, not as bf16 noise
        model.set_attn_impl("flex")
        out32 = model(x, lengths)
        model.to(torch.bfloat16)
        model(x, lengths)  # compile
        out, t_flex = timed(lambda: model(x, lengths), dev, repeat=3)
    rel32 = float((out32 - ref).norm() / ref.norm())
    rel = float((out - ref).norm() / ref.norm())
    maxabs = float((out - ref).abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{args.preset}, {args.rows} x {T} bytes, {[len(r) - 1 for r in rows]} patches (+BOS), device {dev}")
    print(f"fp32 SDPA reference: {t_ref * 1e3:.1f} ms | bf16 Flex (compiled): {t_flex * 1e3:.1f} ms")
    print(f"fp32 Flex: relative L2 error {rel32:.2e} (tolerance < 1e-3: TF32-level products at most)")
    print(f"bf16 Flex: relative L2 error {rel:.2e} (bf16 tolerance: < 2e-2), max |diff| {maxabs:.3f}, "
          f"argmax agreement {agree * 100:.2f}%")
    ok = rel32 < 1e-3 and rel < 2e-2 and agree > 0.97
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
