"""Summarise a CUDA-graph trace written by `profile_generate.py --trace DIR` (a Chrome trace of a
graph's replays): one replay's span, each stream's kernels and busy time, the kernels by total
time, and optionally the kernels in launch order or the period of a repeating kernel (a layer).

    python benchmarks/trace_summary.py DIR/trace_front_patch_back_feed.json --period 64x64_64x13
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict


def load_kernels(path: str) -> list[dict]:
    """The trace's kernel events, sorted by start time (µs)."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "ts" in e and "dur" in e]
    if not kernels:
        raise SystemExit(f"{path} holds no kernel events: is it a trace from profile_generate.py --trace?")
    return sorted(kernels, key=lambda e: e["ts"])


def one_replay(kernels: list[dict], replays: int, which: int) -> list[dict]:
    """Replay `which` (0-based) of `replays` back-to-back replays of one graph: each replay launches
    the same kernels, so the trace splits into equal runs."""
    if len(kernels) % replays:
        raise SystemExit(f"{len(kernels)} kernels do not split into {replays} equal replays; pass --replays")
    if not 0 <= which < replays:
        raise SystemExit(f"--replay {which} is not one of the {replays} replays (0 to {replays - 1})")
    n = len(kernels) // replays
    return kernels[which * n:(which + 1) * n]


def summary(replay: list[dict], top: int = 15) -> str:
    t0 = replay[0]["ts"]
    span = max(e["ts"] + e["dur"] for e in replay) - t0
    lines = [f"one replay: {span:.1f} µs from the first kernel's start to the last one's end, {len(replay)} kernels"]
    by_stream: dict = defaultdict(list)
    for e in replay:
        by_stream[e.get("args", {}).get("stream", "?")].append(e)
    for stream, es in sorted(by_stream.items(), key=lambda kv: kv[1][0]["ts"]):
        busy = sum(e["dur"] for e in es)
        first, last = es[0]["ts"] - t0, es[-1]["ts"] + es[-1]["dur"] - t0
        lines.append(f"stream {stream}: {len(es)} kernels, {first:.1f}-{last:.1f} µs, busy {busy:.1f} µs")
    totals: dict = defaultdict(lambda: [0, 0.0])
    for e in replay:
        totals[e["name"]][0] += 1
        totals[e["name"]][1] += e["dur"]
    lines.append(f"{'µs':>9} {'calls':>5} {'µs/call':>8}  kernel")
    for name, (calls, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{total:9.1f} {calls:5d} {total / calls:8.2f}  {name[:100]}")
    return "\n".join(lines)


def in_order(replay: list[dict]) -> str:
    """Each kernel: start (µs from the replay's first), duration, the gap since the last kernel on
    its stream ended, stream, name, grid."""
    t0, ends, lines = replay[0]["ts"], {}, []
    for e in replay:
        args = e.get("args", {})
        stream, start = args.get("stream", "?"), e["ts"] - t0
        gap = start - ends.get(stream, start)
        ends[stream] = start + e["dur"]
        lines.append(f"{start:9.1f} {e['dur']:7.1f} gap {gap:6.1f} s{stream} {e['name'][:80]} {args.get('grid', '')}")
    return "\n".join(lines)


def period(replay: list[dict], name_part: str) -> tuple[int, list[float]]:
    """(launches, the intervals in µs between successive starts) of the kernels whose name
    contains `name_part`: with a kernel that runs once a layer, each layer's time."""
    starts = [e["ts"] for e in replay if name_part in e["name"]]
    return len(starts), [b - a for a, b in itertools.pairwise(starts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="a trace_<graph>.json from profile_generate.py --trace")
    ap.add_argument("--replays", type=int, default=3, help="replays in the trace (profile_generate.py writes 3)")
    ap.add_argument("--replay", type=int, default=1, help="which replay to read (0-based; default the middle one)")
    ap.add_argument("--top", type=int, default=15, help="kernels in the by-time table")
    ap.add_argument("--list", action="store_true", help="also every kernel of the replay in launch order")
    ap.add_argument("--period", metavar="NAME_PART", default=None,
                    help="the intervals between launches of kernels whose name contains this (a layer's time)")
    args = ap.parse_args()
    replay = one_replay(load_kernels(args.trace), args.replays, args.replay)
    print(summary(replay, args.top))
    if args.period:
        launches, gaps = period(replay, args.period)
        print(f"{args.period}: {launches} launches; intervals (µs): " + " ".join(f"{g:.0f}" for g in gaps))
    if args.list:
        print(in_order(replay))


if __name__ == "__main__":
    main()
