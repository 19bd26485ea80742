"""The FlexAttention path in bf16 against the fp32 SDPA reference path, on a blt-1b-shaped model.

Random weights, explicit patch lengths (mean about 4.5 bytes, first patch 1), one row of 8,192
bytes by default, with an EOS in the middle so the document masks are exercised. Prints the
relative error of the bf16 Flex logits against the fp32 reference, the agreement of the argmax,
and the forward time of both paths.

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


def patch_lengths(T: int, seed: int = 0) -> torch.Tensor:
    """Lengths 1..8 (mean 4.5), first patch 1, summing to T+1."""
    g = torch.Generator().manual_seed(seed)
    out, left = [1], T
    while left > 0:
        n = min(int(torch.randint(1, 9, (1,), generator=g)), left)
        out.append(n)
        left -= n
    return torch.tensor([out])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    dev, T = args.device, args.seq_len
    model = random_model(args.preset, args.overrides, dev, torch.float32)
    ids = encode((SAMPLE_TEXT * (T // len(SAMPLE_TEXT) + 1)).encode()[: T - 1])
    ids[T // 2] = EOS_ID  # two documents
    x = torch.tensor([ids], device=dev)
    lengths = patch_lengths(T).to(dev)
    with torch.no_grad():
        model.set_attn_impl("sdpa")
        ref, t_ref = timed(lambda: model(x, lengths), dev)
        model.to(torch.bfloat16).set_attn_impl("flex")
        model(x, lengths)  # compile
        out, t_flex = timed(lambda: model(x, lengths), dev, repeat=3)
    rel = float((out - ref).norm() / ref.norm())
    maxabs = float((out - ref).abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{args.preset}, {T} bytes, {lengths.shape[1] - 1} patches (+BOS), device {dev}")
    print(f"fp32 SDPA reference: {t_ref * 1e3:.1f} ms | bf16 Flex (compiled): {t_flex * 1e3:.1f} ms")
    print(f"relative L2 error {rel:.2e} (bf16 tolerance: < 2e-2), max |diff| {maxabs:.3f}, "
          f"argmax agreement {agree * 100:.2f}%")
    ok = rel < 2e-2 and agree > 0.97
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
