"""A short size sweep for the bundled BLT: which shape learns most in the same steps, how fast each
steps, and which fit the shipped-size cap (issue 5: "pick the sizes that give the best bits per
byte for the time available; measure, don't guess").

Each candidate is a set of `key=value` overrides on top of the base run settings (the bundled
recipe's, passed by `scripts/train_bundled.sh sweep`). Its shipped size (BLT and entropy model in
bf16) is computed first and a candidate over the cap is skipped, not trained. The others train
for the same number of steps on the same data with the same frozen entropy model, one after the
other, and the table gives per candidate: parameters, shipped MB, median step time, validation bits
per byte at the end, and the steps it would make in the shipped run's time (the shipped steps x
the shipped shape's step time / its own). A candidate is better for the time available when its
validation bpb is lower and its step time is not higher; where the two disagree the table shows
the trade, and a longer run of the two settles it.

    python scripts/size_sweep.py --data data/main/train.txt --entropy-model runs/b8/ent/model \\
        --out runs/sweep --steps 600 --args "train.seq_len=4096 train.batch_size=32 ..."
    SMOKE=1 scripts/train_bundled.sh sweep        # the same plumbing with tiny models on a CPU
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

# on top of the base settings (which hold the shipped shape: global 4 x 384, 6,144 hash rows, the
# winner of the ninth session's sweep); each trades global depth or width, hash rows or decoder
# depth against the others near the cap, and sets every shape key it changes, so a candidate
# means the same whatever the base
CANDIDATES = {
    "shipped": "",
    "global-6x384-hash4k": "model.global_transformer.n_layers=6 model.hash_vocab=4096",
    "global-8x384-hash2k": "model.global_transformer.n_layers=8 model.hash_vocab=2048",
    "global-4x512-hash2k": "model.global_transformer.dim=512 model.global_transformer.n_heads=8 "
                           "model.global_transformer.n_layers=4 model.hash_vocab=2048",
    "decoder-6-global-5": "model.decoder.n_layers=6 model.global_transformer.n_layers=5 model.hash_vocab=4096",
}


def shipped_bytes(preset: str, overrides: list[str]) -> tuple[int, int]:
    """(parameters, bytes in bf16) of the BLT with its entropy model, as `blt convert --dtype bf16`
    ships them (safetensors headers and config files add a few kB)."""
    from bltkit.config import apply_overrides
    from bltkit.flops import count_params
    from bltkit.presets import get_preset

    cfg = apply_overrides(get_preset(preset), [t.removeprefix("model.") for t in overrides if t.startswith("model.")])
    pc = count_params(cfg)
    n = sum(vars(pc).values())
    return n, 2 * n


def run_candidate(name: str, overrides: list[str], args) -> dict:
    out = Path(args.out) / name
    cmd = [sys.executable, "-m", "bltkit", "train", "--preset", args.preset, "--data", *args.data,
           "--out", str(out), "--entropy-model", args.entropy_model, "--resume", "never",
           *shlex.split(args.args), *overrides, f"train.steps={args.steps}",
           f"train.eval_every={args.steps}", "train.ckpt_every=1000000000"]
    print("$ " + shlex.join(cmd), flush=True)
    shutil.rmtree(out, ignore_errors=True)  # this sweep's own run of an earlier call: start again
    log_path = Path(args.out) / f"{name}.log"
    with log_path.open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{name}: blt train failed (exit {done.returncode}); the end of {log_path}:\n{tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r["val_bpb"] for r in rows if "val_bpb" in r]
    if not val:
        raise SystemExit(f"{name}: no validation bpb in {out}/metrics.jsonl (train.eval_batches=0?)")
    ms = statistics.median(r["step_ms"] for r in rows[len(rows) // 4:] if r.get("step_ms"))  # past the compiles
    return {"val_bpb": val[-1], "train_bpb": rows[-1]["bpb"], "step_ms": ms,
            "mean_patch": rows[-1].get("mean_patch_len")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="training text files")
    ap.add_argument("--entropy-model", required=True, help="the frozen patcher (calibrated threshold in --args)")
    ap.add_argument("--out", required=True, help="folder for one run per candidate, logs and sweep.json")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--args", default="", help="base key=value settings, as one string")
    ap.add_argument("--steps", type=int, default=600, help="steps per candidate (default 600)")
    ap.add_argument("--cap", type=float, default=60e6, help="shipped bytes allowed (default 60 MB)")
    ap.add_argument("--shipped-steps", type=int, default=6400, help="the shipped run's steps, for the last column")
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="instead of the built-in candidates (repeat; the first is the reference)")
    ap.add_argument("--only", nargs="+", help="run only these built-in candidates; the results of the others "
                    "from earlier calls (OUT/sweep.json) stay in the table")
    ap.add_argument("--table", action="store_true", help="print the table of OUT/sweep.json and stop")
    args = ap.parse_args()
    cands = dict(c.split("=", 1) for c in args.candidate) if args.candidate else dict(CANDIDATES)
    order = list(cands)  # the table's order; its first candidate with a result is the reference
    saved = Path(args.out) / "sweep.json"
    # a sweep split over several calls (--only): the earlier calls' results stay; a full sweep
    # starts afresh
    results = json.loads(saved.read_text()) if saved.exists() and (args.only or args.table) else {}
    if args.table:
        if not results:
            raise SystemExit(f"no results in {saved}")
        return print_table(results, order, args)
    if args.only:
        unknown = set(args.only) - set(cands)
        if unknown:
            ap.error(f"unknown candidates {sorted(unknown)}; known: {', '.join(cands)}")
        cands = {k: v for k, v in cands.items() if k in args.only}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = shlex.split(args.args)
    for name, extra in cands.items():
        overrides = shlex.split(extra)
        n, size = shipped_bytes(args.preset, base + overrides)
        r = {"overrides": extra, "params": n, "shipped_bytes": size, "steps": args.steps}
        if size > args.cap:
            print(f"{name}: {size / 1e6:.1f} MB in bf16, over the {args.cap / 1e6:.0f} MB cap: skipped", flush=True)
            r["skipped"] = "over the cap"
        else:
            r.update(run_candidate(name, overrides, args))
            print(f"{name}: val bpb {r['val_bpb']:.4f}, {r['step_ms']:.0f} ms a step", flush=True)
        results[name] = r
        saved.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results, order, args)


def print_table(results: dict, order: list[str], args) -> None:
    """The sweep's markdown table, candidates in `order` (then any others of an earlier sweep)."""
    names = [n for n in order if n in results] + [n for n in results if n not in order]
    ref_name = next(n for n in names if "step_ms" in results[n])
    ref = results[ref_name]
    steps = sorted({r.get("steps", args.steps) for r in results.values()})
    print(f"\n{' / '.join(map(str, steps))} steps each"
          f"{' (NOT the same for all: compare with care)' if len(steps) > 1 else ''}; last column: steps in "
          f"the time {ref_name} takes for {args.shipped_steps}")
    print("| candidate | parameters | shipped MB | ms a step | val bpb | steps in the same time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        r = results[name]
        if "skipped" in r:
            print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['shipped_bytes'] / 1e6:.1f} | - | skipped: {r['skipped']} | - |")
        else:
            same_time = args.shipped_steps * ref["step_ms"] / r["step_ms"]
            print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['shipped_bytes'] / 1e6:.1f} | {r['step_ms']:.0f} | "
                  f"{r['val_bpb']:.4f} | {same_time:,.0f} |")


if __name__ == "__main__":
    main()
