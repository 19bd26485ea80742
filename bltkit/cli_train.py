"""`blt train` subcommand: argument definitions (torch-free) and the handler.

The same command runs under `torchrun --nproc_per_node=N -m bltkit train ...` (FSDP2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a BLT (presets tiny, small, blt-1b, blt-7b) or an entropy model (entropy-tiny, "
                     "entropy-small, entropy-100m) on raw bytes. Settings: preset < --config run.toml "
                     "< key=value tokens, e.g. train.steps=200 optim.lr=1e-3 model.patcher.mode=space. "
                     "--init-from DIR (or bundled) fine-tunes an existing model instead of a preset.")
    p.add_argument("--preset", default=None,
                   help="model preset; omitted with --init-from, or to resume --out from its config.json")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files, folders, .jsonl/.parquet data, or one `blt data prepare` folder")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run directory: config.json, env.json, metrics.jsonl, checkpoints/, model/")
    p.add_argument("--entropy-model", default=None, metavar="DIR",
                   help="frozen patcher for a BLT with patcher.mode=entropy (an entropy-model directory, "
                        "or a BLT directory that carries one); not needed with train.patching=precomputed; "
                        "a resumed run keeps its own copy, RUN_DIR/entropy_model")
    p.add_argument("--init-from", default=None, metavar="DIR|bundled",
                   help="fine-tune: start from this model directory's weights and architecture (instead of "
                        "--preset); its entropy model patches unless --entropy-model says otherwise. Same as "
                        "train.init_from=DIR")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto (default): continue from the newest complete checkpoint in RUN_DIR; "
                        "never: refuse a RUN_DIR that holds checkpoints")
    p.add_argument("--config", default=None, metavar="RUN.TOML",
                   help="TOML file: optional `preset = ...` and [model]/[data]/[optim]/[train] tables")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides such as train.steps=200 optim.lr=1e-3 model.global_transformer.n_layers=4")


def split_data_and_overrides(data: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """`--data a.txt train.steps=5` puts the override into --data (nargs="+"); move back any
    `section.key=value` token that is not an existing file."""
    if not data:
        return data, overrides
    paths = [d for d in data if not (_OVERRIDE.match(d) and not Path(d).exists())]
    moved = [d for d in data if d not in paths]
    return paths or None, [*moved, *overrides]


def cmd_train(args) -> None:
    from .train import resolve_config, train

    data, overrides = split_data_and_overrides(args.data, args.overrides)
    if args.init_from is not None:
        overrides = [f"train.init_from={args.init_from}", *overrides]
    run = resolve_config(args.preset, data, args.config, overrides, entropy_model=args.entropy_model,
                         run_dir=args.out)
    try:
        train(run, args.out, entropy_model=args.entropy_model, resume=args.resume, argv=sys.argv)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_note(Path(args.out), args.resume), file=sys.stderr, flush=True)
        raise


def interrupted_note(run_dir: Path, resume: str) -> str:
    """What Ctrl-C left: no checkpoint is written on an interrupt (one cut short leaves a temp dir
    that the next start deletes), so the run goes on from the newest complete one."""
    from .distributed import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return "interrupted before the first checkpoint: the same command starts the run over"
    again = "the same command" if resume == "auto" else "the same command without --resume never"
    return (f"interrupted: the last checkpoint is step {int(ckpt.name[5:])} ({ckpt}); {again} resumes "
            "from it (later steps are trained again)")
