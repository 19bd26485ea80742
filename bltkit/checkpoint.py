"""bltkit's model directory format (docs/checkpoint_format.md): `config.json` + `model.safetensors`,
plus `entropy_model/` (same two files) for a BLT that patches by entropy.

Directories are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written model where a good one was. Loading checks every key and shape and says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_VERSION, BLTConfig, EntropyModelConfig, from_dict, to_dict

FORMAT = "bltkit"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ENTROPY_DIR = "entropy_model"
SUMS = "SHA256SUMS"  # `sha256sum` format; a published model directory lists its files in it


class CheckpointError(ValueError):
    """A model directory is missing, corrupt, or does not match its config."""


def _config_payload(cfg: BLTConfig | EntropyModelConfig) -> dict:
    kind = "blt" if isinstance(cfg, BLTConfig) else "entropy_model"
    return {"format": FORMAT, "config_version": CONFIG_VERSION, "kind": kind, **to_dict(cfg)}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the file readable as the umask allows any other file (safetensors
    0.8 writes it 0600: a shared model folder's weights unreadable to the others)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_dir(state: dict[str, torch.Tensor], cfg, out: Path, dtype: torch.dtype | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    save_tensors(tensors, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(_config_payload(cfg), indent=2) + "\n")


def atomic_dir(path: str | os.PathLike):
    """Context manager yielding a temporary directory that replaces `path` on success."""
    return _AtomicDir(Path(path))


# what a model directory holds in any layout bltkit reads or writes: an existing output folder
# is replaced only if it holds nothing else (`check_output_dir`)
MODEL_FILES = frozenset({CONFIG, WEIGHTS, ENTROPY_DIR, SUMS, "MODEL_CARD.md", "params.json", "consolidated.pth",
                         "train_args.json", "model.safetensors.index.json", "generation_config.json"})


def check_output_dir(path: str | os.PathLike, known=MODEL_FILES, what: str = "a model") -> None:
    """Refuse to write `what` to `path` where that would delete something else: a file, or a folder
    with entries that are not in `known` (a model's files, say, which are replaced whole)."""
    path = Path(path)
    _check_not_cwd(Path(os.path.abspath(path)))
    if path.is_dir():
        other = sorted(p.name for p in path.iterdir()
                       if p.name not in known and not (p.name.startswith("model-") and p.name.endswith(".safetensors")))
        if other:
            listed = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            raise CheckpointError(f"{path} already holds files that are not {what}'s ({listed}); writing {what} "
                                  "there would delete them: choose a new folder, or remove them first")
    elif path.exists():
        raise CheckpointError(f"{path} is a file; {what} is written as a folder: choose another path")


def _check_not_cwd(path: Path) -> None:
    """An absolute output path that is not the current directory nor above it (a folder is
    written by swapping it whole, and those cannot be swapped)."""
    cwd = Path.cwd()
    if cwd == path or path in cwd.parents:
        raise CheckpointError(f"{path} is the current directory or holds it, so it cannot be replaced; "
                              "write into a new folder (a path below this one, say)")


class _AtomicDir:
    def __init__(self, path: Path):
        self.path = Path(os.path.abspath(path))  # ('.', '..', '' named by their own names)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        _check_not_cwd(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_model(model, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save a `BLT` or `EntropyModel` as a bltkit model directory (atomically)."""
    from .model import BLT

    path = Path(path)
    check_output_dir(path)
    with atomic_dir(path) as tmp:
        if isinstance(model, BLT):
            _write_dir(model.blt_state_dict(), model.config, tmp, dtype)
            if model.entropy_model is not None:
                _write_dir(model.entropy_model.state_dict(), model.entropy_model.config, tmp / ENTROPY_DIR, dtype)
        else:
            _write_dir(model.state_dict(), model.config, tmp, dtype)
    return path


def read_config(path: str | os.PathLike) -> BLTConfig | EntropyModelConfig:
    path = Path(path)
    cfg_file = path / CONFIG
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a bltkit model is a folder with {CONFIG} and {WEIGHTS}")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG}; is it a bltkit model directory? "
                              "(convert foreign checkpoints with `blt convert`)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file} holds a JSON {type(d).__name__}, not a config object")
    if d.get("format") != FORMAT:
        hint = " (a transformers or Meta checkpoint? use `blt convert SRC DST --from hf|meta`)" \
            if "model_type" in d or "args" in d else ""
        raise CheckpointError(f"{cfg_file} is not a bltkit config (format={d.get('format')!r}){hint}")
    version = d.get("config_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{cfg_file}: config_version must be a whole number, got {version!r}")
    if version > CONFIG_VERSION:
        raise CheckpointError(f"{cfg_file} has config_version {version}, newer than this bltkit "
                              f"({CONFIG_VERSION}); upgrade bltkit")
    try:
        d = migrate_config(d)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    kind = d.pop("kind", "blt")
    if kind not in ("blt", "entropy_model"):
        raise CheckpointError(f"{cfg_file}: unknown kind {kind!r} (a bltkit config is of kind 'blt' or 'entropy_model')")
    cls = BLTConfig if kind == "blt" else EntropyModelConfig
    try:
        return from_dict(cls, d)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def migrate_config(d: dict) -> dict:
    """Bring an older saved config to CONFIG_VERSION (version 1 is the first)."""
    d = dict(d)
    if d.get("config_version", 1) < 1:
        raise CheckpointError(f"unknown config_version {d.get('config_version')}")
    return d


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError saying why it cannot be used here. Checked before
    any weights are read: safetensors reports a bad device like a damaged file."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (use cpu)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=dev)
        except Exception:  # backends fail in their own ways (RuntimeError, NotImplementedError ...)
            raise ValueError(f"device {device!r} is not available here") from None
    return dev


