"""Patch inspection: per-byte entropies and boundaries, as data and as terminal text."""

from __future__ import annotations

import dataclasses
import math

import torch

from .bytes import BOS_ID, OFFSET, encode


def patch_report(model_dir: str, text: str, mode: str | None = None, threshold: float | None = None,
                 max_patch_length: int | None = None, patch_size: float | None = None) -> dict:
    """Entropies, starts and patches of `text` under a model's patcher (with optional overrides).

    `model_dir` is a BLT directory or an entropy-model directory (entropy patching only).
    """
    from .checkpoint import load_model
    from .config import PatcherConfig
    from .model import EntropyModel, patching

    changes = {k: v for k, v in (("mode", mode), ("threshold", threshold), ("max_patch_length", max_patch_length),
                                 ("patch_size", patch_size)) if v is not None}
    # what PatcherConfig refuses whatever the mode (a NaN threshold, say) is refused before the model loads
    dataclasses.replace(PatcherConfig(), **{k: v for k, v in changes.items() if k in ("threshold", "max_patch_length")})
    model = load_model(model_dir, dtype=torch.float32)  # entropies in fp32 (spec §3.3), as generation has them
    if isinstance(model, EntropyModel):
        entropy_model, pc = model, PatcherConfig()
    else:
        entropy_model, pc = model.entropy_model, model.config.patcher
    pc = dataclasses.replace(pc, **changes)
    tokens = torch.tensor([encode(text)])
    entropies = entropy_model.entropies(tokens)[0] if entropy_model is not None else None
    if pc.mode == "entropy" and entropies is None:
        raise ValueError(f"{model_dir} has no entropy model; choose --mode space, static or byte")
    # every mode, also beside an entropy model alone (which took entropy patching whatever the mode)
    starts = patching.starts_for(pc, tokens, None if entropies is None else entropies[None])[0]
    T = tokens.shape[1]
    ids = tokens[0].tolist()
    start_pos = [t for t in range(T) if bool(starts[t])]
    pieces = []
    for i, s in enumerate(start_pos):
        e = start_pos[i + 1] if i + 1 < len(start_pos) else T
        pieces.append(ids[s:e])
    lengths = [len(p) for p in pieces]
    text_pieces = [bytes(b - OFFSET for b in p if b >= OFFSET).decode("utf-8", errors="replace") for p in pieces]
    real = [n for n, p in zip(lengths, pieces, strict=True) if p != [BOS_ID]]
    return {
        "text": text, "tokens": ids, "mode": pc.mode, "threshold": pc.threshold if pc.mode == "entropy" else None,
        "entropies": entropies.tolist() if entropies is not None else None,
        "starts": start_pos, "patch_lengths": lengths, "patches": text_pieces,
        "next_starts_patch": bool(starts[T]), "mean_patch_length": sum(real) / max(1, len(real)),
        "n_bytes": T - 1, "n_patches": len(real),
    }


def _show_byte(i: int) -> str:
    if i < OFFSET:
        return {0: "<boe>", 1: "<s>", 2: "</s>", 3: "<bpe>"}[i]
    b = i - OFFSET
    if b == 0x20:
        return "␠"
    if b == 0x0A:
        return "⏎"
    return chr(b) if 0x21 <= b < 0x7F else f"\\x{b:02x}"


def render_patch_report(r: dict) -> str:
    """A readable view: the text cut at patch starts, then one row per byte with its entropy."""
    lines = [" | ".join(p.replace("\n", "⏎") for p in r["patches"] if p)]
    lines.append(f"{r['n_bytes']} bytes, {r['n_patches']} patches, mean patch length {r['mean_patch_length']:.2f}"
                 + (f", threshold {r['threshold']:.4f} nats" if r["threshold"] is not None else "")
                 + f", mode {r['mode']}")
    lines.append("")
    lines.append("  pos  byte    H(next)  bar")
    starts = set(r["starts"])
    H = r["entropies"]
    for t, i in enumerate(r["tokens"]):
        h = f"{H[t]:7.3f}" if H is not None else "      -"
        bar = "█" * round(H[t] * 4) if H is not None else ""
        over = " >θ" if H is not None and r["threshold"] is not None and H[t] > r["threshold"] else ""
        mark = "▶" if t in starts else " "
        lines.append(f"{mark}{t:4d}  {_show_byte(i):<6} {h}  {bar}{over}")
    lines.append("▶ = byte starts a patch; H(next) is the entropy (nats) of the byte after it")
    return "\n".join(lines)


