"""Shared fixtures for the CPU suite: tiny models, the transformers oracle, torch global state.

Tests run in fp32 with one thread and fixed seeds (style §12). Hypothesis runs derandomised and
without an example database, so a run is reproducible and leaves no `.hypothesis/` behind.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracle is built locally; never touch the network

import pytest
import torch
from hypothesis import settings

from bltkit.checkpoint import init_model
from bltkit.presets import tiny

settings.register_profile("bltkit", database=None, derandomize=True, deadline=None, max_examples=40)
settings.register_profile("thorough", database=None, deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("BLTKIT_HYPOTHESIS_PROFILE", "bltkit"))

HF_VERSION = "5.23.0"  # spec §14: other versions of the port compute different numbers
ENTROPY_HEAD_SCALE = 8.0  # spec §15.3: spreads random entropies over ~0-2 nats around θ = 1.335


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: deterministic reductions and no oversubscription on 2-core CI."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def torch_state():
    """Restore the default dtype, deterministic flags, grad mode and RNG after every test."""
    dtype = torch.get_default_dtype()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    grad = torch.is_grad_enabled()
    rng = torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
            != (det, warn_only):  # only when changed: the setter imports torch._inductor (~5 s)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.set_grad_enabled(grad)
    torch.set_rng_state(rng)


def _scaled(model):
    """Multiply the entropy head by 8 so a random entropy model makes multi-byte patches."""
    if model.entropy_model is not None:
        with torch.no_grad():
            model.entropy_model.output.weight.mul_(ENTROPY_HEAD_SCALE)
    return model


@pytest.fixture
def make_tiny_model():
    """Factory: `make_tiny_model(cfg=None, seed=0)` -> a random BLT with the scaled entropy head."""

    def make(cfg=None, seed: int = 0):
        return _scaled(init_model(cfg if cfg is not None else tiny(), seed=seed))

    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    """`init_model(tiny(), seed=0)` with `entropy_model.output.weight` x 8 (spec §15.3)."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def hf_oracle():
    """The module `tests/hf_oracle.py`; skips when transformers (pinned 5.23.0) is missing."""
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != HF_VERSION:
        pytest.skip(f"parity is pinned to transformers {HF_VERSION}, found {transformers.__version__}")
    import hf_oracle as module

    return module


@pytest.fixture(scope="session")
def hf_pair(hf_oracle, tmp_path_factory):
    """Factory `hf_pair(**variant)` -> (transformers model, our BLT imported from its save_pretrained
    directory). Cached per variant for the session; both in eval mode, fp32."""
    from bltkit.convert.hf import import_hf

    cache: dict[tuple, tuple] = {}

    def get(**variant):
        key = tuple(sorted(variant.items()))
        if key not in cache:
            hf = hf_oracle.tiny_hf_model(**variant)
            out = tmp_path_factory.mktemp("hf_" + "_".join(f"{k}{v}" for k, v in key))
            hf.save_pretrained(out)
            cache[key] = (hf, import_hf(out))
        return cache[key]

    return get


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A factory: repo id -> the folder of its one snapshot in an offline huggingface_hub cache
    (under tmp_path), to fill; `bltkit.hub.resolve` then finds it there, as users' caches."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (no network here: the cache must answer)

    def snapshot(repo: str):
        folder = cache / f"models--{repo.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit).mkdir(parents=True)
        return folder / "snapshots" / commit

    return snapshot
