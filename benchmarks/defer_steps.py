"""What a deferred step costs (Generator(defer=K)): each captured graph's replay time, the steps a
call takes against its positions, and the kernels of each graph.

    python benchmarks/defer_steps.py --batch 64 --defers 1 2 3

Deferring, the patch step (the global stack) runs every K-th step and the steps between run the
front and the decoder only (`generate._DEFERRED_STEP`); a row whose patch closes waits. Whether
that pays depends on what a step without the global stack costs against one with it: this
prints both: from the calls (the steps between patch steps, taking a patch step at what a
step costs with defer 1, which must come first) and as replayed on their own after a deferred
call, whose rows all wait at their last position (replays move no row, as in the call's last
steps; every kernel still runs on every row).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import SAMPLE_TEXT, calibrate_threshold, random_model, with_threshold

from bltkit.bytes import encode
from bltkit.generate import Generator


def replay_ms(graph: torch.cuda.CUDAGraph, n: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernel_table(graph: torch.cuda.CUDAGraph, rows: int) -> None:
    """The graph's kernels over 3 replays, by total GPU time (the profiler sees a graph's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.device_time)
    print(f"    {len(events) / 3:.0f} kernels a replay, {sum(map(sum, by_name.values())) / 3:.0f} µs of kernel time")
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        print(f"    {sum(times) / 3:8.1f} µs  {len(times) / 3:5.1f}x  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-bytes", type=int, default=128)
    ap.add_argument("--defers", type=int, nargs="*", default=[1, 2, 3], help="1 first")
    ap.add_argument("--rows", type=int, default=12, help="kernel table rows a graph (0: no tables)")
    args = ap.parse_args()
    dev = "cuda"
    model = random_model(args.preset, [], dev, torch.bfloat16)
    with_threshold(model, calibrate_threshold(model, torch.tensor([encode(SAMPLE_TEXT * 4)], device=dev), 4.5))
    text = (SAMPLE_TEXT * (args.prompt_len // len(SAMPLE_TEXT) + 2)).encode()
    step = len(text) // args.batch or 1
    prompts = [(text[i * step % len(text):] + text)[:args.prompt_len - 1] for i in range(args.batch)]
    every = None
    for k in args.defers:
        gen = Generator(model, defer=k)
        gen.generate_ids(prompts, 16, stop_at_eos=False)  # warm-up
        t = time.perf_counter()
        gen.generate_ids(prompts, args.new_bytes, stop_at_eos=False)
        wall = time.perf_counter() - t
        s = gen.stats
        print(f"defer {k} (deferring {gen.deferring}): {s['steps']} steps for {args.new_bytes} new bytes a row, "
              f"decode {s['new_bytes'] / s['decode_s']:.1f} bytes/s ({s['decode_s'] * 1e3 / s['steps']:.3f} ms a step; "
              f"call {wall:.2f} s), mean patch {s['bytes_read'] / max(1, s['patches']):.2f}", flush=True)
        if not gen.deferring:
            every = s["decode_s"] / s["steps"]
            continue
        patch_steps = s["steps"] // gen.deferring
        between = (s["decode_s"] - patch_steps * every) / (s["steps"] - patch_steps)
        print(f"  a step between patch steps: {between * 1e3:.3f} ms, taking a patch step at {every * 1e3:.3f} "
              "(defer 1's)", flush=True)
        for names, graph in gen.graphs.items():  # every row at its last position: replays move nothing
            for L, g in (graph.items() if isinstance(graph, dict) else [(None, graph)]):
                print(f"  {'+'.join(names)}{'' if L is None else f' (L={L})'}: {replay_ms(g):.3f} ms a replay",
                      flush=True)
                if args.rows:
                    kernel_table(g, args.rows)


if __name__ == "__main__":
    main()
