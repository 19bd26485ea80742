"""Training data: document sources, token streams, the resumable batch loader, `blt data prepare`.

Sources yield documents as raw bytes; `TokenStream` holds one split as BOS + (bytes+4) + EOS per
document (spec §2), flat uint16; `BatchLoader` cuts it into non-overlapping windows of seq_len+1
ids and serves them in a seeded per-epoch order that resumes exactly. `prepare` stores each id's
next-byte entropy (fp16, spec §3.3, §12) so training need not run the entropy model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bytes import BOE_ID, BOS_ID, EOS_ID, OFFSET
from .sources import PREPARED, folder_files, iter_documents


@dataclass(kw_only=True)
class DataConfig:
    """Where the bytes come from and how they are split and batched (see docs/data.md)."""

    paths: list[str]
    text_field: str = "text"  # field of .jsonl records / column of Parquet and Arrow data
    seq_len: int = 2048  # bytes per training row x; the loader yields rows of seq_len+1 ids
    val_fraction: float = 0.01
    val_max_bytes: int | None = 2_000_000  # cap on the validation split
    seed: int = 0
    batch_size: int = 8  # rows per process

    def __post_init__(self) -> None:
        if isinstance(self.paths, str | os.PathLike):
            self.paths = [str(self.paths)]
        if not self.paths:
            raise ValueError("DataConfig.paths is empty: give at least one file, folder or dataset")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        if self.val_max_bytes is not None and self.val_max_bytes < 1:
            raise ValueError(f"val_max_bytes must be >= 1 (None: no cap), got {self.val_max_bytes}; "
                             "for no validation split set val_fraction=0")


# -- token streams --------------------------------------------------------------------------------


@dataclass
class TokenStream:
    """One split as flat ids: BOS + (bytes+4) + EOS per document, back to back.

    Attributes:
        ids: uint16 [N].
        doc_starts: int64 [n_docs], index of each document's BOS.
        entropies: float16 [N] or None; entropies[t] is the entropy-model entropy (nats) of the
            byte after ids[t], computed within its document (`prepare`).
    """

    ids: np.ndarray
    doc_starts: np.ndarray
    entropies: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_documents(cls, docs: Iterable[bytes]) -> TokenStream:
        docs = list(docs)
        sizes = np.fromiter((len(d) + 2 for d in docs), np.int64, count=len(docs))
        starts = np.zeros(len(docs), np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        ids = np.empty(int(sizes.sum()), np.uint16)
        ids[starts] = BOS_ID
        ids[starts + sizes - 1] = EOS_ID
        offset = np.uint16(OFFSET)
        for doc, s in zip(docs, starts.tolist(), strict=True):
            np.add(np.frombuffer(doc, np.uint8), offset, out=ids[s + 1:s + 1 + len(doc)], dtype=np.uint16)
        return cls(ids, starts)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    @property
    def n_bytes(self) -> int:
        return len(self.ids) - 2 * self.n_docs

    def document(self, i: int) -> np.ndarray:
        """Ids of document i (BOS ... EOS)."""
        end = self.doc_starts[i + 1] if i + 1 < self.n_docs else len(self.ids)
        return self.ids[self.doc_starts[i]:end]

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "ids.npy", self.ids)
        np.save(path / "doc_starts.npy", self.doc_starts)
        if self.entropies is not None:
            np.save(path / "entropies.npy", self.entropies)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> TokenStream:
        """Load a saved stream (memory-mapped by default, so ranks share the page cache)."""
        path = Path(path)
        mode = "r" if mmap else None
        arrays = {}
        for name in ("ids", "doc_starts", "entropies"):
            f = path / f"{name}.npy"
            if f.is_file():
                arrays[name] = np.load(f, mmap_mode=mode, allow_pickle=False)
            elif name != "entropies":
                raise FileNotFoundError(f"{f} is missing; is {path} a saved TokenStream?")
        s = cls(arrays["ids"], arrays["doc_starts"], arrays.get("entropies"))
        if s.ids.dtype != np.uint16 or s.doc_starts.dtype != np.int64 or (
                s.entropies is not None and (s.entropies.dtype != np.float16 or len(s.entropies) != len(s.ids))):
            raise ValueError(f"{path}: unexpected array types or lengths; rebuild it")
        return s


def _split_scores(seed: int, n: int) -> np.ndarray:
    """A uniform [0, 1) score per document: SplitMix64 of (seed << 32) + index, stable everywhere."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64((seed & (2**32 - 1)) << 32)) * golden + golden
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def _byte_split(doc: bytes, n_val: int) -> tuple[bytes, bytes]:
    """The last n_val bytes (moved back to the start of their line) become validation."""
    cut = len(doc) - n_val
    nl = doc.rfind(b"\n", 0, cut)
    if nl > 0:
        cut = nl + 1
    return doc[:cut].rstrip(b"\n"), doc[cut:]


