"""Bits per byte of a tokenized language model (a BPE baseline) on the same documents as
`bltkit.eval.bpb`, so that a BLT and a token-level model compare in one unit (the `hf` extra).

A Hugging Face causal LM (`transformers.AutoModelForCausalLM` with its tokenizer, a local folder or
a hub id) reads each document as its tokenizer splits it, between the tokenizer's BOS and EOS
tokens (where it has only one, or they are one token, as GPT-2's <|endoftext|>, one between
documents), the documents one stream cut into windows
of the model's length, each token after a window's first predicted once (the windowing of
`bltkit.eval.bpb`). The nats of all those predictions are divided by ln 2 times the same count a
BLT's bits per byte divides by: the documents' bytes plus, for their BOS and EOS, 2 a document less
one. Both then measure the bits to encode the same documents, boundaries included, per byte.
Documents must be valid UTF-8 (a tokenizer reads text; a BLT reads any bytes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..bytes import utf8_text
from .bpb import MAX_WINDOW


def load_baseline(name: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a Hugging Face causal LM, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("a BPE baseline is a transformers model: pip install 'bltkit[hf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
        model = AutoModelForCausalLM.from_pretrained(str(name), dtype=dtype).to(device).eval()
    except OSError as e:
        raise ValueError(f"cannot load the baseline {name}: {e}") from None
    return model, tokenizer


def _ids(docs, tokenizer, where: str) -> tuple[list[int], int, int, int]:
    """The token stream of `docs` (BOS + tokens + EOS each; where the tokenizer's BOS is its EOS, as
    GPT-2's <|endoftext|>, one between documents: it never saw two in a row), their byte count,
    document count and count of the documents' own tokens (markers not counted)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos, eos = (bos if bos is not None else eos), (eos if eos is not None else bos)
    if bos is None:
        raise ValueError("the baseline's tokenizer has neither a BOS nor an EOS token to mark documents")
    ids: list[int] = []
    n_bytes = n_docs = n_tokens = 0
    for i, doc in enumerate(docs):
        text = utf8_text(doc, f"{where}: document {i} (the baseline's tokenizer reads text)")
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += [*([] if ids and bos == eos else [bos]), *toks, eos]
        n_bytes += len(doc)
        n_docs += 1
        n_tokens += len(toks)
    return ids, n_bytes, n_docs, n_tokens


# the default window's tokens where a model allows more (some allow 131,072: a batch of those would
# not fit in memory): as many as a BLT's bits per byte reads bytes at most
DEFAULT_SEQ_LEN = MAX_WINDOW


@torch.no_grad()
def baseline_bpb(model, tokenizer, paths: Sequence[str | os.PathLike], seq_len: int | None = None,
                 batch_size: int = 8, text_field: str = "text", max_bytes: int | None = None) -> dict:
    """Bits per byte of a tokenized model on each source and overall, comparable to `evaluate_bpb`'s.

    Returns {"files": [{"path", "bytes", "documents", "tokens", "nats", "bpb", "bytes_per_token"}],
    "overall": {"bytes", "nats", "bpb"}, "seq_len"}; `seq_len` is tokens a window (default: the
    model's position limit, at most DEFAULT_SEQ_LEN). Each source's nats are divided by the bytes a
    BLT's bits per byte divides by (its bytes, and BOS and EOS a document but the first BOS).
    """
    from ..data import iter_documents
    from .bpb import _first_bytes

    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(limit or 1024, DEFAULT_SEQ_LEN) if seq_len is None else seq_len
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 tokens and batch_size >= 1, got {seq_len}, {batch_size}")
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the baseline's {limit} positions")
    device = next(model.parameters()).device
    files = []
    for path in paths:
        try:
            ids, n_bytes, n_docs, n_tokens = _ids(_first_bytes(iter_documents(path, text_field), max_bytes), tokenizer,
                                        str(path))
        except ValueError as e:
            cut = f" (--max-bytes {max_bytes} may cut a character: try a few more or fewer)" if max_bytes else ""
            raise ValueError(f"{e}{cut}") from None
        if n_docs == 0:
            raise ValueError(f"{path} holds no documents")
        windows = [ids[s:s + seq_len] for s in range(0, len(ids) - 1, seq_len - 1)]  # overlapping by one id
        windows = [w for w in windows if len(w) >= 2]
        nats = 0.0
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            T = max(len(w) for w in chunk)
            x = torch.full((len(chunk), T), tokenizer.pad_token_id or 0, dtype=torch.long, device=device)
            mask = torch.zeros(len(chunk), T, dtype=torch.long, device=device)
            for r, w in enumerate(chunk):
                x[r, :len(w)] = torch.tensor(w)
                mask[r, :len(w)] = 1
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            lp = F.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
            nats -= float((lp * mask[:, 1:]).sum())
        targets = n_bytes + 2 * n_docs - 1  # what a BLT's bits per byte divides by
        files.append({"path": str(path), "bytes": n_bytes, "documents": n_docs, "tokens": n_tokens,
                      "nats": nats, "bpb": nats / (math.log(2) * targets), "targets": targets,
                      "bytes_per_token": n_bytes / max(1, n_tokens)})
    nats, targets = sum(f["nats"] for f in files), sum(f["targets"] for f in files)
    return {"files": files, "overall": {"bytes": sum(f["bytes"] for f in files), "targets": targets, "nats": nats,
                                        "bpb": nats / (math.log(2) * targets)}, "seq_len": seq_len}
