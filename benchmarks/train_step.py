"""Training-step throughput: bltkit vs transformers' BltForCausalLM, same weights, same patches.

Builds a randomly initialised model of a preset (default blt-1b) on the device, trains it for
--steps AdamW steps on random bytes with fixed pseudo-random patch lengths (1..8, mean ~4.5, the
first 1) under bf16 autocast (fp32 master weights), then does the same with BltForCausalLM
loaded from our exported weights. Reports bytes/s, peak memory and MFU (bltkit's FLOP count,
`bltkit.flops.train_flops_per_byte`, no entropy model since patches are given) for both.

    python benchmarks/train_step.py                       # one GPU: blt-1b, 1 x 8192 bytes
    python benchmarks/train_step.py --compile --hash-vocab 131072
    python benchmarks/train_step.py --preset tiny --steps 3   # CPU smoke test

blt-1b's hash tables hold 3.07B parameters; with AdamW that is ~49 GB of training state on its
own, so `--hash-vocab auto` (default) keeps the full 500,002 rows only when the whole model's
training state fits in 60% of the GPU memory and otherwise shrinks the tables (printed). The
table size changes memory and the optimizer step, not the FLOPs per byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from bltkit.checkpoint import init_model
from bltkit.distributed import compile_blocks
from bltkit.flops import count_params, peak_flops, train_flops_per_byte
from bltkit.model.patching import normalize_lengths
from bltkit.optim import clip_and_step
from bltkit.presets import get_preset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="blt-1b", help="BLT preset (default blt-1b)")
    p.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="bytes per row (default 8192; 512 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--hash-vocab", default="auto", help="rows per hash table: auto (default) or a number")
    p.add_argument("--compile", action="store_true", help="compile bltkit's blocks (block.compile())")
    p.add_argument("--attn", choices=["auto", "flex", "sdpa"], default="auto",
                   help="bltkit attention (auto: flex on CUDA, sdpa on CPU)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' BltForCausalLM")
    p.add_argument("--device", default=None, help="default: cuda if available")
    return p.parse_args(argv)


def fixed_patch_lengths(T: int, seed: int = 0) -> torch.Tensor:
    """[1, P]: 1, then lengths uniform in 1..8 (mean 4.5), the last cut so they sum to T."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [1], 1
    while total < T:
        n = min(int(torch.randint(1, 9, (1,), generator=gen)), T - total)
        lengths.append(n)
        total += n
    return torch.tensor([lengths])


def pick_hash_vocab(cfg, requested: str, device: torch.device) -> tuple[int, str]:
    if requested != "auto":
        return int(requested), "as requested"
    if device.type != "cuda":
        return cfg.hash_vocab, "preset (CPU)"
    counts = count_params(cfg)
    other = counts.total - counts.hash_embeddings + (counts.entropy_model if cfg.entropy_model else 0)
    budget = 0.6 * torch.cuda.get_device_properties(device).total_memory / 16  # params that fit: 16 B each
    if counts.total <= budget:
        return cfg.hash_vocab, "full: fits"
    rows = int((budget - other) / (cfg.n_hash_tables * cfg.encoder.dim)) // 1024 * 1024
    if rows < 1024:
        raise SystemExit("the model does not fit this GPU even without hash tables")
    return rows, f"reduced from {cfg.hash_vocab} to fit 60% of {torch.cuda.get_device_name(device)}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(name: str, step_fn, steps: int, warmup: int, device: torch.device, bytes_per_step: int,
              flops_per_byte: float) -> dict:
    """Warm up, then time `steps` calls of step_fn between device syncs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step_fn() for _ in range(warmup)]
    sync(device)
    t0 = time.perf_counter()
    losses += [step_fn() for _ in range(steps)]
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    bps = bytes_per_step / seconds
    out = {"name": name, "step_ms": 1000 * seconds, "bytes_per_s": bps,
           "mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "mfu": flops_per_byte * bps / peak if peak else None,
           "first_loss": float(losses[0]), "loss": float(losses[-1])}
    print(f"{name:<14} {out['step_ms']:9.1f} ms/step  {bps:12,.0f} bytes/s  "
          f"mem {_fmt(out['mem_gb'], '{:.1f} GB')}  mfu {_fmt(out['mfu'], '{:.1%}')}  "
          f"loss {out['first_loss']:.4f} -> {out['loss']:.4f}", flush=True)
    return out


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def clip_then_step(opt, params, max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def make_step(forward, params, device: torch.device, x, y, clip_step=clip_then_step):
    """One AdamW step (fused on CUDA) with the global grad norm clipped to 1. `clip_step`: how
    the library's trainer clips and steps (bltkit: `clip_and_step`, the clip inside the fused
    kernel; transformers' Trainer: clip_grad_norm_, then step)."""
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=0)
        loss.backward()
        clip_step(opt, params, 1.0)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _hf_dir(args) -> tempfile.TemporaryDirectory | None:
    """A temp dir for the transformers export, or None when skipped or not installed."""
    if args.no_hf:
        return None
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping BltForCausalLM")
        return None
    print(f"transformers {transformers.__version__} (parity is pinned to 5.23.0; other versions may differ)")
    return tempfile.TemporaryDirectory(prefix="blt_hf_")


