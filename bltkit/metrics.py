"""Training metrics: the fixed-column stdout line (style §8), `metrics.jsonl`, an optional
TensorBoard sink, the `env.json` record and an honest step timer.

Sinks follow a two-method protocol, `log(metrics, step)` and `close()`; TensorBoard is imported
only when enabled. Only rank 0 builds a logger that writes anything.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch


class Sink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per logged step, flushed at once (a crash loses nothing logged)."""

    def __init__(self, path: str | os.PathLike):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("train.tensorboard=true needs the tensorboard package "
                             "(pip install 'bltkit[tb]')") from e
        self.writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# -- the human line -----------------------------------------------------------------------------


def format_count(x: float) -> str:
    """1930000 -> '1.93M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    """11520 -> '3h12m', 245 -> '4m05s', 7 -> '7s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _col(label: str, value: Any, fmt, width: int) -> str:
    text = "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt(value)
    return f"{label}{' ' if label else ''}{text:>{width}}"


def format_line(m: dict[str, Any], steps: int) -> str:
    """`step 1200/50000 | loss 0.812 | bpb 1.171 | lr 3.0e-04 | gnorm 0.41 | bytes/s 1.93M |
    patch_len 4.4 | mfu 38.2% | mem 61.2G | 412ms | eta 3h12m` with fixed column widths;
    a value that does not apply (mfu on CPU) prints as '-'."""
    w = len(str(steps))
    cols = [
        f"step {m['step']:>{w}}/{steps}",
        _col("loss", m.get("loss"), lambda v: f"{v:.3f}", 6),
        _col("bpb", m.get("bpb"), lambda v: f"{v:.3f}", 6),
        _col("lr", m.get("lr"), lambda v: f"{v:.1e}", 7),
        _col("gnorm", m.get("grad_norm"), lambda v: f"{v:.2f}", 5),
        _col("bytes/s", m.get("bytes_per_s"), format_count, 6),
        _col("patch_len", m.get("mean_patch_len"), lambda v: f"{v:.1f}", 4),
        _col("mfu", m.get("mfu"), lambda v: f"{100 * v:.1f}%", 5),
        _col("mem", m.get("mem_gb"), lambda v: f"{v:.1f}G", 6),
        _col("", m.get("step_ms"), lambda v: f"{v:.0f}ms", 7),
        _col("eta", m.get("eta_s"), format_duration, 6),
    ]
    if m.get("val_bpb") is not None:
        cols.append(f"val_bpb {m['val_bpb']:.3f}")
    return " | ".join(cols)


class MetricsLogger:
    """Writes each metrics dict to metrics.jsonl, stdout and the optional sinks (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = False):
        self.steps, self.enabled = steps, enabled
        self.sinks: list[Sink] = []
        self.bar = None
        if not enabled:
            return
        self.sinks.append(JsonlSink(Path(run_dir) / "metrics.jsonl"))
        if tensorboard:
            self.sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
        if sys.stderr.isatty():  # a bar for people, never in logs (style §8)
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start_step, file=sys.stderr, dynamic_ncols=True, leave=False)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = metrics["step"]
        rest = {k: v for k, v in metrics.items() if k != "step"}
        for sink in self.sinks:
            sink.log(rest, step)
        self.print(format_line(metrics, self.steps) if "loss" in metrics else
                   f"step {step:>{len(str(self.steps))}}/{self.steps} | val_bpb {metrics['val_bpb']:.3f}")

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.bar is not None:
            self.bar.close()


# -- one log line's numbers ----------------------------------------------------------------------


class LogWindow:
    """Sums over the steps since the last log line, kept on the device (no per-step host sync)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.reset()

    def reset(self) -> None:
        def zero() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float64, device=self.dev)

        self.loss_sum, self.targets, self.grad_norm, self.patches = zero(), zero(), zero(), zero()
        self.steps = 0

    def collect(self, step: int, lr: float, timer: StepTimer, bytes_per_step: int, total_steps: int,
                flops_per_byte: Callable[[float | None], float | None], peak: float | None,
                world_size: int) -> dict[str, Any]:
        """The metrics of one log line, then reset. loss = Σ CE / Σ targets over the window and
        all ranks; bytes/s over the timed steps; mfu = FLOPs/byte x bytes/s / (peak x GPUs)."""
        from .distributed import all_reduce_sum

        loss_sum = all_reduce_sum(self.loss_sum.clone())
        patches = float(all_reduce_sum(self.patches.clone()))
        loss = float(loss_sum / self.targets)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower optim.lr or check the data")
        seconds, n = timer.read()
        step_s = seconds / n if n else None
        bps = bytes_per_step / step_s if step_s else None
        mean_patch = bytes_per_step * self.steps / patches if patches > 0 else None
        flops = flops_per_byte(mean_patch) if bps else None
        cuda = self.dev.type == "cuda"
        m = {"step": step, "loss": loss, "bpb": loss / math.log(2), "lr": lr,
             "grad_norm": float(self.grad_norm) / max(self.steps, 1), "bytes_per_s": bps,
             "patches_per_s": bps / mean_patch if bps and mean_patch else None, "mean_patch_len": mean_patch,
             "mfu": flops * bps / (peak * world_size) if flops and peak else None,
             "mem_gb": torch.cuda.max_memory_allocated(self.dev) / 1e9 if cuda else None,
             "step_ms": 1000 * step_s if step_s else None,
             "eta_s": step_s * (total_steps - step) if step_s else None}
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.reset()
        return m


# -- timing -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time of a window of training steps, read after a device sync (style §8).

    The first `warmup` steps of the process (allocator warm-up, compilation) never count, and
    whatever happens between `read()` and `restart()` (eval, checkpoints) is excluded.
    """

    def __init__(self, device: torch.device, warmup: int = 1):
        self.device, self.warmup = device, warmup
        self.seen, self.n, self.t0 = 0, 0, 0.0
        self.restart()

    def restart(self) -> None:
        synchronize(self.device)
        self.t0, self.n = time.perf_counter(), 0

    def step_done(self) -> None:
        self.seen += 1
        if self.seen == self.warmup:
            self.restart()
        elif self.seen > self.warmup:
            self.n += 1

    def read(self) -> tuple[float, int]:
        """(seconds, steps) of the current window; (0, 0) while still warming up."""
        if self.n == 0:
            return 0.0, 0
        synchronize(self.device)
        return time.perf_counter() - self.t0, self.n


# -- environment record -------------------------------------------------------------------------


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info(argv: list[str] | None = None) -> dict[str, Any]:
    """torch/CUDA/GPU versions, the git commit and dirty flag of bltkit's checkout, argv."""
    from . import __version__

    repo = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) if commit else None
    cuda = torch.cuda.is_available()
    return {
        "bltkit": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "argv": list(sys.argv if argv is None else argv),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
