"""Training a BLT or its entropy model: the loop and resumable checkpoints (style §8); the run's
configuration (`RunConfig`, `resolve_config`) is in `bltkit.run_config`.

`train(run, run_dir)` reads top to bottom: setup (process group, model on meta, activation
checkpointing, compile, FSDP2, optimizer, data, resume), then `for step in ...` (accumulate,
clip, step, schedule, log, eval, checkpoint), then teardown. The loss is Meta's (spec §12): summed
next-byte cross-entropy over targets != 0 divided by their count, here over the whole global batch.
Checkpoints (`RUN_DIR/checkpoints/step_NNNNNN/`) are DCP directories written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed
from .checkpoint import (
    ENTROPY_DIR,
    CheckpointError,
    check_output_dir,
    check_state,
    load_entropy_model,
    load_state,
    save_model,
    verify_sums,
)
from .config import (
    BLTConfig,
    EntropyModelConfig,
    to_dict,
)
from .data import BatchLoader, build_streams
from .metrics import LogWindow, MetricsLogger, StepTimer, env_info
from .model.patching import starts_to_lengths
from .optim import build_optimizer, build_scheduler, clip_and_step
from .run_config import (  # (the run configuration lives there; these names are bltkit.train's API too)
    SECTIONS,
    RunConfig,
    TrainConfig,
    apply_run_overrides,
    default_entropy_dir,
    init_model_dir,
    resolve_config,
    toml_overrides,
)


def build_model(cfg: BLTConfig | EntropyModelConfig, device: torch.device, seed: int, entropy_model=None):
    """On the meta device, materialised on `device`, initialised (spec §6.7); a given entropy
    model's weights replace the BLT's (frozen, fp32)."""
    from .model import BLT, EntropyModel

    with torch.device("meta"):
        model = BLT(cfg) if isinstance(cfg, BLTConfig) else EntropyModel(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    if entropy_model is not None:
        model.entropy_model.load_state_dict(entropy_model.state_dict())
        model.entropy_model.float().requires_grad_(False)
    return model


def _load_init(model, path: Path, dev: torch.device) -> None:
    """Start from the weights in `path` (fp32 master weights, whatever they were stored in). The
    frozen patcher stays the one the run was given (`--entropy-model`, else the directory's own)."""
    verify_sums(path)
    state = {k: v.float() for k, v in load_state(path, dev).items()}
    try:
        check_state(model, state, path, skip_prefix="entropy_model." if getattr(model, "entropy_model", None) else "")
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={path}: its weights do not fit this run's model config (did a "
                              f"model.* override change a shape?): {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # check_state has vetted every key but the patcher's
    assert all(k.startswith("entropy_model.") for k in missing), missing


def checkpoint_activations(block: torch.nn.Module) -> None:
    """Recompute `block` in backward (non-reentrant), keeping parameter names unchanged."""
    inner = block.forward

    def forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


# -- checkpoints ----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The resumable scalars. Model and optimizer go through DCP; this, the scheduler, the
    loader position and the RNG states go into each rank's file (see distributed.save_checkpoint)."""

    step: int = 0
    bytes_seen: int = 0


def _rank_state(state: TrainState, scheduler, loader, dev: torch.device) -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    return {"train_state": dataclasses.asdict(state), "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(), "rng": rng}


def _restore(rank_state: dict[str, Any], state: TrainState, scheduler, loader, dev: torch.device) -> None:
    scheduler.load_state_dict(rank_state["scheduler"])
    loader.load_state_dict(rank_state["loader"])
    torch.set_rng_state(rank_state["rng"]["cpu"])
    if "cuda" in rank_state["rng"] and dev.type == "cuda":
        torch.cuda.set_rng_state(rank_state["rng"]["cuda"], dev)
    for k, v in rank_state["train_state"].items():
        setattr(state, k, v)


def export_model(model, cfg, path: Path, info: distributed.DistInfo) -> None:
    """A bltkit model directory (fp32) from the full state dict, gathered to rank 0."""
    full = distributed.full_state_dict(model)
    if info.is_main:
        from .model import BLT, EntropyModel

        with torch.device("meta"):
            fresh = BLT(cfg) if isinstance(cfg, BLTConfig) else EntropyModel(cfg)
        fresh.load_state_dict(full, strict=True, assign=True)
        save_model(fresh, path)
    distributed.barrier()


# -- the loop -------------------------------------------------------------------------------------


def train(run: RunConfig, run_dir: str | os.PathLike, entropy_model: str | os.PathLike | None = None,
          resume: str = "auto", argv: list[str] | None = None) -> dict[str, Any]:
    """Train as `run` says, writing into `run_dir`; returns the last logged metrics.

    Args:
        run: a resolved config (see `resolve_config`).
        entropy_model: the frozen patcher's directory (BLT with patcher.mode=entropy, online).
        resume: "auto" continues from the newest complete checkpoint in run_dir; "never" refuses
            a run_dir that already holds checkpoints.
    """
    info = distributed.setup(run.train.device)
    try:
        return _train(run, Path(run_dir), info, entropy_model, resume, argv)
    finally:
        distributed.teardown()


def _train(run: RunConfig, run_dir: Path, info, entropy_dir, resume: str, argv) -> dict[str, Any]:
    t_start = time.monotonic()  # time_limit and wall_s count set-up too (loading, building, restoring)
    tc, dev, W = run.train, info.device, info.world_size
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; a run directory is a new or existing directory")
    # the exports replace RUN_DIR/model whole: a file of the user's there is refused now, not
    # after the training (every rank checks: one rank's error alone would leave the others waiting)
    check_output_dir(run_dir / "model")
    ckpt_root = run_dir / "checkpoints"
    candidates = distributed.complete_checkpoints(ckpt_root)
    if resume == "never" and candidates:
        raise ValueError(f"{run_dir} already holds checkpoints; use --resume auto or another --out")
    candidates = candidates if resume == "auto" else []
    # nothing in run_dir changes until the resume has succeeded: a failed one must leave the run
    # as it was, so that the plain `blt train --out RUN_DIR` still resumes it
    changed = _changed_settings(run, run_dir) if candidates else []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in ckpt_root.glob(".tmp-*"):  # leftovers of an interrupted checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    torch.manual_seed(tc.seed)

    # model: meta -> device -> init; frozen patcher; activation checkpointing, compile, FSDP2
    online_entropy = run.is_blt and run.model.patcher.mode == "entropy" and tc.patching == "online"
    uses_patcher = run.is_blt and run.model.entropy_model is not None
    own = run_dir / ENTROPY_DIR
    given = None  # an --entropy-model that resuming sets aside for the run's own copy
    if uses_patcher and candidates and own.is_dir():  # the checkpoint holds the patcher it trained with
        given, entropy_dir = entropy_dir, own
    entropy_dir = entropy_dir or default_entropy_dir(run.data.paths, tc.patching, tc.init_from)
    patcher = load_entropy_model(entropy_dir, device=dev, dtype=torch.float32) \
        if uses_patcher and entropy_dir is not None else None
    if info.is_main and given is not None and not _same_patcher(Path(given), patcher):
        print(f"note: --entropy-model {given} is not this run's patcher: resuming with the run's own "
              f"copy {own}, whose weights the checkpoint holds (train with another in a new --out)", flush=True)
    # the run directory is self-contained; a fresh start replaces a copy left by an attempt without checkpoints
    if info.is_main and patcher is not None and (not own.is_dir() or (
            not candidates and os.path.abspath(entropy_dir) != os.path.abspath(own))):
        save_model(patcher, own)
    if info.is_main and run.is_blt and run.model.entropy_model is not None and patcher is None:
        print("warning: no --entropy-model: the exported RUN_DIR/model carries an untrained patcher; "
              "pass the one used by `blt data prepare`", flush=True)
    model = build_model(run.model, dev, tc.seed, patcher)
    del patcher
    if tc.init_from and not candidates:  # fine-tuning: a resumed run takes its weights from the checkpoint
        _load_init(model, init_model_dir(tc.init_from), dev)
    model.train()
    impl = tc.attn_impl if tc.attn_impl != "auto" else ("flex" if dev.type == "cuda" else "sdpa")
    if impl == "flex" and dev.type == "cpu":  # (a NotImplementedError traceback at the first backward)
        raise ValueError("train.attn_impl=flex needs a GPU: FlexAttention has no backward on a CPU; use sdpa "
                         "(auto picks it there)")
    if run.is_blt:
        model.set_attn_impl(impl)
    # compiled flex attention and compiled blocks have static shapes and the patch count is BLT's
    # one dynamic shape (style §4): the model pads it to the largest count seen so far, rounded up to a multiple;
    # validation reuses those shapes (each new shape costs ~20-40 s of compiling on an H100)
    if run.is_blt:
        model.pad_patches_multiple = tc.pad_patches or (64 if impl == "flex" or tc.compile else 1)
        model.pack_global = None if tc.pack_global else False  # None: packs with flex and several rows
    if tc.activation_checkpointing:
        for block in distributed.blocks(model):
            checkpoint_activations(block)
    if tc.compile:
        distributed.compile_blocks(model)
    compute_dtype = torch.bfloat16 if tc.dtype == "bf16" or (tc.dtype == "auto" and dev.type == "cuda") \
        else torch.float32
    if info.distributed:
        distributed.shard_model(model, compute_dtype)
    autocast = torch.autocast(dev.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
    # entropies in fp32 (spec §3.3) unless train.patcher_dtype=bf16 trades ~0.7% of boundaries for speed
    patcher_autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if tc.patcher_dtype == "bf16" \
        else nullcontext()
    optimizer = build_optimizer(model, run.optim, dev)
    scheduler = build_scheduler(optimizer, run.optim, tc.steps)

    # data: this rank's share of every global batch; resume
    train_stream, val_stream = build_streams(run.data)
    if tc.patching == "precomputed" and train_stream.entropies is None:
        raise ValueError("train.patching=precomputed needs data prepared by `blt data prepare` (with entropies)")
    loader = BatchLoader(train_stream, tc.batch_size, tc.seq_len, seed=run.data.seed, rank=info.rank,
                         world_size=W)
    state, start = TrainState(), None
    if candidates:
        start, rank_state = _load_newest_intact(candidates, model, optimizer, info)
        try:
            _restore(rank_state, state, scheduler, loader, dev)
        except ValueError as e:  # the loader's position is in windows of the data as it was
            raise ValueError(_data_changed(start, e, changed)) from None
        if state.step >= tc.steps:
            # a run killed between its last checkpoint and the export still gets its model: exported
            # again from the final checkpoint (RUN_DIR/model may hold an earlier step's export, from
            # export_every or a time limit)
            export_model(model, run.model, run_dir / "model", info)
            if info.is_main:
                print(f"{run_dir} is already at step {state.step} >= train.steps={tc.steps}: nothing to train "
                      f"(raise train.steps to continue); wrote RUN_DIR/model from {start.name}", flush=True)
            return {}
    if info.is_main:
        _write_run_files(run, run_dir, state.step, changed, argv)
    distributed.barrier()
    logger = MetricsLogger(run_dir, tc.steps, state.step, enabled=info.is_main, tensorboard=tc.tensorboard)
    if start is not None:
        logger.print(f"resumed from {start} at step {state.step}")
    evaluate = tc.eval_batches > 0 and len(val_stream) > 0
    if tc.eval_batches > 0 and not evaluate:
        logger.print("note: the validation split is empty (data.val_fraction=0?): no evaluation")
    timer = StepTimer(dev, warmup=1 if dev.type == "cpu" else (5 if tc.compile else 3))
    bytes_per_step = tc.batch_size * tc.grad_accum * W * tc.seq_len
    flops_fn = _flops_per_byte(run, online_entropy)
    peak = _peak_flops(dev)
    window = LogWindow(dev)
    last: dict[str, Any] = {}

    for step in range(state.step + 1, tc.steps + 1):
        batches = [loader.next_batch() for _ in range(tc.grad_accum)]
        n_targets = distributed.all_reduce_sum(
            sum((b.tokens[:, 1:] != 0).sum() for b in batches).to(dev, torch.float64, non_blocking=True))
        for batch in batches:
            tokens = batch.tokens.to(dev, non_blocking=True)
            x, y = tokens[:, :-1], tokens[:, 1:]
            lengths = None
            if run.is_blt:
                with torch.no_grad(), patcher_autocast:
                    ent = batch.entropies[:, :-1].to(dev, non_blocking=True) if tc.patching == "precomputed" \
                        else None
                    # on the host: the copy is the patcher's one device sync (its patch count), and
                    # the forward then learns everything about the layout without another
                    lengths = starts_to_lengths(model.patch_starts(x, entropies_BT=ent).cpu())
                window.patches += (lengths > 0).sum()
            with autocast:  # no host-side checks (device syncs): loader bytes and patcher lengths are valid
                logits = model(x, patch_lengths=lengths, validate=False) if run.is_blt else model(x, impl=impl)
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=0, reduction="sum")
            # FSDP averages gradients over ranks: scale by W so the result is Σ CE / global targets
            (loss_sum * (W / n_targets).float()).backward()
            window.loss_sum += loss_sum.detach().double()
        window.targets += n_targets
        max_norm = run.optim.grad_clip if run.optim.grad_clip > 0 else math.inf
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = clip_and_step(optimizer, [p for p in model.parameters() if p.requires_grad], max_norm)
        window.grad_norm += _full(grad_norm).detach().double()
        window.steps += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.bytes_seen = step, state.bytes_seen + bytes_per_step
        timer.step_done()
        logger.advance()

        final = step == tc.steps
        # a wall-clock budget (a job slot, a lease): checkpoint and stop; `--resume` goes on. Ranks
        # agree through rank 0's clock, read at log steps only (no extra sync per step)
        out_of_time = (tc.time_limit > 0 and not final and step % max(tc.log_every, 1) == 0 and
                       _agree(time.monotonic() - t_start >= tc.time_limit, info))
        stop_here = tc.stop_at > 0 and step == tc.stop_at and not final
        metrics: dict[str, Any] = {}
        if step % max(tc.log_every, 1) == 0 or final:
            metrics = window.collect(step, lr, timer, bytes_per_step, tc.steps, flops_fn, peak, W)
            metrics["wall_s"] = round(time.monotonic() - t_start, 2)  # stalls (compiles, evals) show here
            if run.is_blt:  # the padded shapes the step runs (rank 0's): work on empty patch slots shows here
                metrics["patch_slots"] = model.pad_patches_floor or None
                metrics["packed_slots"] = model.pack_floor or None
        if evaluate and ((tc.eval_every > 0 and step % tc.eval_every == 0) or final):
            metrics = {"step": step, **metrics, "val_bpb": _validate(model, val_stream, tc, info)}
        if metrics:
            logger.log(metrics)
            last = metrics
        if (tc.ckpt_every > 0 and step % tc.ckpt_every == 0) or final or out_of_time or stop_here:
            distributed.save_checkpoint(ckpt_root, step, model, optimizer, _rank_state(state, scheduler, loader, dev),
                                        tc.keep_last, info)
        if (tc.export_every > 0 and step % tc.export_every == 0) or final or out_of_time or stop_here:
            export_model(model, run.model, run_dir / "model", info)
        if metrics or (tc.ckpt_every > 0 and step % tc.ckpt_every == 0) or \
                (tc.export_every > 0 and step % tc.export_every == 0):
            timer.restart()  # eval, checkpoint and export time stay out of bytes/s
        if out_of_time:
            logger.print(f"train.time_limit={tc.time_limit:g}s reached: stopped at step {step} of {tc.steps} "
                         f"with a checkpoint and RUN_DIR/model (the weights so far); run the same command again to resume")
            break
        if stop_here:
            logger.print(f"train.stop_at={tc.stop_at} reached: stopped with a checkpoint and RUN_DIR/model; "
                         f"resume with train.stop_at=0 (or a later step)")
            break
    logger.close()
    return last


def _agree(flag: bool, info) -> bool:
    """Rank 0's decision, for every rank (no collective in one process)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([float(flag and info.is_main)], device=info.device)
    return bool(distributed.all_reduce_sum(t).item() > 0)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 grad norms), a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _flops_per_byte(run: RunConfig, online_entropy: bool):
    from .flops import entropy_flops_per_byte, train_flops_per_byte

    if not run.is_blt:
        per_byte = 3 * entropy_flops_per_byte(run.model, run.train.seq_len)
        return lambda mean_patch: per_byte
    return lambda mean_patch: train_flops_per_byte(run.model, mean_patch, run.train.seq_len,
                                                   patch_on_the_fly=online_entropy) if mean_patch else None


def _peak_flops(dev: torch.device) -> float | None:
    from .flops import peak_flops

    return peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None


def _validate(model, val_stream, tc: TrainConfig, info) -> float:
    """Bits per byte of the first eval_batches global batches (batch_size x world_size windows
    each) of the validation stream, so the number does not depend on the world size. Entropies
    stay fp32; sharded layers run as trained. Ranks score disjoint shares only when every rank
    gets full batches: FSDP needs all ranks to run the same forwards."""
    from .eval.bpb import bpb_of_stream

    B, W = tc.batch_size, info.world_size
    n_windows = BatchLoader(val_stream, B, tc.seq_len, drop_last=False).windows_per_epoch
    shard = W > 1 and tc.eval_batches * B * W <= n_windows
    r = bpb_of_stream(model, val_stream, tc.seq_len, B if shard else B * W, info.device,
                      max_batches=tc.eval_batches, rank=info.rank if shard else 0, world_size=W if shard else 1)
    if not shard:
        return r["bpb"]
    sums = distributed.all_reduce_sum(torch.tensor([r["nats"], r["targets"]], dtype=torch.float64, device=info.device))
    return float(sums[0] / (math.log(2) * sums[1]))


def _changed_settings(run: RunConfig, run_dir: Path) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, this call's value) for the data, optim and train settings that differ
    from run_dir/config.json; a different model is refused (a checkpoint holds its shapes)."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return []
    old = json.loads(saved.read_text())
    if old.get("model") != to_dict(run.model):
        raise ValueError(f"the model config differs from {saved}; a checkpoint cannot be resumed "
                         "into another architecture (use a new --out)")
    return [(f"{s}.{k}", old.get(s, {}).get(k), v) for s in SECTIONS[1:] for k, v in to_dict(getattr(run, s)).items()
            if old.get(s, {}).get(k) != v and f"{s}.{k}" not in ("data.seq_len", "data.batch_size")]  # train.* copies


def _load_newest_intact(candidates: list[Path], model, optimizer, info) -> tuple[Path, dict[str, Any]]:
    """Load the newest checkpoint that reads back, as a user expects after a crash; a damaged newer
    one is renamed step_N.broken (kept, never deleted) with a warning. None intact: a clear error."""
    broken: list[tuple[Path, CheckpointError]] = []
    for path in candidates:
        try:
            rank_state = distributed.load_checkpoint(path, model, optimizer, info)
        except CheckpointError as e:
            broken.append((path, e))
            continue
        if info.is_main:
            for bad, e in broken:
                kept = distributed.set_aside(bad)
                print(f"warning: {e}; moved it to {kept.name} and resumed from {path.name}", flush=True)
        distributed.barrier()
        return path, rank_state
    raise CheckpointError(f"no intact checkpoint to resume: {'; '.join(str(e) for _, e in broken)}; if those "
                          f"files are damaged, move {candidates[0].parent} away to start the run over")


def _data_changed(start: Path, error: ValueError, changed: list[tuple[str, Any, Any]]) -> str:
    """The loader state of `start` does not fit this data: name the settings that moved it."""
    culprits = [f"{k} is {old} in the run but {new} was asked" for k, old, new in changed
                if k.startswith("data.") or k == "train.seq_len"]
    if not culprits:
        return f"cannot resume from {start}: {error}"
    return (f"cannot resume from {start}: {'; '.join(culprits)}, and the saved data position depends on it; "
            "drop the override (or pass the run's value), or use a new --out")


def _write_run_files(run: RunConfig, run_dir: Path, step: int, changed: list, argv) -> None:
    """config.json (atomically), env.json, the printed config; metrics logged after `step` dropped."""
    _trim_metrics(run_dir / "metrics.jsonl", step)
    if changed:
        print("note: resuming with changed settings: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed),
              flush=True)
    text = json.dumps(run.to_dict(), indent=2)
    distributed.write_text_atomic(run_dir / "config.json", text + "\n")
    (run_dir / "env.json").write_text(json.dumps(env_info(argv), indent=2) + "\n")
    print(f"config ({run_dir / 'config.json'}):\n{text}", flush=True)


def _same_patcher(given: Path, patcher) -> bool:
    """Does `given` hold the weights of `patcher` (the run's copy, loaded in fp32)? Compared in fp32,
    the dtype the copy is saved in (a file hash would differ for a bf16 source of the same weights)."""
    b = patcher.state_dict()
    a = load_entropy_model(given, device=next(iter(b.values())).device, dtype=torch.float32).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be logged again)."""
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        distributed.write_text_atomic(path, "".join(r + "\n" for r in rows))  # (a crash keeps the history)


__all__ = ["SECTIONS", "RunConfig", "TrainConfig", "apply_run_overrides", "build_model", "export_model",
           "init_model_dir", "resolve_config", "toml_overrides", "train"]
