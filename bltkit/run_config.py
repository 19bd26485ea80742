"""A training run's configuration: the model, data, optimizer and training sections, how a run.toml,
a preset, overrides and a resumed run's config.json combine into one (`resolve_config`), and which
directories a run reads its patcher and initial weights from. `bltkit.train` runs what it says.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed
from .checkpoint import ENTROPY_DIR, read_config
from .config import (
    CONFIG_VERSION,
    BLTConfig,
    EntropyModelConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from .data import DataConfig, prepared_info, weights_sha256
from .optim import OptimConfig


@dataclass(kw_only=True)
class TrainConfig:
    """The loop. `batch_size` rows of `seq_len` bytes per process and micro-step; a step sees
    batch_size x grad_accum x world_size rows. 0 in *_every means "only at the end" (log_every: 1)."""

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 2048
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 16  # global validation batches of batch_size x world_size rows; 0: none
    ckpt_every: int = 500
    keep_last: int = 2
    export_every: int = 0
    time_limit: float = 0.0  # seconds since this process started the run; then checkpoint, export, stop; 0: none
    stop_at: int = 0  # stop (checkpoint, export) after this step; the schedule still runs to `steps`; 0: none
    seed: int = 42  # weight init (spec §6.7); the data order has its own data.seed
    dtype: str = "auto"  # "bf16" | "fp32"; auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    patching: str = "online"  # "online" | "precomputed" (entropies from `blt data prepare`)
    # the frozen entropy model's precision when patching online: fp32 as the spec asks (§3.3, pitfall 12);
    # bf16 (autocast) made it ~3x cheaper on an H200 and moves ~0.7% of boundaries (docs/training.md)
    patcher_dtype: str = "fp32"
    attn_impl: str = "auto"  # "sdpa" | "flex"; auto: flex on CUDA
    pad_patches: int = 0  # pad patch counts to the largest so far, a multiple of this; 0: 64 with flex, else off
    pack_global: bool = True  # with flex: the global transformer over the batch's packed patches (docs/model.md)
    tensorboard: bool = False
    device: str = "auto"
    init_from: str = ""  # a model directory (or "bundled") whose weights start the run: fine-tuning; "": random init

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "eval_every", "ckpt_every", "export_every", "eval_batches", "pad_patches"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.time_limit < 0:
            raise ValueError(f"train.time_limit must be >= 0 seconds (0: none), got {self.time_limit}")
        if self.stop_at < 0:
            raise ValueError(f"train.stop_at must be >= 0 (0: none), got {self.stop_at}")
        for name, allowed in (("dtype", ("auto", "bf16", "fp32")), ("patching", ("online", "precomputed")),
                              ("patcher_dtype", ("fp32", "bf16")),
                              ("attn_impl", ("auto", "sdpa", "flex"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs; `model` is a BLTConfig or, to train a patcher, an EntropyModelConfig."""

    model: BLTConfig | EntropyModelConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def is_blt(self) -> bool:
        return isinstance(self.model, BLTConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, "model_kind": "blt" if self.is_blt else "entropy_model",
                **{s: to_dict(getattr(self, s)) for s in SECTIONS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        model_cls = BLTConfig if d.get("model_kind", "blt") == "blt" else EntropyModelConfig
        return cls(model=from_dict(model_cls, d["model"]), data=from_dict(DataConfig, d["data"]),
                   optim=from_dict(OptimConfig, d["optim"]), train=from_dict(TrainConfig, d["train"]))


SECTIONS = ("model", "data", "optim", "train")
_NO_DATA = "<no --data given>"


def apply_run_overrides(run: RunConfig, tokens: list[str]) -> RunConfig:
    """`section.key.path=value` tokens, each section through `config.apply_overrides` (which
    cannot pick the member of the `model` union itself; see docs/training.md)."""
    by_section: dict[str, list[str]] = {}
    for tok in tokens:
        if "=" not in tok:  # a bare word would get a did-you-mean for itself
            example = tok if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", tok) else "train.steps"
            hint = "a data file or folder goes after --data" if Path(tok).exists() else f"e.g. {example}=..."
            raise ValueError(f"override {tok!r} has no '=': an override is key=value; {hint}")
        key = tok.split("=", 1)[0].strip()
        section, _, rest = key.partition(".")
        if section not in SECTIONS or not rest:
            fields = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(run, s))]
            near = difflib.get_close_matches(key, fields, n=1) or [f for f in fields if f.endswith("." + key)][:1]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"override {tok!r} is not of the form section.key=value with section one of "
                             f"{', '.join(SECTIONS)}{hint}")
        by_section.setdefault(section, []).append(tok.split(".", 1)[1])
    changes = {}
    for section, toks in by_section.items():
        try:
            changes[section] = apply_overrides(getattr(run, section), toks)
        except ValueError as e:  # put the section back in front of the key paths quoted
            msg = str(e)
            if msg.startswith("unknown config key"):
                msg = re.sub(r"'([^']*)'", lambda m, s=section: f"'{s}.{m.group(1)}'", msg)
            raise ValueError(msg) from None
    return dataclasses.replace(run, **changes)


