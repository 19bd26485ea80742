"""Byte codec: special ids, the +4 offset, encode/decode and an incremental UTF-8 decoder.

Ids (spec §2): BOE=0 (padding), BOS=1, EOS=2, BPE delimiter=3, byte b -> b+4; vocabulary 260.
`encode` never normalises or truncates; `decode` drops special ids. `Utf8Stream` turns a stream
of byte ids into text pieces that never split a code point (for streaming generation).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

BOE_ID = 0
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET


def encode(text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
    """Encode text (UTF-8) or raw bytes to ids: optional BOS, each byte + 4, optional EOS.

    Args:
        text: a `str` (encoded as UTF-8, no normalisation) or `bytes` taken as they are.
        bos: prepend BOS (1). Generation prompts and training documents both start with it.
        eos: append EOS (2). Training documents end with it; prompts do not.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = [b + OFFSET for b in data]
    if bos:
        ids.insert(0, BOS_ID)
    if eos:
        ids.append(EOS_ID)
    return ids


def to_bytes(ids: Iterable[int], stop_at_eos: bool = False) -> bytes:
    """Raw bytes of `ids`: special ids (< 4) and negative pads are dropped."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if stop_at_eos and i == EOS_ID:
            break
        if OFFSET <= i < VOCAB_SIZE:
            out.append(i - OFFSET)
        elif i >= VOCAB_SIZE:
            raise ValueError(f"id {i} is outside the byte vocabulary 0..{VOCAB_SIZE - 1}")
    return bytes(out)


def decode(ids: Iterable[int], errors: str = "ignore", stop_at_eos: bool = False) -> str:
    """Decode ids to text. Invalid or partial UTF-8 is dropped by default (Meta's behaviour);
    pass `errors="replace"` to see it as U+FFFD instead."""
    return to_bytes(ids, stop_at_eos=stop_at_eos).decode("utf-8", errors=errors)


def check_ids(ids: Sequence[int] | object, vocab_size: int = VOCAB_SIZE) -> None:
    """Raise ValueError if any id lies outside 0..vocab_size-1 (works on lists and tensors)."""
    import torch

    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        bad = t[(t < 0) | (t >= vocab_size)].flatten()[:5].tolist()
        raise ValueError(
            f"token ids must lie in 0..{vocab_size - 1} (BOE=0, BOS=1, EOS=2, bytes+4); got {bad}. "
            "Use bltkit.bytes.encode() to turn text into ids."
        )


class Utf8Stream:
    """Incremental decoder: feed byte ids, get back only complete characters.

    Invalid sequences become U+FFFD (the streaming display should show, not hide, bad bytes);
    an incomplete trailing sequence is held back until it completes or `flush()` is called.
    """

    def __init__(self, errors: str = "replace"):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def feed(self, ids: Iterable[int]) -> str:
        return self._decoder.decode(to_bytes(ids), final=False)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def utf8_text(data: bytes, where: str) -> str:
    """`data` as text, or a ValueError that says where it is not UTF-8 (line and column) and what
    to do about it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{where} is not valid UTF-8: byte 0x{data[e.start]:02x} at line {line}, column {col}; "
                         "text is read as UTF-8 (convert it first, e.g. iconv -f latin1 -t utf-8)") from None
