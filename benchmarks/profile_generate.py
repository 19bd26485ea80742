"""Profile a few decoding steps of the Generator (where does a byte's time go?).

    python benchmarks/profile_generate.py --preset blt-1b --batch 1
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import SAMPLE_TEXT, calibrate_threshold, random_model, with_threshold
from generate import prompts_of

from bltkit import generate, kernels
from bltkit.bytes import encode
from bltkit.generate import Generator


def host_gap(gen: Generator, prompts, steps: int) -> None:
    """What the host's per-byte decision costs below PATCH_EVERY_BYTE_ROWS rows: the patch step
    runs only when some row closes a patch, and the host learns that by reading a flag back after
    each byte's front (a sync, `Generator._host_branch`), then launches the next graph while the GPU
    waits. A second call
    records those decisions; a third takes them from the record instead (greedy decoding is
    deterministic, so the same bytes and steps), which leaves the host free to run ahead. The
    difference is what the byte graph's conditional node (Generator(byte_graph=True)) could win
    at most."""
    real = []
    for _ in range(2):
        gen.generate_ids(prompts, steps, stop_at_eos=False)
        real.append(gen.stats["decode_s"])
    schedule: list[bool] = []
    host = gen._host_branch

    def record(body):
        schedule.append(bool(gen.any_close))
        if schedule[-1]:
            body()

    gen._host_branch = record
    want = gen.generate_ids(prompts, steps, stop_at_eos=False)
    replayed = []
    for _ in range(2):
        it = iter(schedule)
        gen._host_branch = lambda body, it=it: body() if next(it) else None
        got = gen.generate_ids(prompts, steps, stop_at_eos=False)
        replayed.append(gen.stats["decode_s"])
        assert got == want, "the scheduled steps gave other bytes"
    gen._host_branch = host
    a, b = min(real) / steps * 1e3, min(replayed) / steps * 1e3
    print(f"  host decisions: {a:.3f} ms/step with a sync a byte, {b:.3f} replayed from the schedule "
          f"({sum(schedule)} patch steps in {len(schedule)} decisions): {(a - b) * 1e3:.1f} µs a byte "
          f"({(a - b) / a:.1%})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt length in ids (BOS included)")
    ap.add_argument("--variants", default="graphs,eager,compile",
                    help="which decoders to time: graphs (CUDA graphs), eager, compile (graphs + torch.compile), "
                         "kernels (graphs + bltkit.kernels' Triton block steps, with the defaults of "
                         "generate.ATTEND_KERNEL and LINEAR_KERNEL), kernels-attend (kernels with "
                         "kernels.attend for the attention: ATTEND_KERNEL = True), kernels-linear "
                         "(kernels.linear_add on, attend off), kernels-both (both on), kernels-plain "
                         "(both off), speculate "
                         "(kernels + Generator(speculate=True): the decoder beside the entropy model); "
                         "only speculate speculates; kernels-nosplit, speculate-nosplit: those with "
                         "kernels.ATTEND_PROGRAMS = 1 (no attention split over programs, no combining kernel); "
                         "kernels-nooverlap: kernels with Generator(overlap=False) (batches of "
                         "generate.PATCH_EVERY_BYTE_ROWS or more: the global step after the entropy model, "
                         "not beside it); kernels-byte, speculate-byte: those with a byte's steps as one CUDA "
                         "graph, the patch step in a conditional node (Generator(byte_graph=True): no host "
                         "sync a byte below generate.PATCH_EVERY_BYTE_ROWS rows); kernels-sched, "
                         "speculate-sched: those timed once more with the host's patch-step decisions "
                         "replayed from a recorded schedule, without reading the flag back each byte (what "
                         "the host's sync and launches between a byte's graphs cost; see host_gap); "
                         "kernels-nodecnorms: kernels without the decoder's fused residual norms past "
                         "generate.KERNEL_MAX_ROWS rows (DECODER_NORMS = False); kernels-nobounds: kernels with "
                         "the global step's additive mask, not its attention's bounds (GLOBAL_BOUNDS = False); "
                         "kernels-nopriority: kernels with every stream at the default priority "
                         "(STREAM_PRIORITY = False); kernels-noropeattend: kernels with RoPE and the cache "
                         "writes apart from the attention past generate.KERNEL_MAX_ROWS rows (ROPE_ATTEND = False); "
                         "kernels-noringbounds: kernels with the rings' additive masks, not their attention's "
                         "bounds (RING_BOUNDS = False); kernels-nohash: kernels with the byte's embedding by "
                         "PyTorch's ops, not kernels.hash_embed (HASH_EMBED = False); kernels-nocrossq: kernels "
                         "with the decoder's cross-attention after cuBLAS's q product, not kernels.cross_attend "
                         "(CROSS_ATTEND = False); kernels-nosidecounts: kernels with the patch step's counts on the "
                         "chain, not beside the decoder (SIDE_COUNTS = False); kernels-nostep: kernels with "
                         "the byte's advance and feed by PyTorch's ops (STEP_KERNELS = False); kernels-smsN "
                         "(N a number): kernels with the entropy model's stream on N SMs, a CUDA green context "
                         "(ENTROPY_SMS = N; overlapping batches only). A variant that fails (a green context "
                         "this PyTorch lacks) is reported and the next one runs")
    ap.add_argument("--table-kernels", action="store_true",
                    help="the per-graph kernel tables for Generator(kernels=True)")
    ap.add_argument("--table-speculate", action="store_true",
                    help="the per-graph tables for Generator(speculate=True) (its speculative graph)")
    ap.add_argument("--table-attend", action="store_true", help="the tables with kernels.attend (ATTEND_KERNEL)")
    ap.add_argument("--table-plain", action="store_true",
                    help="the tables without kernels.linear_add (LINEAR_KERNEL, on by default)")
    ap.add_argument("--trace", metavar="DIR", default=None,
                    help="also write each graph's kernels in launch order, 3 replays, as a Chrome trace "
                         "(DIR/trace_<graph>.json: names, streams, start times, durations, grids; "
                         "benchmarks/trace_summary.py summarises one)")
    ap.add_argument("--no-tables", action="store_true", help="time the variants only (no per-graph times and tables)")
    ap.add_argument("--at", type=int, default=16,
                    help="the tables and traces start from the state this many bytes into the generation (the "
                         "caches grow: the grid's batch-64 step costs ~2.28 ms at the start and ~2.65 after 128 "
                         "bytes, twenty-sixth session)")
    ap.add_argument("--grid-prompts", action="store_true",
                    help="the grid's distinct prompts (benchmarks/generate.py's), not one prompt repeated")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = ("ATTEND_KERNEL", "LINEAR_KERNEL", "DECODER_NORMS", "GLOBAL_BOUNDS", "STREAM_PRIORITY", "ROPE_ATTEND",
             "RING_BOUNDS", "HASH_EMBED", "CROSS_ATTEND", "SIDE_COUNTS",
             "STEP_KERNELS", "ENTROPY_SMS")
    defaults = {k: getattr(generate, k) for k in names}
    # the module constants the kernel variants set; the others keep the defaults
    switched = {"kernels-attend": {"ATTEND_KERNEL": True}, "kernels-linear": {"ATTEND_KERNEL": False, "LINEAR_KERNEL": True},
                "kernels-both": {"ATTEND_KERNEL": True, "LINEAR_KERNEL": True},
                "kernels-plain": {"ATTEND_KERNEL": False, "LINEAR_KERNEL": False},
                "kernels-nodecnorms": {"DECODER_NORMS": False}, "kernels-nobounds": {"GLOBAL_BOUNDS": False},
                "kernels-nopriority": {"STREAM_PRIORITY": False}, "kernels-noropeattend": {"ROPE_ATTEND": False},
                "kernels-noringbounds": {"RING_BOUNDS": False}, "kernels-nohash": {"HASH_EMBED": False},
                "kernels-nocrossq": {"CROSS_ATTEND": False}, "kernels-nosidecounts": {"SIDE_COUNTS": False},
                "kernels-nostep": {"STEP_KERNELS": False}}
    variants = {"graphs": (True, False, False, False), "eager": (False, False, False, False),
                "compile": (True, True, False, False), "kernels": (True, False, True, False),
                "speculate": (True, False, True, True)}
    variants.update(dict.fromkeys(switched, variants["kernels"]))
    variants.update({"kernels-nosplit": variants["kernels"], "speculate-nosplit": variants["speculate"],
                     "kernels-nooverlap": variants["kernels"], "kernels-byte": variants["kernels"],
                     "speculate-byte": variants["speculate"], "kernels-sched": variants["kernels"],
                     "speculate-sched": variants["speculate"]})
    for name in args.variants.split(","):  # kernels-smsN: the entropy model on N SMs
        if name.startswith("kernels-sms") and name[len("kernels-sms"):].isdigit():
            switched[name] = {"ENTROPY_SMS": int(name[len("kernels-sms"):])}
            variants[name] = variants["kernels"]
    unknown = [name for name in args.variants.split(",") if name not in variants]
    if unknown:
        ap.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(variants)} or kernels-smsN")
    dev = "cuda"
    model = random_model(args.preset, args.overrides, dev, torch.bfloat16)
    calib = torch.tensor([encode(SAMPLE_TEXT * 4)], device=dev)
    with_threshold(model, calibrate_threshold(model, calib, 4.5))
    text = (SAMPLE_TEXT * (args.prompt_len // len(SAMPLE_TEXT) + 2)).encode()
    prompts = prompts_of(args.prompt_len, args.batch) if args.grid_prompts else [text[:args.prompt_len - 1]] * args.batch
    programs = kernels.ATTEND_PROGRAMS
    gen = None
    for name in args.variants.split(","):
        gen = None  # the last variant's graphs and caches freed first
        gc.collect()
        torch.cuda.empty_cache()
        graphs, comp, kern, spec = variants[name]
        for k, v in {**defaults, **switched.get(name, {})}.items():  # read when a Generator is made
            setattr(generate, k, v)
        kernels.ATTEND_PROGRAMS = 1 if name.endswith("-nosplit") else programs  # read as graphs are captured
        t = time.perf_counter()
        overlap = not name.endswith("-nooverlap")
        byte_graph = name.endswith("-byte")
        try:
            gen = Generator(model, cuda_graphs=graphs, compile=comp, kernels=kern, speculate=spec, overlap=overlap,
                            byte_graph=byte_graph)
            gen.generate_ids(prompts, 16, stop_at_eos=False)
        except RuntimeError as e:  # e.g. no green context here: the other variants still run
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        t_warm = time.perf_counter() - t
        gen.generate_ids(prompts, args.steps, stop_at_eos=False)
        s = gen.stats
        print(f"{name}: cuda graphs {graphs} compile {comp} kernels {kern} speculate {spec} overlap "
              f"{gen.overlapping} byte graph {gen.byte_graph}: {s['decode_s'] / max(1, args.steps) * 1e3:.2f} ms/step decode "
              f"(first call {t_warm:.1f}s), patches {s['patches']} over {s['bytes_read']} bytes", flush=True)
        if name.endswith("-sched"):
            host_gap(gen, prompts, args.steps)
    if args.no_tables:
        return
    for k, v in defaults.items():  # the tables: the defaults, with the two table options
        setattr(generate, k, v)
    generate.ATTEND_KERNEL = defaults["ATTEND_KERNEL"] or args.table_attend
    generate.LINEAR_KERNEL = defaults["LINEAR_KERNEL"] and not args.table_plain
    torch.set_grad_enabled(False)  # the steps below are called directly, outside generate's no_grad
    # the steps below advance the generator's state (byte position, patches): each phase starts
    # from a state taken --at bytes into a generation of --at + 112, with room for ~110 more steps (a
    # state taken at the end has none: the next step indexes past the caches, the device-side
    # assert of the fifth and sixth sessions' runs)
    # one graph per launch (byte_graph=False), each timed and tabled on its own
    gen = Generator(model, cuda_graphs=True, kernels=args.table_kernels, speculate=args.table_speculate,
                    byte_graph=False)
    saved = {}

    def keep(row, tok, close):
        if row == 0 and not saved and int(gen.n) >= len(prompts[0]) + args.at:
            saved.update({k: v.clone() for k, v in gen._state_tensors().items()}, g_used=gen.g_used)

    gen.generate_ids(prompts, args.at + 112, stop_at_eos=False, on_step=keep)
    g_used = saved.pop("g_used")
    snapshot = saved

    def restore():
        for k, v in gen._state_tensors().items():
            v.copy_(snapshot[k])
        gen.g_used = g_used

    # the step-function sequences a byte launches (Generator._launches: speculating, the steps
    # before the branch, with the last byte's after it first, the branch, the steps after it;
    # overlapping, one: front_patch, back and the feed)
    launches = gen._launches()

    def slots(launch):
        return gen._global_slots() if generate._SLOT_STEPS.intersection(launch) else None

    for launch in launches:
        name, L = "+".join(launch), slots(launch)
        restore()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            gen._calls(launch, L)
        torch.cuda.synchronize()
        print(f"eager {name}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms", flush=True)
        restore()
        gen._prepare_graphs()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            gen._launch(launch, L)
        torch.cuda.synchronize()
        print(f"graph {name}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms", flush=True)
    graphs = {"+".join(launch): gen.graphs[launch][slots(launch)] if slots(launch) else gen.graphs[launch]
              for launch in launches}
    for name, graph in graphs.items():  # one kernel table per launch
        restore()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
        events = prof.key_averages()
        n_kernels = sum(e.count for e in events) / 10
        print(f"== kernels of the {name} graph (10 replays; {n_kernels:.0f} kernels a replay)")
        print(events.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
        if args.trace:
            restore()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"trace_{name.replace('+', '_')}.json"))


if __name__ == "__main__":
    main()
