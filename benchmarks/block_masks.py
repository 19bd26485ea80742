"""Building FlexAttention BlockMasks: from key-tile ranges (bltkit) against create_block_mask.

The four masks of a BLT step (local window, global, encoder and decoder cross-attention) for B rows
of T bytes and P patch slots (patches of 8 bytes, the rest padding), timed both ways in the same
run, with the ratio; also checks that the ranges list every tile create_block_mask finds.

    python benchmarks/block_masks.py --batch 8 --seq-len 4096 --patches 2048      # CPU
    python benchmarks/block_masks.py --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import sync

from bltkit.model import patching
from bltkit.model.attention import (
    decoder_cross_mask,
    document_ids,
    encoder_cross_mask,
    global_mask,
    local_mask,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--patches", type=int, default=2048, help="patch slots per row (padded count)")
    ap.add_argument("--k", type=int, default=2, help="cross_attn_k")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask

    B, T, P, dev = args.batch, args.seq_len, args.patches, torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, 260, (B, T), generator=g)
    x[:, 0] = 1
    x[torch.rand(B, T, generator=g) < 0.002] = 2  # some documents
    lengths = torch.zeros(B, P, dtype=torch.long)
    lengths[:, 0] = 1
    lengths[:, 1:T // 8 + 1] = 8
    pid, dec = patching.patch_ids(patching.normalize_lengths(lengths, T), T)
    x, pid, dec = x.to(dev), pid.to(dev), dec.to(dev)
    makers = {
        "local": lambda: local_mask(T, args.window, document_ids(x), B, dev, "flex"),
        "global": lambda: global_mask(P, None, B, dev, "flex"),
        "encoder cross": lambda: encoder_cross_mask(pid, P, args.k, "flex"),
        "decoder cross": lambda: decoder_cross_mask(dec, P, args.k, "flex"),
    }
    total = [0.0, 0.0]
    for name, make in makers.items():
        times = []
        for build in (lambda m: m.block_mask(),
                      lambda m: create_block_mask(m.mask_mod, m.B, None, m.Q, m.K, device=dev)):
            best = float("inf")
            for _ in range(3):  # the first may warm up allocators or kernels
                m = make()
                sync(dev)
                t = time.perf_counter()
                build(m)
                sync(dev)
                best = min(best, time.perf_counter() - t)
            times.append(best)
        m = make()
        ours = m.block_mask().to_dense().bool()
        ref = create_block_mask(m.mask_mod, B, None, m.Q, m.K, device=dev).to_dense().bool()
        covered = not (ref & ~ours).any().item()
        total[0] += times[0]
        total[1] += times[1]
        print(f"{name:14s} ranges {times[0] * 1e3:9.2f} ms   create_block_mask {times[1] * 1e3:9.2f} ms   "
              f"{times[1] / times[0]:7.1f}x   covers every tile: {covered}", flush=True)
    print(f"{'all four':14s} ranges {total[0] * 1e3:9.2f} ms   create_block_mask {total[1] * 1e3:9.2f} ms   "
          f"{total[1] / total[0]:7.1f}x  ({B} x {T} bytes, {P} patch slots, {args.device})")


if __name__ == "__main__":
    main()