def split_documents(docs: list[bytes], val_fraction: float, val_max_bytes: int | None,
                    seed: int) -> tuple[list[bytes], list[bytes]]:
    """Deterministic train/val split (see docs/data.md, "Splitting").

    Document i goes to val iff its SplitMix64 score of (seed, i) is below val_fraction, while val
    stays within val_max_bytes and within twice val_fraction of all bytes (later picks go to train).
    When that leaves val empty (one document, or a few big ones), the last document is cut instead:
    its final val_fraction of bytes (capped), moved back to a line start, become val.
    """
    if val_fraction <= 0 or not docs:
        return docs, []
    total = sum(map(len, docs))
    cap = max(1, min(val_max_bytes if val_max_bytes is not None else total, int(2 * val_fraction * total)))
    train, val, val_bytes = [], [], 0
    if len(docs) > 1:
        for doc, score in zip(docs, _split_scores(seed, len(docs)).tolist(), strict=True):
            if score < val_fraction and val_bytes + len(doc) <= cap:
                val.append(doc)
                val_bytes += len(doc)
            else:
                train.append(doc)
    if not val:
        n_val = min(max(1, round(val_fraction * len(docs[-1]))), cap)
        head, tail = _byte_split(docs[-1], n_val)
        if not head or not tail:
            raise ValueError("the data is too small to split off a validation set; add data or set "
                             "val_fraction=0")
        train, val = [*docs[:-1], head], [tail]
    if not train:
        raise ValueError("every document went to validation; lower val_fraction")
    return train, val


def _fingerprint(path: str) -> list:
    p = Path(path)
    if path.startswith("hf:") or not p.exists():
        return [path]
    files = folder_files(p) if p.is_dir() else [p]
    return [str(p.resolve())] + [(str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files]


def prepared_info(path: str | os.PathLike) -> dict | None:
    """The `prepare.json` of a `blt data prepare` output folder, or None for anything else."""
    f = Path(path) / PREPARED
    return json.loads(f.read_text()) if f.is_file() else None


def build_streams(cfg: DataConfig, cache_dir: str | os.PathLike | None = None) -> tuple[TokenStream, TokenStream]:
    """Read, split and tokenise `cfg.paths` into (train, val) streams.

    A `blt data prepare` folder (given as the only path) is loaded as it is, entropies included.
    With `cache_dir`, the streams are stored under a key of the paths (their files' sizes and
    mtimes) and split settings, so a big corpus is tokenised once. In multi-process runs let one
    rank build the cache first, then the others load it.
    """
    if any(prepared_info(p) for p in cfg.paths):
        if len(cfg.paths) != 1:
            raise ValueError("a prepared data folder must be the only entry of data.paths")
        root = Path(cfg.paths[0])
        return TokenStream.load(root / "train"), TokenStream.load(root / "val")
    target = None
    if cache_dir is not None:
        key = {"paths": [_fingerprint(p) for p in cfg.paths], "text_field": cfg.text_field, "version": 1,
               "val_fraction": cfg.val_fraction, "val_max_bytes": cfg.val_max_bytes, "seed": cfg.seed}
        target = Path(cache_dir) / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        if (target / "train" / "ids.npy").is_file():
            return TokenStream.load(target / "train"), TokenStream.load(target / "val")
    docs = [d for p in cfg.paths for d in iter_documents(p, cfg.text_field)]
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.val_max_bytes, cfg.seed)
    del docs
    train, val = TokenStream.from_documents(train_docs), TokenStream.from_documents(val_docs)
    if target is not None:
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        train.save(tmp / "train")
        val.save(tmp / "val")
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return train, val


