"""`blt eval` and `blt data` subcommands: argument definitions (torch-free) and handlers.

The handlers import bltkit's torch code lazily so that `blt --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .dtypes import DTYPES

# -- eval -----------------------------------------------------------------------------------------


def add_eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    b = sub.add_parser("bpb", help="bits per byte of a model on text files",
                       description="Bits per byte on each source and overall. Documents are encoded "
                       "BOS + bytes + EOS and BOS/EOS targets count, as in Meta's evaluation.")
    b.add_argument("files", nargs="+", metavar="FILE",
                   help="text files, folders, .jsonl, .parquet or save_to_disk folders")
    b.add_argument("--model", default=None, help="BLT or entropy-model directory (default: the bundled model)")
    b.add_argument("--seq-len", type=int, default=None,
                   help="bytes per window, >= 1 (default: min(max_bytes, 4096, max_patches - 1) for a BLT, "
                        "max_seqlen for an entropy model)")
    b.add_argument("--batch-size", type=int, default=8, help="windows per forward, >= 1 (default 8)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    b.add_argument("--text-field", default="text", help="field/column of .jsonl/.parquet/arrow data")
    b.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="score only the first N bytes of each source (documents in order, the last one "
                        "cut); the output says so")
    b.add_argument("--json", action="store_true", help="print the result dictionary as JSON")
    b.add_argument("--baseline", default=None, metavar="HF_MODEL",
                   help="also a tokenized (BPE) transformers causal LM on the same documents, in the same "
                        "bits per byte (a folder, or a hub id where there is a network; bltkit.eval.baseline)")
    b.add_argument("--baseline-seq-len", type=int, default=None, metavar="TOKENS",
                   help="the baseline's tokens a window (default: its position limit, at most 4096)")
    t = sub.add_parser("tasks", help="downstream tasks with lm-evaluation-harness (pip install 'bltkit[eval]')",
                       description="Runs lm-evaluation-harness tasks (hellaswag, arc_easy, piqa, ...) on a "
                       "bltkit model, on bytes: log-likelihoods from the model's forward, generation with "
                       "bltkit's Generator. The tasks' datasets come from the Hugging Face hub (a network, "
                       "or its cache) or from a folder of task YAMLs (--include-path).")
    t.add_argument("--tasks", required=True, help="comma-separated task or group names")
    t.add_argument("--model", default=None,
                   help="BLT directory (default: the bundled model); an entropy model's serves scoring tasks only")
    t.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    t.add_argument("--limit", type=float, default=None,
                   help="documents a task, or a share of them below 1 (for a quick look; not comparable scores)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences a forward, rows a generate call (default 8)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default fp32)")
    t.add_argument("--include-path", default=None, help="a folder of task YAMLs of your own")
    t.add_argument("--seed", type=int, default=0, help="few-shot sampling, generation and noise seed (default 0)")
    t.add_argument("--noise", default=None, metavar="KIND[:P]",
                   help="perturb every context before the model reads it, for robustness: antspeak, drop[:0.1], "
                        "randomcase[:0.5], repeat[:0.2], uppercase (the BLT paper's noised benchmarks; "
                        "bltkit.eval.noise)")
    t.add_argument("--output", default=None, metavar="FILE", help="also write the harness's results as JSON")


def _device(name: str | None) -> str:
    if name is not None:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_eval(args) -> None:
    if args.eval_command == "tasks":
        _eval_tasks(args)
        return
    from .eval.bpb import evaluate_bpb

    if args.model is None:
        from .bundled import bundled_model_dir

        args.model = str(bundled_model_dir())
    if args.baseline is None and args.baseline_seq_len is not None:
        raise ValueError("--baseline-seq-len sets the window of a --baseline model: give --baseline too")
    baseline = None
    if args.baseline is not None:  # first: what it cannot read is refused before the BLT's run
        from .eval.baseline import baseline_bpb, load_baseline

        model, tokenizer = load_baseline(args.baseline, device=_device(args.device))
        baseline = {"model": args.baseline, **baseline_bpb(
            model, tokenizer, args.files, seq_len=args.baseline_seq_len, batch_size=args.batch_size,
            text_field=args.text_field, max_bytes=args.max_bytes)}
        del model, tokenizer
    result = evaluate_bpb(args.model, args.files, seq_len=args.seq_len, batch_size=args.batch_size,
                          device=_device(args.device), text_field=args.text_field, max_bytes=args.max_bytes)
    if baseline is not None:
        result["baseline"] = baseline
    if args.json:
        print(json.dumps(result, indent=2))
        return
    width = max(len("overall"), *(len(f["path"]) for f in result["files"]))
    for row in [*result["files"], {"path": "overall", **result["overall"]}]:
        patch = f"  {row['mean_patch_len']:5.2f} bytes/patch" if row.get("mean_patch_len") else ""
        print(f"{row['path']:<{width}}  {row['bytes']:>13,} bytes{patch}  {row['bpb']:.3f} bpb")
    cap = f"; only the first {result['max_bytes']:,} bytes of each source" if result["max_bytes"] else ""
    print(f"({result['note']}; windows of {result['seq_len']} bytes{cap})")
    if "baseline" in result:
        base = result["baseline"]
        print(f"baseline {base['model']} (tokens; windows of {base['seq_len']} tokens):")
        for row in [*base["files"], {"path": "overall", **base["overall"]}]:
            per = f"  {row['bytes_per_token']:5.2f} bytes/token" if "bytes_per_token" in row else ""
            print(f"{row['path']:<{width}}  {row['bytes']:>13,} bytes{per}  {row['bpb']:.3f} bpb")
        print(f"(the baseline's nats over the same count of bytes, BOS and EOS included; BLT / baseline: "
              f"{result['overall']['bpb'] / base['overall']['bpb']:.3f})")


def check_output_file(flag: str, path) -> Path:
    """A command's output file, checked before its work: a file in an existing folder."""
    out = Path(path)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"{flag} {out}: give a file in an existing folder")
    return out