def load_state(path: Path, device) -> dict[str, torch.Tensor]:
    f = path / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    try:
        return load_file(str(f), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{f} is unreadable or truncated ({e}); re-save or re-convert the model") from None


def one_float_dtype(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every floating tensor in one dtype: where they are mixed (one fp16 tensor among
    fp32 ones loads, then fails in the first matrix product), the widest of them, which holds every
    value exactly (fp16 and bf16 both go to fp32)."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) <= 1:
        return state
    wide = max(dtypes, key=lambda d: (torch.finfo(d).bits, torch.finfo(d).max))
    if torch.finfo(wide).bits == 16:  # bf16 with fp16: neither holds the other
        wide = torch.float32
    return {k: v.to(wide) if v.is_floating_point() else v for k, v in state.items()}


def check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path, skip_prefix: str = "") -> None:
    """Raise CheckpointError naming every missing, unexpected, misshapen or wrongly typed tensor
    (every weight must be floating point: an integer one cannot be a parameter)."""
    expected = {k: v for k, v in module.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(set(state) & set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in common if tuple(state[k].shape) != tuple(expected[k].shape)]
    not_float = [f"{k} ({state[k].dtype})" for k in common
                 if expected[k].is_floating_point() and not state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if not_float:
        problems.append(f"{len(not_float)} tensor(s) not floating point: {', '.join(not_float[:8])}")
    if problems:
        raise CheckpointError(f"{where / WEIGHTS} does not match {where / CONFIG}: " + " | ".join(problems))


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sums(path: Path) -> None:
    """Check every file listed in `path/SHA256SUMS` (when there is one) against its digest."""
    sums = path / SUMS
    if not sums.is_file():
        return
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CheckpointError(f"{sums} line {n} is not '<sha256>  <file>': {line!r}")
        target = path / name
        if not target.is_file():
            raise CheckpointError(f"{target} is listed in {sums} but missing; copy the whole model directory again")
        if file_sha256(target) != digest:
            raise CheckpointError(f"{target} does not match its sha256 in {sums}: the file is damaged or was "
                                  f"changed; copy it again (or delete {SUMS} if you changed it on purpose)")


def _build(cfg):
    from .model import BLT, EntropyModel

    with torch.device("meta"):
        return BLT(cfg) if isinstance(cfg, BLTConfig) else EntropyModel(cfg)


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None):
    """Load a bltkit model directory as a `BLT` (or `EntropyModel`), in eval mode.

    A directory that lists its files in `SHA256SUMS` (the bundled model does) is checked first.

    Args:
        path: the model directory.
        device: where to put the weights (default CPU).
        dtype: cast floating weights to this dtype (default: as stored).
    """
    if device is not None:
        check_device(device)
    path = Path(path)
    cfg = read_config(path)
    verify_sums(path)
    model = _build(cfg)
    state = one_float_dtype(load_state(path, device))
    if isinstance(cfg, BLTConfig):
        check_state(model, state, path, skip_prefix="entropy_model.")
        if cfg.entropy_model is not None:
            ent_path = path / ENTROPY_DIR
            ent_cfg = read_config(ent_path)
            if ent_cfg != cfg.entropy_model:
                raise CheckpointError(f"{ent_path / CONFIG} does not match the entropy_model section of "
                                      f"{path / CONFIG}")
            ent_state = one_float_dtype(load_state(ent_path, device))
            check_state(model.entropy_model, ent_state, ent_path)
            state.update({f"entropy_model.{k}": v for k, v in ent_state.items()})
    else:
        check_state(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype=dtype)
    if isinstance(cfg, BLTConfig) and model.entropy_model is not None:
        model.entropy_model.requires_grad_(False)
    return model.eval()


def load_entropy_model(path: str | os.PathLike, device=None, dtype=None):
    """An entropy model from its own directory or from a BLT directory's `entropy_model/`."""
    path = Path(path)
    cfg = read_config(path)
    if isinstance(cfg, BLTConfig):
        path = path / ENTROPY_DIR
    model = load_model(path, device=device, dtype=dtype)
    return model


def init_model(cfg: BLTConfig | EntropyModelConfig, seed: int = 42, device=None):
    """A randomly initialised model (built on the meta device, then materialised)."""
    model = _build(cfg)
    model.to_empty(device=device or "cpu")
    model.init_weights(seed)
    return model.eval()
