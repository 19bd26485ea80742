"""Process groups, FSDP2 sharding and DCP training checkpoints (style §7, §9).

`setup()` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and falls back to one
process when WORLD_SIZE is unset or 1, so the same training code runs under `blt train` and
`torchrun -m bltkit train`. NCCL on CUDA, gloo on CPU. `shard_model` applies `fully_shard` to
every transformer block and then the root; a BLT's frozen entropy model stays unsharded.
Checkpoints are DCP directories written to a temp dir and renamed, with a `latest` pointer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, check_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`name` as a device, or a ValueError when it is unknown or absent here (torch itself raises
    a RuntimeError listing 20 device types, or an AttributeError deep inside CUDA setup)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)
    if device.type == "cuda" and device.index is None:
        device = check_device(f"cuda:{local_rank}")
    return device


def setup(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes, or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local, world, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); the identity in one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the network being trained (the sharding/compile/AC units)."""
    from .model import BLT

    if isinstance(model, BLT):
        return [*model.local_encoder.layers, *model.global_transformer.layers, *model.local_decoder.layers]
    return list(model.layers)


def compile_blocks(model: nn.Module) -> None:
    """`block.compile(dynamic=False)` on every block (one compile per padded patch count, no
    symbolic shapes), after raising dynamo's recompile limit outside any trace (see
    `allow_recompiles`): the trainer's `train.compile` and the benchmarks compile this way."""
    from .model.attention import allow_recompiles

    allow_recompiles()
    for block in blocks(model):
        block.compile(dynamic=False)