def bench_bltkit(cfg, args, device, attn, lengths, x, y, warmup, fpb, hf_dir) -> dict:
    model = init_model(cfg, seed=0, device=device).train().set_attn_impl(attn)
    if hf_dir is not None:  # export the initial weights first, so both runs start from the same point
        from bltkit.convert.hf import export_hf

        export_hf(model, hf_dir.name)
    if args.compile:
        compile_blocks(model)  # as train.compile=true
    params = [p for p in model.parameters() if p.requires_grad]
    # as the trainer steps: lengths on the host in the T+1 convention (the patcher's), no checks
    lengths = normalize_lengths(lengths.cpu(), x.shape[1])
    step = make_step(lambda x_: model(x_, patch_lengths=lengths, validate=False), params, device, x, y,
                     clip_step=clip_and_step)
    return run_steps("bltkit", step, args.steps, warmup, device, x.numel(), fpb)


def bench_transformers(hf_dir, args, device, lengths, x, y, warmup, fpb) -> dict:
    from transformers import BltForCausalLM

    hf = BltForCausalLM.from_pretrained(hf_dir.name, use_cache=False).to(device).train()
    params = [p for p in hf.parameters() if p.requires_grad]
    step = make_step(lambda x_: hf(input_ids=x_, patch_lengths=lengths, use_cache=False).logits, params, device, x, y)
    return run_steps("transformers", step, args.steps, warmup, device, x.numel(), fpb)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    base = get_preset(args.preset)
    # patches are given, so no entropy model is built or run
    cfg = dataclasses.replace(base, patcher=dataclasses.replace(base.patcher, mode="static", patch_size=4),
                              entropy_model=None)
    hash_vocab, why = pick_hash_vocab(cfg, args.hash_vocab, device)
    B, T = args.batch, args.seq_len or (8192 if device.type == "cuda" else 512)
    cfg = dataclasses.replace(cfg, hash_vocab=hash_vocab, max_bytes=max(cfg.max_bytes, T))
    lengths = fixed_patch_lengths(T).expand(B, -1).to(device)
    mean_patch = T / lengths.shape[1]
    fpb = train_flops_per_byte(cfg, mean_patch, T, patch_on_the_fly=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 260, (B, T + 1), generator=gen)
    tokens[:, 0] = 1
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    attn = args.attn if args.attn != "auto" else ("flex" if device.type == "cuda" else "sdpa")
    counts = count_params(cfg)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | torch {torch.__version__}"
          f" | preset {args.preset} | batch {B} x {T} bytes | {lengths.shape[1]} patches (mean {mean_patch:.2f})")
    print(f"hash tables: {hash_vocab} rows each ({why}); params {counts.total / 1e9:.2f}B "
          f"({counts.hash_embeddings / 1e9:.2f}B hash) | train FLOPs/byte {fpb / 1e9:.2f} G | "
          f"bltkit attention {attn}{', compiled blocks' if args.compile else ''}", flush=True)

    hf_dir = _hf_dir(args)
    results = [bench_bltkit(cfg, args, device, attn, lengths, x, y, warmup, fpb, hf_dir)]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if hf_dir is not None:
        results.append(bench_transformers(hf_dir, args, device, lengths, x, y, warmup, fpb))
        hf_dir.cleanup()

    print("\nsummary (bf16 autocast, fp32 AdamW states; MFU from bltkit's FLOP count)" if device.type == "cuda"
          else "\nsummary (CPU, fp32)")
    print(f"{'model':<14}{'ms/step':>10}{'bytes/s':>14}{'peak mem':>11}{'MFU':>8}{'loss@1':>9}")
    for r in results:
        print(f"{r['name']:<14}{r['step_ms']:>10.1f}{r['bytes_per_s']:>14,.0f}{_fmt(r['mem_gb'], '{:.1f} GB'):>11}"
              f"{_fmt(r['mfu'], '{:.1%}'):>8}{r['first_loss']:>9.4f}")
    if len(results) == 2:  # same weights and batch: the first losses agree up to bf16 rounding
        print(f"bltkit / transformers throughput: {results[0]['bytes_per_s'] / results[1]['bytes_per_s']:.2f}x; "
              f"first-step loss difference {abs(results[0]['first_loss'] - results[1]['first_loss']):.2e}")
    if any(not math.isfinite(r["loss"]) for r in results):
        sys.exit("non-finite loss")


if __name__ == "__main__":
    main()