# -- batches --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Rows of seq_len+1 ids (x = tokens[:, :-1], y = tokens[:, 1:]); targets equal to 0 (BOE
    padding) must be ignored by the loss (spec §12). `entropies` is aligned with `tokens`."""

    tokens: torch.Tensor  # int64 [B, L]
    entropies: torch.Tensor | None = None  # float32 [B, L]


class BatchLoader:
    """Non-overlapping windows of seq_len+1 ids, shuffled per epoch, sharded by rank, resumable.

    Window i = ids[i*seq_len : i*seq_len + seq_len + 1]: consecutive windows share one id, so each
    id but the first is a target once per epoch. Epoch e visits the windows in the order of
    `np.random.default_rng([seed, e]).permutation`; a global batch is batch_size*world_size
    consecutive windows of it and rank r takes slice r. drop_last=True drops the incomplete last
    global batch of each epoch (and the tail shorter than a window); drop_last=False keeps both
    (the tail window padded with 0, the last batch possibly shorter, on some ranks empty).
    Iteration never ends; the state is one position in the epoch's order, identical on every rank.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True):
        if len(stream) == 0:
            raise ValueError("cannot batch an empty token stream (no documents in this split?)")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        n = len(stream) - 1  # targets
        full = n // seq_len
        self.windows_per_epoch = max(full, 1) if drop_last else -(-n // seq_len)
        self.global_batch = batch_size * world_size
        if drop_last and self.windows_per_epoch < self.global_batch:
            raise ValueError(f"the stream has {self.windows_per_epoch} window(s) of {seq_len + 1} ids, fewer "
                             f"than one global batch ({batch_size} x {world_size} ranks); lower batch_size or "
                             "seq_len, or add data")
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        g = self.global_batch
        return self.windows_per_epoch // g if self.drop_last else -(-self.windows_per_epoch // g)

    @property
    def step_in_epoch(self) -> int:
        return self.position // self.global_batch

    def _epoch_end(self) -> int:
        return self.batches_per_epoch * self.global_batch if self.drop_last else self.windows_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch `epoch` visits them."""
        if self._order is None or self._order[0] != epoch:
            n = self.windows_per_epoch
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def next_batch(self) -> Batch:
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        stop = min(start + self.batch_size, self._epoch_end())
        windows = self.order(self.epoch)[start:stop] if start < stop else np.zeros(0, np.int64)
        self.position += self.global_batch
        return self._gather(windows)

    def _gather(self, windows: np.ndarray) -> Batch:
        L, s = self.seq_len + 1, self.stream
        tokens = np.full((len(windows), L), BOE_ID, np.int64)
        ent = None if s.entropies is None else np.zeros((len(windows), L), np.float32)
        for r, w in enumerate(windows.tolist()):
            a = w * self.seq_len
            piece = s.ids[a:a + L]
            tokens[r, :len(piece)] = piece
            if ent is not None:
                ent[r, :len(piece)] = s.entropies[a:a + L]
        return Batch(torch.from_numpy(tokens), None if ent is None else torch.from_numpy(ent))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "window_in_epoch": self.position,
                "seed": self.seed, "windows_per_epoch": self.windows_per_epoch, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the next unseen batch; the world size may differ from the saving run's."""
        for k in ("seed", "windows_per_epoch", "shuffle"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"data loader state has {k}={state[k]!r} but this loader has "
                                 f"{getattr(self, k)!r}: the data or its settings changed since it was saved")
        self.epoch = int(state["epoch"])
        self.position = int(state.get("window_in_epoch", int(state["step_in_epoch"]) * self.global_batch))


# -- prepare --------------------------------------------------------------------------------------


def stream_entropies(model, stream: TokenStream, batch_size: int = 8, progress=None) -> np.ndarray:
    """Each id's next-byte entropy (nats, stored fp16) from `model`, one document at a time.

    Documents longer than `model.config.max_seqlen` ids are cut into chunks of that length run
    independently, so the entropy context resets every max_seqlen ids, as in Meta's preprocessing
    (spec §3.3). Chunks are sorted by length and batched at about batch_size * max_seqlen ids per
    forward, each batch right-padded with 0 to a power of two (padding never reaches earlier
    positions: the model is causal).
    """
    if stream.n_docs == 0:  # an empty split (val_fraction=0)
        return np.zeros(0, np.float16)
    M = model.config.max_seqlen
    device = next(model.parameters()).device
    # compiled flex kernels need head_dim >= 16 (tiny test presets have 8)
    impl = "flex" if device.type == "cuda" and model.config.head_dim >= 16 else "sdpa"
    ends = np.append(stream.doc_starts[1:], len(stream)).tolist()
    chunks = [(c, min(M, e - c)) for s, e in zip(stream.doc_starts.tolist(), ends, strict=True)
              for c in range(s, e, M)]
    chunks.sort(key=lambda c: -c[1])
    bucket = [min(M, 1 << max(6, (n - 1).bit_length())) for _, n in chunks]
    out = np.zeros(len(stream), np.float16)
    i = 0
    while i < len(chunks):
        width = bucket[i]
        rows = max(1, batch_size * M // width)
        j = i + 1
        while j < len(chunks) and j - i < rows and bucket[j] == width:
            j += 1
        group, i = chunks[i:j], j
        n_rows = rows if impl == "flex" else len(group)  # fixed shapes for the compiled kernel
        tokens = np.zeros((n_rows, width), np.int64)
        for r, (a, n) in enumerate(group):
            tokens[r, :n] = stream.ids[a:a + n]
        H = model.entropies(torch.from_numpy(tokens).to(device), impl=impl).float().cpu().numpy()
        for r, (a, n) in enumerate(group):
            out[a:a + n] = H[r, :n]
        if progress is not None:
            progress.update(sum(n for _, n in group))
    return out


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of an entropy model's weights: the directory's own, or those of the entropy model
    a BLT directory carries (what `prepare.json` records, and what training checks it against)."""
    from .checkpoint import ENTROPY_DIR, WEIGHTS, file_sha256

    return file_sha256(model_dir / WEIGHTS if not (model_dir / ENTROPY_DIR).is_dir()
                       else model_dir / ENTROPY_DIR / WEIGHTS)


def prepare(cfg: DataConfig, entropy_model_dir: str | os.PathLike, out_dir: str | os.PathLike,
            device: str = "cpu", batch_size: int = 8) -> dict:
    """Tokenise and split `cfg.paths` and store every id's entropy: the `blt data prepare` output.

    Writes `out_dir/{train,val}/{ids,doc_starts,entropies}.npy` and `out_dir/prepare.json`
    (entropy model and its weights' sha256, data settings, counts, throughput); returns that dict.
    `build_streams(DataConfig(paths=[out_dir]))` loads the result.
    """
    from tqdm.auto import tqdm

    from .checkpoint import atomic_dir, check_output_dir, load_entropy_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_output_dir(out_dir, {"train", "val", PREPARED}, "prepared data")  # before the work, not after
    model = load_entropy_model(entropy_model_dir, device=device, dtype=torch.float32)
    train, val = build_streams(cfg)
    t0 = time.perf_counter()
    with tqdm(total=len(train) + len(val), unit="B", unit_scale=True, desc="entropies",
              disable=not sys.stderr.isatty()) as bar:
        for s in (train, val):
            s.entropies = stream_entropies(model, s, batch_size, bar)
    seconds = time.perf_counter() - t0
    info = {"format": "bltkit-prepared", "version": 1,
            "entropy_model": str(Path(entropy_model_dir).resolve()),
            "entropy_model_sha256": weights_sha256(Path(entropy_model_dir)),
            "entropy_max_seqlen": model.config.max_seqlen, "paths": [str(p) for p in cfg.paths],
            "text_field": cfg.text_field, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
            "val_max_bytes": cfg.val_max_bytes, "seed": cfg.seed, "device": str(device),
            "seconds": round(seconds, 3), "bytes_per_second": round((len(train) + len(val)) / max(seconds, 1e-9)),
            **{name: {"documents": s.n_docs, "bytes": s.n_bytes, "ids": len(s)}
               for name, s in (("train", train), ("val", val))}}
    with atomic_dir(out_dir) as tmp:
        train.save(tmp / "train")
        val.save(tmp / "val")
        (tmp / PREPARED).write_text(json.dumps(info, indent=2) + "\n")
    return info