def _eval_tasks(args) -> None:
    # (the module imports without lm-eval; evaluate_tasks then says what to install)
    from .eval.harness import evaluate_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.output is not None:  # checked before the evaluation, not after it
        check_output_file("--output", args.output)
    try:
        result = evaluate_tasks(args.model, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                batch_size=args.batch_size, device=_device(args.device), dtype=args.dtype,
                                include_path=args.include_path, seed=args.seed, noise=args.noise)
    except ImportError as e:
        raise ValueError(str(e)) from None
    from lm_eval.utils import make_table

    print(make_table(result))
    if args.output:
        from lm_eval.utils import handle_non_serializable

        with open(args.output, "w") as f:
            json.dump({k: result[k] for k in ("results", "versions", "n-shot", "config") if k in result}, f,
                      indent=2, default=handle_non_serializable)


# -- data -----------------------------------------------------------------------------------------


def add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    pr = sub.add_parser("prepare", help="tokenise, split and precompute entropies for training",
                        description="Tokenise and split the data and store every byte's entropy under "
                        "the frozen entropy model, so training skips the entropy model. Pass the output "
                        "folder as the training data path.")
    pr.add_argument("--entropy-model", required=True, help="entropy-model (or BLT) directory")
    pr.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files, folders or datasets")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--seq-len", type=int, default=2048, help="training bytes per row, recorded (default 2048)")
    pr.add_argument("--val-fraction", type=float, default=0.01, help="share held out for validation, in [0, 1); 0: none (default 0.01)")
    pr.add_argument("--val-max-bytes", type=int, default=2_000_000, help="cap on validation bytes, >= 1 (default 2,000,000)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    pr.add_argument("--text-field", default="text", help="field/column of .jsonl/.parquet/arrow data")
    pr.add_argument("--device", default=None, help="where the entropy model runs (default: cuda if available)")
    pr.add_argument("--batch-size", type=int, default=8, help="rows of max_seqlen bytes per forward, >= 1 (default 8)")
    st = sub.add_parser("stats", help="documents, bytes, non-ASCII share (and xz baseline) of sources")
    st.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or datasets")
    st.add_argument("--xz", action="store_true", help="also xz -9e bits per byte (slow: about 1 MB/s)")
    st.add_argument("--text-field", default="text", help="field/column of .jsonl/.parquet/arrow data")
    st.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_data(args) -> None:
    if args.data_command == "prepare":
        _prepare(args)
    else:
        _stats(args)


def _prepare(args) -> None:
    from .data import DataConfig, prepare

    cfg = DataConfig(paths=args.data, text_field=args.text_field, seq_len=args.seq_len,
                     val_fraction=args.val_fraction, val_max_bytes=args.val_max_bytes, seed=args.seed)
    info = prepare(cfg, args.entropy_model, args.out, device=_device(args.device), batch_size=args.batch_size)
    tr, va = info["train"], info["val"]
    print(f"wrote {args.out}: train {tr['documents']:,} documents, {tr['bytes']:,} bytes; val "
          f"{va['documents']:,} documents, {va['bytes']:,} bytes; entropies at "
          f"{info['bytes_per_second']:,} bytes/s on {info['device']}")


def source_stats(path: str, text_field: str = "text", xz: bool = False) -> dict:
    """Documents, bytes, share of non-ASCII bytes and optionally xz -9e bits per byte of a source
    (xz compresses the documents joined by blank lines, as the corpus files store them)."""
    import lzma

    import numpy as np

    from .data import iter_documents

    docs = n_bytes = non_ascii = 0
    comp = lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME) if xz else None
    packed = 0
    for doc in iter_documents(path, text_field):
        if comp is not None:
            packed += len(comp.compress(b"\n\n" + doc if docs else doc))
        docs += 1
        n_bytes += len(doc)
        non_ascii += int(np.count_nonzero(np.frombuffer(doc, np.uint8) >= 0x80))
    out = {"path": path, "documents": docs, "bytes": n_bytes, "non_ascii": non_ascii / n_bytes}
    if comp is not None:
        out["xz_bpb"] = 8 * (packed + len(comp.flush())) / n_bytes
    return out


def _stats(args) -> None:
    rows = [source_stats(p, args.text_field, args.xz) for p in args.paths]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["path"]) for r in rows)
    for r in rows:
        xz = f"  xz {r['xz_bpb']:.3f} bpb" if "xz_bpb" in r else ""
        print(f"{r['path']:<{width}}  {r['documents']:>9,} docs  {r['bytes']:>13,} bytes  "
              f"{100 * r['non_ascii']:5.1f}% non-ASCII{xz}")
