"""Shared helpers for the benchmark scripts (random blt-shaped models, calibration, timing)."""

from __future__ import annotations

import ast
import dataclasses
import time

import torch

from bltkit.checkpoint import init_model
from bltkit.config import apply_overrides
from bltkit.presets import get_preset

SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. "
)


def random_model(preset: str, overrides: list[str], device: str, dtype: torch.dtype, seed: int = 0):
    cfg = get_preset(preset)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    model = init_model(cfg, seed=seed, device=device)
    return model.to(dtype)


@torch.no_grad()
def calibrate_threshold(model, text_ids: torch.Tensor, mean_patch: float) -> float:
    """Entropy threshold giving about `mean_patch` bytes per patch on `text_ids` (random weights
    give near-uniform entropies, so the released threshold would make every byte a patch)."""
    H = model.entropy_model.entropies(text_ids)[0, 1:].float()
    return float(torch.quantile(H, 1.0 - 1.0 / mean_patch))


def with_threshold(model, threshold: float):
    model.config = dataclasses.replace(model.config, patcher=dataclasses.replace(model.config.patcher,
                                                                                 threshold=threshold))
    return model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1):
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return out, (time.perf_counter() - t) / repeat


def constant(name: str) -> tuple:
    """(module, attribute) for a module constant's NAME: bltkit.generate's, or bltkit.kernels' as
    kernels.NAME (the switches that `--variants` and `--set` take)."""
    from bltkit import generate, kernels

    mod, attr = (kernels, name.removeprefix("kernels.")) if name.startswith("kernels.") else (generate, name)
    if not hasattr(mod, attr):
        raise SystemExit(f"{mod.__name__} has no {attr!r}")
    return mod, attr


def parse_constants(text: str) -> dict:
    """`NAME=VALUE;NAME=VALUE` (values as Python literals; `base` or nothing: none) -> {NAME: value}."""
    if text in ("base", ""):
        return {}
    out = {}
    for item in text.split(";"):
        name, _, value = item.partition("=")
        constant(name.strip())
        out[name.strip()] = ast.literal_eval(value.strip())
    return out
