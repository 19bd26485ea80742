"""Optimizer and learning-rate schedule for training (spec §12).

AdamW with one parameter group and weight decay on every parameter, as Meta trains BLT (an option
moves norms and embeddings to a no-decay group), fused on CUDA. Schedules are plain functions of
the step wrapped in a `LambdaLR`: linear warmup, then cosine to `min_lr_ratio`, or WSD
(warmup-stable-decay) with a linear decay over the last `decay_fraction` of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd")


def _default_betas() -> list[float]:
    return [0.9, 0.95]


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its schedule. Defaults are Meta's BLT settings (spec §12) except the warmup.

    warmup: linear warmup steps; -1 (default) means min(2000, steps // 10), so short runs are
      not all warmup (Meta uses 2000).
    decay_norms_and_embeddings: Meta decays every parameter; false moves 1-D weights (norms) and
      embedding tables (byte, hash) to a group without weight decay.
    fused: fused AdamW kernel; "auto" uses it on CUDA only.
    """

    lr: float = 3e-4
    betas: list[float] = field(default_factory=_default_betas)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = True
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still logged)
    warmup: int = -1
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd only
    fused: str = "auto"  # "auto" | "true" | "false"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError("optim: need lr > 0, 0 <= min_lr_ratio <= 1 and 0 < decay_fraction <= 1")
        if self.fused not in ("auto", "true", "false"):
            raise ValueError(f"optim.fused must be auto, true or false, got {self.fused!r}")

    def warmup_steps(self, steps: int) -> int:
        return min(2000, steps // 10) if self.warmup < 0 else self.warmup


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_embeddings: bool = True) -> list[dict]:
    """Trainable parameters in AdamW groups: one group (Meta), or decay / no-decay groups."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norms_and_embeddings:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for _, p in named if p.dim() >= 2 and id(p) not in embeddings]
    keep = [p for _, p in named if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the frozen entropy model is left out)."""
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norms_and_embeddings)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global norm of at most `max_norm`, take the optimizer step, and
    return the norm before clipping (as `clip_grad_norm_` followed by `step()`).

    A fused Adam(W) over plain tensors takes the clip inside its kernel: the factor goes in as
    the optimizer's `grad_scale`, the input `GradScaler` uses (gradients are divided by it and
    written back unscaled), which saves a read and a write of every gradient (blt-1b: ~36 GB, ~10 ms
    of an H200 step). Same result up to rounding (x / (1/c) for x * c: the parameters within an
    ulp). Anything else, sharded (DTensor) gradients included, runs the two calls as they are.
    """
    grads = [p.grad for p in params if p.grad is not None]
    fused = optimizer.defaults.get("fused") and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
    if not fused or not grads or any(type(g) is not torch.Tensor for g in grads):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm(grads)
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); this divides by the inverse
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm


def lr_factor(step: int, steps: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based) of a run of `steps` steps."""
    warmup = cfg.warmup_steps(steps)
    if step < warmup:
        return (step + 1) / warmup  # the first step already moves, at lr / warmup
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * steps))
    decay_start = max(warmup, steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, steps - decay_start))
    return 1.0 - (1 - cfg.min_lr_ratio) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`. The factor is a plain function, so a scheduler state dict
    keeps only the step count and a resumed run follows its current config (e.g. more steps)."""

    def factor(step: int) -> float:
        return lr_factor(step, steps, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