def shard_model(model: nn.Module, param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root, in place.

    With param_dtype bf16 (the CUDA default) parameters are gathered in bf16 and gradients
    reduced in fp32 over fp32 master weights (spec §12); fp32 (CPU) changes nothing. The frozen
    entropy model is detached while sharding so that it stays a plain replicated fp32 module (it
    runs outside the root's forward, in `BLT.patch`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs off: activations are bf16 already (bf16 parameters, autocast), and the
    # RoPE tables passed to every block stay fp32, as on one GPU under autocast
    mp = MixedPrecisionPolicy() if param_dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    frozen = getattr(model, "entropy_model", None)
    if frozen is not None:
        model.entropy_model = None
    for block in blocks(model):
        fully_shard(block, mp_policy=mp)
    # The hash table (3B parameters in blt-1b) stays in the root's unit: BLT.embed reads its
    # weight through F.embedding_bag, bypassing the module call that a unit of its own would need
    # to gather it.
    fully_shard(model, mp_policy=mp)
    if frozen is not None:
        model.entropy_model = frozen
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, gathered to rank 0 (other ranks get an empty dict)."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- training checkpoints -------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _step_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.glob("step_*") if _STEP_DIR.match(d.name)), key=lambda d: int(d.name[5:]))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, newest first: the `latest` pointer's, then the others by step."""
    done = [d for d in reversed(_step_dirs(root)) if (d / "meta.json").is_file()]
    pointer = root / "latest"
    if pointer.is_file() and (first := root / pointer.read_text().strip()) in done:
        done.remove(first)
        done.insert(0, first)
    return done


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer, else the highest complete step dir."""
    done = complete_checkpoints(root)
    return done[0] if done else None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `step_N.broken` (kept for inspection, never deleted): as a
    step dir it would count towards keep_last and be deleted when training reaches step N again."""
    dest, n = path.with_name(f"{path.name}.broken"), 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.broken{n}")
    os.replace(path, dest)
    return dest


@contextmanager
def _single_process_ok():
    """DCP warns when it runs without a process group: intended in a single process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer, rank_state: dict[str, Any],
                    keep_last: int, info: DistInfo) -> Path:
    """Write `root/step_NNNNNN` atomically and keep the newest `keep_last`.

    Every rank writes into a hidden temp dir (its DCP shard of model and optimizer, and
    `rank_NNNNN.pt` with `rank_state`); rank 0 then adds meta.json, renames the dir into place
    and moves the `latest` pointer (os.replace). A crash at any point leaves the previous
    checkpoint as the newest complete one; the next run deletes the leftover temp dir.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with _single_process_ok():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except dcp.CheckpointException as e:  # DCP wraps a Ctrl-C in the middle of writing: unwrap it
        stop = _not_damage(e)
        if stop is not None:
            raise stop from None
        raise
    torch.save(rank_state, tmp / f"rank_{info.rank:05d}.pt")
    barrier()
    if info.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": info.world_size,
                                                   "time": time.time()}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", name + "\n")
        for old in _step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_text_atomic(path: Path, text: str) -> None:
    """A temp file, fsynced, then os.replace: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer, info: DistInfo) -> dict[str, Any]:
    """Load model and optimizer in place and return this rank's `rank_state`.

    A different number of processes is fine: DCP reshards model and optimizer, and the rank
    states (step, schedule, data position in windows, RNG) are the same on every rank except
    the RNG, which then comes from rank 0 (training draws no random numbers after init).

    Raises CheckpointError naming `path` on every rank when any rank cannot read its part (a
    truncated shard or rank file, a missing .metadata), so that all ranks can fall back together;
    model and optimizer may then be half loaded (loading another checkpoint overwrites them).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    error = None
    try:
        if not (path / ".metadata").is_file():  # DCP would log two tracebacks, then fail an assert
            raise FileNotFoundError(f"no {path / '.metadata'}")
        try:
            meta = json.loads((path / "meta.json").read_text())
        except ValueError as e:  # (a JSON error names no file)
            raise ValueError(f"{path / 'meta.json'}: {e}") from None
        same = meta["world_size"] == info.world_size
        model_sd, optim_sd = get_state_dict(model, optimizer)
        box = {"model": model_sd, "optim": optim_sd}
        with _single_process_ok():
            dcp.load(box, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
        rank_state = torch.load(path / f"rank_{info.rank if same else 0:05d}.pt", weights_only=True)
    # damaged files fail in many ways: EOFError, a zip RuntimeError, and DCP's CheckpointException
    # (a BaseException, not an Exception); a Ctrl-C or running out of memory while loading says
    # nothing of the files, so it stops the run as it is (the checkpoint is not set aside)
    except (Exception, dcp.CheckpointException) as e:
        error = e
    stop = None if error is None else _not_damage(error)
    # every rank learns of every failure before any raises: one rank alone leaving the collective
    # (its own out-of-memory, say, that DCP did not wrap for all) would leave the others waiting
    failed, stopped = all_reduce_sum(torch.tensor([float(error is not None), float(stop is not None)],
                                                  device=info.device)).tolist()
    if stop is not None:
        raise stop from None
    if stopped > 0:
        raise RuntimeError(f"another rank was interrupted or ran out of memory loading checkpoint {path}; "
                           "it is kept as it is")
    if failed > 0:
        why = _one_line(error) if error is not None else "another rank could not read its part"
        raise CheckpointError(f"checkpoint {path} is unreadable ({why})") from error
    return rank_state


def _not_damage(e: BaseException) -> BaseException | None:
    """What a checkpoint's read failed of that is not its files' fault, to raise instead: a Ctrl-C
    (which DCP wraps in a CheckpointException, as any rank's failure) or running out of memory."""
    import torch.distributed.checkpoint as dcp

    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, dcp.CheckpointException) else [e]
    if any(isinstance(c, KeyboardInterrupt) for c in causes):
        return KeyboardInterrupt()
    return next((c for c in causes if isinstance(c, torch.OutOfMemoryError)), None)


def _one_line(e: BaseException) -> str:
    """An exception as one short line: DCP's CheckpointException carries each failed rank's whole
    traceback, whose last line is the cause; torch.load's zip error runs on for three sentences."""
    import torch.distributed.checkpoint as dcp

    text = str(e).strip().splitlines()[-1] if isinstance(e, dcp.CheckpointException) else f"{type(e).__name__}: {e}"
    return text.rstrip(": ").split(". ")[0]
