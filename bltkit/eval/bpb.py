"""Bits per byte (spec §12): Σ cross-entropy (nats) / (ln 2 · counted targets).

Each source is encoded BOS + bytes + EOS per document (BOS/EOS targets count, as Meta counts
them), cut into non-overlapping windows of seq_len+1 ids, and scored with `model(x)` in fp32;
targets equal to 0 (BOE padding of the last window) are ignored. Works for a BLT (which patches
itself) and for an EntropyModel (a plain byte LM).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import BatchLoader, TokenStream, iter_documents
from ..model.patching import starts_to_lengths

NOTE = "BOS and EOS targets count (as in Meta's evaluation); targets equal to 0 (padding) do not"


# a window's most bytes (the BPE baseline's default window is as many tokens)
MAX_WINDOW = 4096


def default_seq_len(model) -> int:
    """Bytes per window: min(max_bytes, MAX_WINDOW, max_patches - 1) for a BLT (one-byte patches
    must still fit the global model), `max_seqlen` for an EntropyModel."""
    cfg = model.config
    if hasattr(cfg, "max_bytes"):
        return min(cfg.max_bytes, MAX_WINDOW, cfg.max_patches - 1)
    return cfg.max_seqlen


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _summary(nats: float, targets: int) -> dict:
    return {"targets": targets, "nats": nats, "bpb": nats / (math.log(2) * targets) if targets else float("nan")}


@torch.no_grad()
def bpb_of_stream(model, stream: TokenStream, seq_len: int | None = None, batch_size: int = 8,
                  device: str | torch.device | None = None, max_batches: int | None = None,
                  rank: int = 0, world_size: int = 1, progress: bool = False) -> dict:
    """Bits per byte of one token stream, windows in stream order (the trainer's validation).

    Args:
        model: a BLT or an EntropyModel; put in eval mode for the call, its mode restored after.
        stream: the ids; if it carries precomputed entropies and the model patches by entropy,
            they place the patches (as in training on prepared data).
        seq_len: bytes per window (default `default_seq_len(model)`).
        max_batches: score only the first this many batches (per rank).
        rank, world_size: score this rank's share; sum "nats" and "targets" over ranks yourself.

    Returns:
        {"targets", "nats", "bpb", "windows"}.
    """
    seq_len = default_seq_len(model) if seq_len is None else seq_len  # 0 is an error (BatchLoader)
    device = torch.device(device) if device is not None else _model_device(model)
    loader = BatchLoader(stream, batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False,
                         drop_last=False)
    n_batches = loader.batches_per_epoch if max_batches is None else min(max_batches, loader.batches_per_epoch)
    use_entropies = stream.entropies is not None and hasattr(model, "patch_starts") and \
        model.config.patcher.mode == "entropy"
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    patches = torch.zeros((), dtype=torch.long, device=device)
    real_bytes = torch.zeros((), dtype=torch.long, device=device)
    targets = windows = 0
    try:
        for _ in tqdm(range(n_batches), desc="bpb", unit="batch", leave=False,
                      disable=not (progress and sys.stderr.isatty() and n_batches > 4)):
            batch = loader.next_batch()
            if len(batch.tokens) == 0:
                continue
            tokens = batch.tokens.to(device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            if hasattr(model, "patch_starts"):  # a BLT: patch here, to count the patches too
                ent = batch.entropies[:, :-1].to(device) if use_entropies else None
                starts = model.patch_starts(x, ent)
                real = x != 0  # BOE padding of the last window
                patches += (starts[:, :-1] & real).sum()  # (no boolean indexing: no host sync)
                real_bytes += real.sum()
                logits = model(x, patch_lengths=starts_to_lengths(starts))
            else:
                logits = model(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            mask = y.flatten() != 0
            nats += ce[mask].sum(dtype=torch.float64)
            targets += int(mask.sum())
            windows += len(tokens)
    finally:
        model.train(was_training)
    mean_patch = float(real_bytes) / float(patches) if int(patches) else None
    return _summary(float(nats), targets) | {"windows": windows, "mean_patch_len": mean_patch}


def _load(model, device):
    if isinstance(model, str | os.PathLike):
        from ..checkpoint import load_model

        return load_model(model, device=device, dtype=torch.float32)
    if device is not None:
        from ..checkpoint import check_device

        model = model.to(check_device(device))
    return model


def _first_bytes(docs, max_bytes: int | None):
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        yield doc[:left]
        left -= min(left, len(doc))
        if left == 0:
            return


def evaluate_bpb(model, paths: Sequence[str | os.PathLike], seq_len: int | None = None, batch_size: int = 8,
                 device: str | torch.device | None = None, text_field: str = "text",
                 max_bytes: int | None = None) -> dict:
    """Bits per byte of each source and overall (weighted by targets).

    Args:
        model: a BLT or EntropyModel, or a model directory (loaded in fp32).
        paths: files, folders, .jsonl/.parquet/arrow data (see `bltkit.data.iter_documents`).
        seq_len: bytes per window (default `default_seq_len(model)`).
        device: where to run (default: where the model is; a given device moves the model).
        max_bytes: score only the first max_bytes bytes of each source (documents in order, the
            last one cut there); `bytes` in the result counts what was scored.

    Returns:
        {"files": [{"path", "bytes", "documents", "targets", "nats", "bpb", "mean_patch_len"
        (bytes per patch, BLT only)}, ...],
         "overall": {"bytes", "targets", "nats", "bpb"}, "seq_len", "max_bytes", "note"}.
    """
    # checked before the model is loaded and the data read
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_bytes", max_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model = _load(model, device)
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    files = []
    for path in paths:
        stream = TokenStream.from_documents(_first_bytes(iter_documents(path, text_field), max_bytes))
        r = bpb_of_stream(model, stream, seq_len, batch_size, device, progress=True)
        files.append({"path": str(path), "bytes": stream.n_bytes, "documents": stream.n_docs,
                      "targets": r["targets"], "nats": r["nats"], "bpb": r["bpb"],
                      "mean_patch_len": r["mean_patch_len"]})
    overall = _summary(sum(f["nats"] for f in files), sum(f["targets"] for f in files))
    return {"files": files, "overall": {"bytes": sum(f["bytes"] for f in files), **overall},
            "seq_len": seq_len, "max_bytes": max_bytes, "note": NOTE}