def toml_overrides(path: str | os.PathLike) -> tuple[str | None, list[str]]:
    """A run.toml as (preset, override tokens): `preset = "tiny"` plus tables named by section,
    e.g. `[optim] lr = 1e-3`, `[model.patcher] mode = "space"`."""
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path} is not valid TOML: {e}") from None
    preset = doc.pop("preset", None)
    for k, v in doc.items():  # named here: the tokens below look like command-line overrides
        if not isinstance(v, dict):
            raise ValueError(f"--config {path}: {k} = ... is outside a table; only `preset` is; put it under "
                             f"[model], [data], [optim] or [train]")
        if k not in SECTIONS:
            near = difflib.get_close_matches(k, SECTIONS, n=1)
            hint = f" (did you mean [{near[0]}]?)" if near else ""
            raise ValueError(f"--config {path}: unknown table [{k}]{hint}; the tables are "
                             f"{', '.join(f'[{s}]' for s in SECTIONS)}")
    tokens: list[str] = []

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(key, v)
            elif isinstance(v, list):
                tokens.append(f"{key}=[{','.join(str(x) for x in v)}]")
            else:
                tokens.append(f"{key}={str(v).lower() if isinstance(v, bool) else v}")

    walk("", doc)
    return preset, tokens


def resolve_config(preset: str | None, data_paths: list[str] | None = None, config_path: str | None = None,
                   overrides: list[str] | None = None, entropy_model: str | os.PathLike | None = None,
                   run_dir: str | os.PathLike | None = None) -> RunConfig:
    """preset < --config run.toml < key=value tokens (style §5); --data and --entropy-model last.

    Without a preset the run directory's saved config.json is the base (resume a run by its
    directory alone). An entropy model's own config replaces `model.entropy_model`; a BLT that
    does not patch by entropy drops its entropy_model section.
    """
    from .presets import get_preset

    toml_preset, toml_tokens = toml_overrides(config_path) if config_path else (None, [])
    tokens = [*toml_tokens, *(overrides or [])]
    name = preset or toml_preset
    saved = Path(run_dir) / "config.json" if run_dir is not None else None
    init_from = next((t.split("=", 1)[1].strip() for t in tokens if t.split("=")[0].strip() == "train.init_from"), "")
    if name is not None and init_from:
        raise ValueError("give --preset or --init-from, not both: a fine-tuned model keeps the architecture "
                         "of the one it starts from (set model.* overrides that do not change shapes)")
    if name is not None:
        run = RunConfig(model=get_preset(name), data=DataConfig(paths=data_paths or [_NO_DATA]))
    elif init_from:
        run = RunConfig(model=read_config(init_model_dir(init_from)), data=DataConfig(paths=data_paths or [_NO_DATA]))
    elif saved is not None and saved.is_file():
        run = RunConfig.from_dict(json.loads(saved.read_text()))
        lost = [p for p in run.data.paths if not (data_paths or p.startswith("hf:") or os.path.isabs(p)
                                                    or os.path.exists(p))]
        if lost:  # runs before bltkit stored absolute paths
            raise ValueError(f"data.paths {lost[0]!r} in {saved} is relative to the directory the run was started "
                             "in: resume from there, or pass --data with the same data")
    else:
        raise ValueError("give --preset (or `preset = ...` in --config), or --out of an existing run to resume")
    try:
        run = apply_run_overrides(run, toml_tokens)
    except ValueError as e:
        raise ValueError(f"--config {config_path}: {e}") from None
    run = apply_run_overrides(run, overrides or [])
    if any(t.split("=")[0].strip() in ("data.seq_len", "data.batch_size") for t in tokens):
        raise ValueError("set train.seq_len / train.batch_size; the data.* copies are filled from them")
    # given paths are stored absolute, so that the run resumes from any directory
    given = data_paths or (run.data.paths if any(t.split("=")[0].strip() == "data.paths" for t in tokens) else None)
    data = dataclasses.replace(run.data, paths=[_absolute(p) for p in given] if given else run.data.paths,
                               seq_len=run.train.seq_len, batch_size=run.train.batch_size)
    if init_from and run.train.init_from != "bundled":
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, init_from=_absolute(run.train.init_from)))
    if data.paths == [_NO_DATA]:
        raise ValueError("no training data: pass --data PATH [PATH ...] (or data.paths in --config)")
    model, tc = run.model, run.train
    if isinstance(model, BLTConfig) and model.patcher.mode == "entropy":
        if entropy_model is not None:
            _entropy_config(entropy_model)  # a wrong directory is named even when resuming
        own = _own_patcher(run_dir)  # resuming: the checkpoint holds the patcher the run trained with
        ent_dir = own or entropy_model or default_entropy_dir(data.paths, tc.patching, tc.init_from)
        if ent_dir is not None:
            model = dataclasses.replace(model, entropy_model=_entropy_config(ent_dir))
            if tc.patching == "precomputed" and own is None:
                _check_prepared_patcher(ent_dir, data.paths[0])
        elif tc.patching == "online":
            raise ValueError("patcher.mode=entropy needs --entropy-model DIR (train one with an entropy-* "
                             "preset), or train.patching=precomputed, or model.patcher.mode=space|static|byte")
    elif isinstance(model, BLTConfig):
        if tc.patching == "precomputed":
            raise ValueError("train.patching=precomputed only applies to model.patcher.mode=entropy")
        model = dataclasses.replace(model, entropy_model=None)
    elif entropy_model is not None:
        raise ValueError("--entropy-model is for BLT presets; this preset trains an entropy model")
    if isinstance(model, BLTConfig) and tc.seq_len > model.max_bytes:
        raise ValueError(f"train.seq_len {tc.seq_len} exceeds model.max_bytes {model.max_bytes}")
    if isinstance(model, BLTConfig) and tc.seq_len + 1 > model.max_patches:
        # found the hard way: a row of hard-to-predict bytes made 4,097 patches at step 430 of a run
        raise ValueError(f"train.seq_len {tc.seq_len} can make up to {tc.seq_len + 1} patches (one byte each, "
                         f"plus BOS) but model.max_patches is {model.max_patches}: set model.max_patches="
                         f"{tc.seq_len + 1} or more (it only bounds positions), or a shorter train.seq_len")
    return dataclasses.replace(run, model=model, data=data)