def render_patch_html(r: dict) -> str:
    """A standalone HTML page of a patch report: the text with each patch a box of its own (two
    shades in turn), its left edge the darker the higher the entropy that opened it (H of the byte
    before it; red past the threshold), and a tooltip with its bytes and that entropy."""
    import html

    H, theta, starts = r["entropies"], r["threshold"], r["starts"]
    top = (max(H) if H else 0.0) or 1.0  # (every entropy 0: no shade to scale)
    spans = []
    for k, (text, s) in enumerate(zip(r["patches"], starts, strict=True)):
        if r["tokens"][s:s + r["patch_lengths"][k]] == [BOS_ID]:
            continue  # BOS's own patch
        h = H[s - 1] if H is not None and s >= 2 else None  # (byte 1 starts a patch by rule)
        edge = "#999" if h is None else (f"rgb({int(255 * h / top)},0,0)" if theta is not None and h > theta
                                         else f"rgb(0,0,{int(255 * h / top)})")
        tip = f"patch {k}: {r['patch_lengths'][k]} bytes" + (f"; opened at H = {h:.3f} nats" if h is not None else "")
        spans.append(f'<span class="p{k % 2}" style="border-left-color:{edge}" title="{html.escape(tip)}">'
                     f"{html.escape(text)}</span>")
    summary = (f"{r['n_bytes']} bytes, {r['n_patches']} patches, mean patch length {r['mean_patch_length']:.2f}, "
               f"mode {r['mode']}" + (f", threshold {theta:.4f} nats" if theta is not None else ""))
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>BLT patches</title><style>"
            "body{font-family:sans-serif;margin:2em}"
            ".t{font-family:monospace;white-space:pre-wrap;line-height:2}"
            ".p0,.p1{border-left:3px solid;padding:1px 1px}.p0{background:#eef}.p1{background:#efe}"
            "</style></head><body>\n"
            f"<p>{html.escape(summary)}</p>\n<p class=\"t\">{''.join(spans)}</p>\n"
            "<p><small>each box is a patch; its left edge shows the entropy of the byte before it, which opened it "
            "(darker: higher; red: over the threshold)</small></p>\n</body></html>\n")


@torch.no_grad()
def calibrate_threshold(model_dir: str, paths: list[str], target_mean_patch: float, max_bytes: int = 2_000_000,
                        seq_len: int = 4096, device: str | None = None) -> dict:
    """The entropy threshold that gives a mean patch of `target_mean_patch` bytes on `paths`.

    Entropies come from the model's entropy model (or an entropy-model directory) over windows
    of `seq_len` bytes; patch starts are the positions t >= 2 with H[t-1] > θ, so θ is the
    (1 - 1/target) quantile of the entropies (BOS and the always-starting positions aside).
    """
    from .checkpoint import load_model
    from .data import iter_documents
    from .model import EntropyModel

    if not 1 <= target_mean_patch < math.inf:  # a patch holds at least one byte
        raise ValueError(f"target mean patch length must be a finite number of bytes >= 1, "
                         f"got {target_mean_patch}")
    for name, value in (("max_bytes", max_bytes), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model = load_model(model_dir, device=device, dtype=torch.float32)  # entropies in fp32 (spec §3.3)
    em = model if isinstance(model, EntropyModel) else model.entropy_model
    if em is None:
        raise ValueError(f"{model_dir} has no entropy model to calibrate")
    dev = em.output.weight.device
    values, used = [], 0
    for path in paths:
        for doc in iter_documents(path):
            ids = encode(doc[: max_bytes - used])
            for s in range(0, len(ids) - 1, seq_len):
                chunk = torch.tensor([ids[s:s + seq_len]], device=dev)
                values.append(em.entropies(chunk)[0, 1:].float().cpu())  # H[0] never decides
            used += len(doc)
            if used >= max_bytes:
                break
        if used >= max_bytes:
            break
    if not values:
        raise ValueError("no text to calibrate on")
    H = torch.cat(values)
    q = 1.0 - 1.0 / target_mean_patch
    theta = float(torch.quantile(H[: 16_000_000], q))
    return {"threshold": theta, "target_mean_patch": target_mean_patch, "bytes": int(H.numel()),
            "mean_patch": float(H.numel() / max(1, int((H > theta).sum()))), "mean_entropy": float(H.mean())}
