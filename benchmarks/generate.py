"""Generation speed: bltkit's cached Generator vs transformers' BltForCausalLM.generate(use_cache=False).

Same random weights (exported to the transformers layout), entropy threshold calibrated so the mean
patch is about 4.5 bytes, greedy decoding. Prints bytes/s for both and the ratio, then bltkit alone
over a grid of batch sizes and prompt lengths. Examples:

    python benchmarks/generate.py --preset blt-1b --device cuda --dtype bf16
    python benchmarks/generate.py --preset tiny --device cpu --dtype fp32 --hf-bytes 64 --new-bytes 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import SAMPLE_TEXT, calibrate_threshold, random_model, sync, with_threshold

from bltkit import generate
from bltkit.bytes import encode
from bltkit.generate import Generator

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

KERNELS = {"auto": None, "on": True, "off": False}  # --kernels / --speculate -> Generator(...)


def prompts_of(length: int, batch: int) -> list[bytes]:
    text = (SAMPLE_TEXT * (length // len(SAMPLE_TEXT) + 2)).encode()
    return [text[i * 7: i * 7 + length - 1] for i in range(batch)]  # BOS makes it `length` ids


def hf_generate(model, prompt: bytes, n: int, dtype, device):
    """transformers' uncached greedy generation (its cached path is wrong, spec §14)."""
    from transformers import BltForCausalLM

    from bltkit.convert.hf import export_hf

    with tempfile.TemporaryDirectory() as d:
        export_hf(model, d)
        hf = BltForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    ids = torch.tensor([encode(prompt)], device=device)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False, pad_token_id=0)  # warm-up
        sync(device)
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, use_cache=False, pad_token_id=0)
        sync(device)
        dt = time.perf_counter() - t
    del hf
    new = out[0, ids.shape[1]:].tolist()
    return new, n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="blt-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--mean-patch", type=float, default=4.5)
    ap.add_argument("--hf-bytes", type=int, default=16, help="bytes transformers generates (it is slow)")
    ap.add_argument("--hf-prompt-lens", type=int, nargs="*", default=[64],
                    help="prompt lengths of the transformers comparison (its cost per byte grows with length)")
    ap.add_argument("--new-bytes", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--prompt-lens", type=int, nargs="*", default=[64, 2048])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="Generator(model, compile=True)")
    ap.add_argument("--speculate", choices=["auto", "on", "off"], default="auto",
                    help="Generator(model, speculate=...): decode beside the entropy model; auto (the "
                         "default) is the Generator's default (on for CUDA models that patch by entropy)")
    ap.add_argument("--kernels", choices=["auto", "on", "off"], default="auto",
                    help="Generator(model, kernels=...): bltkit.kernels' Triton steps; auto (the default) "
                         "runs them on CUDA when Triton is installed")
    switches = {"attend": "bltkit.kernels.attend for the steps' attention",
                "linear": "kernels.linear_add in the block steps of a few rows"}
    for name, what in switches.items():
        ap.add_argument(f"--{name}-kernel", choices=["auto", "on", "off"], default="auto",
                        help=f"with the kernels, {what} (generate.{name.upper()}_KERNEL); auto (the default) "
                             "keeps the constant's value")
    ap.add_argument("--kernel-max-rows", type=int, default=None, metavar="N",
                    help="with the kernels, the most rows the Triton block steps take (generate.KERNEL_MAX_ROWS; "
                         "default: the constant's value), larger batches run cuBLAS's products")
    ap.add_argument("--check-fp32", type=int, default=0, metavar="N",
                    help="first compare N greedy bytes with transformers in fp32 (exactness, not speed)")
    ap.add_argument("--json", default=None, help="also write results to this file")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. hash_vocab=50002")
    args = ap.parse_args()
    for name in switches:
        if (value := getattr(args, f"{name}_kernel")) != "auto":
            setattr(generate, f"{name.upper()}_KERNEL", value == "on")
    if args.kernel_max_rows is not None:
        generate.KERNEL_MAX_ROWS = args.kernel_max_rows
    dtype, dev = DTYPES[args.dtype], args.device
    torch.manual_seed(0)
    t = time.perf_counter()
    model = random_model(args.preset, args.overrides, dev, dtype)
    calib = torch.tensor([encode(SAMPLE_TEXT * 4)], device=dev)
    theta = calibrate_threshold(model, calib, args.mean_patch)
    with_threshold(model, theta)
    lengths = model.patch(calib)
    mean_len = (calib.shape[1]) / (int((lengths > 0).sum()) - 1)
    print(f"{args.preset} on {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}), "
          f"{args.dtype}; built in {time.perf_counter() - t:.1f}s; threshold {theta:.4f} nats gives mean patch "
          f"{mean_len:.2f} bytes on the calibration text", flush=True)
    results: dict = {"preset": args.preset, "device": dev, "dtype": args.dtype, "threshold": theta,
                     "mean_patch_calibration": mean_len, "grid": []}
    if args.check_fp32 and not args.no_hf:
        try:
            prompt = prompts_of(64, 1)[0]
            model.float()
            hf_new, _ = hf_generate(model, prompt, args.check_fp32, torch.float32, dev)
            check = Generator(model, kernels=KERNELS[args.kernels], speculate=KERNELS[args.speculate])
            ours = check.generate_ids([prompt], args.check_fp32, stop_at_eos=False)[0]
            same = next((i for i, (a, b) in enumerate(zip(hf_new, ours, strict=False)) if a != b), len(ours))
            results["fp32_check"] = {"identical_prefix": same, "n": args.check_fp32}
            print(f"fp32 check: greedy bytes identical to transformers for {same}/{args.check_fp32}", flush=True)
        finally:
            model.to(dtype)
    gen = Generator(model, compile=args.compile, kernels=KERNELS[args.kernels], speculate=KERNELS[args.speculate])
    results["hf"] = []
    for hf_len in [] if args.no_hf else args.hf_prompt_lens:
        prompt = prompts_of(hf_len, 1)[0]
        try:
            hf_new, hf_bps = hf_generate(model, prompt, args.hf_bytes, dtype, dev)
            gen.generate_ids([prompt], args.hf_bytes, stop_at_eos=False)  # warm-up (graph capture)
            ours = gen.generate_ids([prompt], args.hf_bytes, stop_at_eos=False)[0]
            ours_bps = args.hf_bytes / (gen.stats["prefill_s"] + gen.stats["decode_s"])
            same = next((i for i, (a, b) in enumerate(zip(hf_new, ours, strict=False)) if a != b), len(ours))
            results["hf"].append({"prompt": hf_len, "hf_bytes_per_s": hf_bps, "bltkit_bytes_per_s": ours_bps,
                                  "ratio": ours_bps / hf_bps, "identical_prefix": same, "n": args.hf_bytes})
            print(f"prompt {hf_len}: transformers generate(use_cache=False) {hf_bps:.2f} bytes/s | bltkit "
                  f"(prefill included) {ours_bps:.1f} bytes/s | ratio {ours_bps / hf_bps:.1f}x | greedy outputs "
                  f"agree on the first {same}/{args.hf_bytes} bytes", flush=True)
        except Exception as e:  # report, keep benchmarking bltkit
            print(f"transformers comparison failed: {type(e).__name__}: {e}", flush=True)
    for plen in args.prompt_lens:
        for b in args.batches:
            prompts = prompts_of(plen, b)
            try:
                gen.generate_ids([p[:16] for p in prompts], 8, stop_at_eos=False)  # warm-up
                gen.generate_ids(prompts, args.new_bytes, stop_at_eos=False)
            except torch.OutOfMemoryError:
                print(f"batch {b:3d} prompt {plen:5d}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            s = gen.stats
            row = {"batch": b, "prompt": plen, "new_bytes": s["new_bytes"], "prefill_s": s["prefill_s"],
                   "decode_s": s["decode_s"], "decode_bytes_per_s": s["new_bytes"] / s["decode_s"],
                   "prefill_bytes_per_s": b * (plen - 1) / max(s["prefill_s"], 1e-9),
                   "mean_patch_len": s["bytes_read"] / max(1, s["patches"]),
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None}
            results["grid"].append(row)
            print(f"batch {b:3d} prompt {plen:5d}: decode {row['decode_bytes_per_s']:10.1f} bytes/s total "
                  f"({row['decode_bytes_per_s'] / b:8.1f} per row), prefill {row['prefill_bytes_per_s']:9.1f} "
                  f"bytes/s ({s['prefill_s']:.2f}s), mean patch {row['mean_patch_len']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