def _absolute(path: str) -> str:
    """A local path made absolute (not resolving links); `hf:` specs as they are."""
    return path if path.startswith("hf:") else os.path.abspath(path)


def _run_dir_note(path: Path) -> str | None:
    """Where a model directory belongs, a training run directory (its config.json is a RunConfig): name its model."""
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(d, dict) and "model_kind" in d and "format" not in d):
        return None
    model = path / "model"
    return f"{path} is a training run directory; its model is {model}" + \
        ("" if (model / "config.json").is_file() else " (not exported yet)")


def _entropy_config(path: str | os.PathLike) -> EntropyModelConfig:
    """The patcher config of an entropy-model directory or of a BLT directory that carries one."""
    path = Path(path)
    if note := _run_dir_note(path):
        raise ValueError(f"--entropy-model: {note}")
    cfg = read_config(path)
    if not isinstance(cfg, BLTConfig):
        return cfg
    if cfg.entropy_model is None or not (path / ENTROPY_DIR).is_dir():
        raise ValueError(f"--entropy-model {path} is a BLT without an entropy model (patcher.mode "
                         f"{cfg.patcher.mode!r}); pass an entropy model (an entropy-* run's RUN_DIR/model) "
                         "or a BLT that carries one")
    return cfg.entropy_model


def _own_patcher(run_dir) -> Path | None:
    """A run's copy of its patcher, when the run has checkpoints to resume (they hold its weights)."""
    own = Path(run_dir) / ENTROPY_DIR if run_dir is not None else None
    return own if own is not None and own.is_dir() and \
        distributed.complete_checkpoints(Path(run_dir) / "checkpoints") else None


def _check_prepared_patcher(ent_dir, data_path: str) -> None:
    """Precomputed patching trains on the entropies of the model `blt data prepare` used; another
    patcher in the exported BLT would patch differently from how it trained (same weights: sha256)."""
    info = prepared_info(data_path)
    want = info.get("entropy_model_sha256") if info else None
    if want and weights_sha256(Path(ent_dir)) != want:
        raise ValueError(f"the entropy model {ent_dir} is not the one {data_path} was prepared with "
                         f"({info.get('entropy_model')}, weights sha256 {want[:12]}...): the exported BLT would "
                         f"patch differently from how it trained; pass --entropy-model {info.get('entropy_model')}, "
                         "or prepare the data again with this one")


def default_entropy_dir(paths: list[str], patching: str, init_from: str = "") -> Path | None:
    """A fresh run's patcher where none is given: for prepared data the model that `blt data
    prepare` used (so the exported BLT carries the patcher its training entropies came from), else
    the patcher of the model a fine-tuning run starts from. (A resumed run uses its own copy,
    `_own_patcher`; a copy left by an attempt without checkpoints is replaced, not used.)"""
    info = prepared_info(paths[0]) if patching == "precomputed" else None
    if info and Path(info.get("entropy_model", "")).is_dir():
        return Path(info["entropy_model"])
    ent = init_model_dir(init_from) / ENTROPY_DIR if init_from else None
    return ent if ent is not None and ent.is_dir() else None


def init_model_dir(init_from: str) -> Path:
    """`train.init_from` as a directory: "bundled" is the model that ships with bltkit."""
    if init_from == "bundled":
        from .bundled import bundled_model_dir

        return bundled_model_dir()
    path = Path(init_from)
    if note := _run_dir_note(path):
        raise ValueError(f"train.init_from={init_from}: {note}")
    if not (path / "config.json").is_file():
        raise ValueError(f"train.init_from={init_from}: not a bltkit model directory (no config.json); "
                         "pass a RUN_DIR/model, `blt convert` output, or 'bundled'")
    return path


# -- model ----------------------------------------------------------------------------------------
