"""The `blt` command: argparse subcommands that call library functions.

torch and the model code are imported inside the handlers so that `blt --help` is instant.
Each subcommand has an `add_<cmd>_args(p)` and a `cmd_<cmd>(args)`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .bytes import utf8_text
from .dtypes import DTYPES
from .dtypes import torch_dtype as _dtype


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_text_arg(text: str) -> str:
    """A text argument, '-' for standard input, checked to be UTF-8 (an argument of other bytes
    reaches Python with surrogate escapes, which no model can read)."""
    if text == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        return utf8_text(stdin.read(), "standard input") if stdin is not None else sys.stdin.read()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return utf8_text(text.encode("utf-8", "surrogateescape"), "the text argument")
    return text


# -- init -----------------------------------------------------------------------------------------


def add_init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset name: tiny, small, blt-1b, blt-7b, entropy-tiny, entropy-small, entropy-100m")
    p.add_argument("out", help="model directory to write")
    p.add_argument("--seed", type=int, default=42, help="initialisation seed (default 42)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="store weights in this dtype")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. patcher.mode=space")


def cmd_init(args) -> None:
    from .checkpoint import init_model, save_model
    from .config import apply_overrides
    from .presets import get_preset

    cfg = get_preset(args.preset)
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    model = init_model(cfg, seed=args.seed)
    save_model(model, args.out, dtype=_dtype(args.dtype))
    print(f"wrote a random-weight {args.preset} model to {args.out}")


# -- info -----------------------------------------------------------------------------------------


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (or a preset name)")
    p.add_argument("--mean-patch-len", type=float, default=4.5,
                   help="mean patch length in bytes (> 0) for FLOPs (default 4.5)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="bytes per row (>= 1) for attention FLOPs (default max_bytes, or an entropy "
                        "model's max_seqlen)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_info(args) -> None:
    from pathlib import Path

    from . import flops
    from .checkpoint import read_config
    from .config import BLTConfig
    from .presets import get_preset

    if Path(args.model).exists():
        cfg = read_config(args.model)
    else:
        try:
            cfg = get_preset(args.model)  # which also takes blt_1b for blt-1b, as `blt init` does
        except ValueError as e:
            raise ValueError(f"{args.model} is neither a model directory nor a preset: {e}") from None
    if not isinstance(cfg, BLTConfig):
        n = flops.entropy_params(cfg)
        f = flops.entropy_flops_per_byte(cfg, cfg.max_seqlen if args.seq_len is None else args.seq_len)
        info = {"kind": "entropy_model", "params": n, "flops_per_byte_inference": f, "flops_per_byte_train": 3 * f,
                "config": cfg.__dict__}
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print(f"entropy model: {cfg.dim}d x {cfg.n_layers} layers, {cfg.n_heads} heads, window {cfg.window}")
            print(f"parameters: {_fmt_count(n)}; FLOPs/byte: inference {_fmt_count(f)}, training {_fmt_count(3 * f)}")
        return
    pc = flops.count_params(cfg)
    seq_len = cfg.max_bytes if args.seq_len is None else args.seq_len
    fw = flops.flops_per_byte(cfg, args.mean_patch_len, seq_len)
    train = flops.train_flops_per_byte(cfg, args.mean_patch_len, seq_len)
    infer = flops.inference_flops_per_byte(cfg, args.mean_patch_len, seq_len)
    info = {"params": pc.__dict__ | {"total": pc.total, "non_embedding": pc.non_embedding},
            "flops_per_byte": fw, "flops_per_byte_train": train, "flops_per_byte_inference": infer,
            "mean_patch_len": args.mean_patch_len, "seq_len": seq_len}
    if args.json:
        print(json.dumps(info | {"config": cfg.to_dict()}, indent=2))
        return
    e, g, d = cfg.encoder, cfg.global_transformer, cfg.decoder
    pa = cfg.patcher
    print(f"encoder  {e.dim}d x {e.n_layers} layers, {e.n_heads} heads, window {e.window}")
    print(f"global   {g.dim}d x {g.n_layers} layers, {g.n_heads} heads"
          + (f", input projection {cfg.cross_attn_k * e.dim}->{g.dim}" if cfg.has_global_projection else ""))
    print(f"decoder  {d.dim}d x {d.n_layers} layers, {d.n_heads} heads, window {d.window}")
    print(f"hash     sizes {cfg.hash_sizes} x {cfg.hash_functions} function(s), {cfg.hash_vocab} rows each")
    print(f"patcher  {pa.mode}" + (f", threshold {pa.threshold}" if pa.mode == "entropy" else "")
          + (f", max patch {pa.max_patch_length}" if pa.max_patch_length else ""))
    if cfg.entropy_model:
        em = cfg.entropy_model
        print(f"entropy  {em.dim}d x {em.n_layers} layers, {em.n_heads} heads, window {em.window}")
    print("\nparameters")
    for name, n in (("encoder", pc.encoder), ("global", pc.global_transformer), ("decoder", pc.decoder),
                    ("byte embeddings", pc.byte_embeddings), ("hash tables", pc.hash_embeddings),
                    ("total (no entropy model)", pc.total), ("non-embedding", pc.non_embedding),
                    ("entropy model", pc.entropy_model)):
        print(f"  {name:<26}{_fmt_count(n):>10}")
    print(f"\nFLOPs per byte (mean patch {args.mean_patch_len}, rows of {info['seq_len']} bytes)")
    for name in ("encoder", "global", "decoder", "entropy_model"):
        print(f"  {name:<26}{_fmt_count(fw[name]):>10}")
    print(f"  {'inference (BLT + entropy)':<26}{_fmt_count(infer):>10}")
    print(f"  {'training (3x BLT + entropy)':<26}{_fmt_count(train):>10}")


# -- patch ----------------------------------------------------------------------------------------


def add_patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="text to patch ('-' reads stdin)")
    p.add_argument("--model", default=None, help="BLT or entropy-model directory (default: the bundled model)")
    p.add_argument("--mode", choices=["entropy", "space", "static", "byte"], default=None, help="patching mode")
    p.add_argument("--threshold", type=float, default=None, help="entropy threshold in nats")
    p.add_argument("--max-patch-length", type=int, default=None, help="close patches at this many bytes")
    p.add_argument("--patch-size", type=float, default=None, help="patch size for static mode")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write a page of the text cut into its patches, shaded by the entropy that "
                        "opened each (open it in a browser)")


def cmd_patch(args) -> None:
    from .inspect import patch_report, render_patch_html, render_patch_report

    if args.html:
        check_output_file("--html", args.html)  # (before the model loads)
    report = patch_report(_resolve_model(args.model), _read_text_arg(args.text), mode=args.mode,
                          threshold=args.threshold, max_patch_length=args.max_patch_length,
                          patch_size=args.patch_size)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_patch_html(report))
    print(json.dumps(report, ensure_ascii=False) if args.json else render_patch_report(report))


def _resolve_model(path: str | None) -> str:
    if path is not None:
        return path
    from .bundled import bundled_model_dir

    return str(bundled_model_dir())


# -- generate -------------------------------------------------------------------------------------


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="", help="prompt text ('-' reads stdin; empty starts from BOS)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--max-new-bytes", type=int, default=256, help="bytes to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely bytes (k >= 1; 0: no top-k filter)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1] (1: no filter)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable; not printed)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--show-patches", action="store_true", help="mark where patches start with '|'")
    p.add_argument("--prompts-file", default=None,
                   help="batch mode: one prompt per line (UTF-8; blank lines skipped); prints one JSON object per "
                        "prompt, in the file's order")
    p.add_argument("--batch-size", type=int, default=None,
                   help="with --prompts-file: rows generated at once (default 64); prompts of similar lengths go "
                        "together (a batch reads its longer prompts a byte a step past its shortest one); the "
                        "outputs are the same at any batch size")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: fp32 on the CPU, as stored on a GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step functions (a slow first call for each batch shape). On a GPU "
                        "it replaces the Triton kernels and speculation, which are faster; on a CPU it speeds up "
                        "small models at batch 1 (docs/generation.md)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="run the step functions in C (compiled on first use by the system's C compiler): the "
                        "default on a CPU in fp32 where a compiler is found; --no-native keeps PyTorch's steps")


def _marked(model, ids: list[int]) -> str:
    """Text with '|' before every byte that starts a patch (BOS excluded)."""
    import torch

    from .bytes import OFFSET

    starts = model.patch_starts(torch.tensor([ids], device=model.device))[0].tolist()
    out, buf = [], bytearray()
    for t, i in enumerate(ids):
        if i < OFFSET:
            continue
        if starts[t] and t > 1:
            out.append(buf.decode("utf-8", errors="replace") + "|")
            buf = bytearray()
        buf.append(i - OFFSET)
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def cmd_generate(args) -> None:
    from .bytes import encode
    from .checkpoint import load_model
    from .generate import Generator

    device = args.device or _default_device()
    dtype = _dtype(args.dtype)
    if dtype is None and device == "cpu":
        import torch

        dtype = torch.float32  # bf16 matrix products are slow on most CPUs
    model = load_model(_resolve_model(args.model), device=device, dtype=dtype)
    gen = Generator(model, compile=args.compile, native=args.native)
    kw = dict(max_new_bytes=args.max_new_bytes, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.prompts_file:
        if args.prompt or args.stream or args.show_patches:  # (--batch-size applies to it alone)
            raise ValueError("--prompts-file is the batch mode: give it without a PROMPT argument, --stream or "
                             "--show-patches (one prompt: PROMPT or '-' for standard input)")
        try:
            with open(args.prompts_file, "rb") as f:
                data = f.read()
        except OSError as e:  # (a folder, no permission: one line, not a traceback)
            raise ValueError(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from None
        text = utf8_text(data, args.prompts_file)
        prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file} holds no prompt (one per line)")
        batch = 64 if args.batch_size is None else args.batch_size
        for i, completion in gen.generate_in_batches(prompts, batch, **kw):  # (in the file's order)
            print(json.dumps({"prompt": prompts[i], "completion": completion.decode("utf-8", errors="replace")},
                             ensure_ascii=False), flush=True)
        return
    if args.batch_size is not None:
        raise ValueError("--batch-size applies to the batch mode (--prompts-file)")
    prompt = _read_text_arg(args.prompt)
    if args.stream:
        sys.stdout.write(prompt)
        for piece in gen.stream(prompt, patch_marker="|" if args.show_patches else None, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    out = gen.generate(prompt, **kw)[0]
    if args.show_patches:
        print(_marked(model, encode(prompt) + [b + 4 for b in out]))
    else:
        print(prompt + out.decode("utf-8", errors="replace"))


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="text to calibrate on (files, folders, .jsonl ...)")
    p.add_argument("--model", required=True, help="BLT or entropy-model directory")
    p.add_argument("--target", type=float, default=4.5,
                   help="wanted mean patch length in bytes, >= 1 (default 4.5)")
    p.add_argument("--max-bytes", type=int, default=2_000_000,
                   help="read at most this many bytes, >= 1 (default 2,000,000)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_calibrate(args) -> None:
    from .inspect import calibrate_threshold

    r = calibrate_threshold(args.model, args.files, args.target, args.max_bytes,
                            device=args.device or _default_device())
    if args.json:
        print(json.dumps(r))
    else:
        print(f"threshold {r['threshold']:.6f} nats gives a mean patch of {r['mean_patch']:.2f} bytes on "
              f"{r['bytes']:,} bytes (mean entropy {r['mean_entropy']:.3f}); set it with "
              f"model.patcher.threshold={r['threshold']:.6f}")


# -- convert --------------------------------------------------------------------------------------


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source directory (with --from hf|meta also a Hugging Face hub id, org/name or "
                               "org/name/folder, fetched into huggingface_hub's cache: docs/checkpoint_format.md)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--from", dest="src_format", choices=["native", "hf", "meta"], default="native",
                   help="layout of SRC: native (bltkit), hf (transformers BltForCausalLM), meta (Meta's blt)")
    p.add_argument("--to", dest="dst_format", choices=["native", "hf", "meta"], default="native",
                   help="layout to write")
    p.add_argument("--entropy-model", default=None,
                   help="with --from meta: the entropy model's folder (or hub id) where it is neither in SRC nor "
                        "beside it")
    p.add_argument("--allow-unknown", action="store_true",
                   help="with --from meta: skip args fields bltkit does not know (it cannot tell whether they "
                        "change the model; by default they are an error naming them)")
    p.add_argument("--meta-layout", choices=["consolidated", "hub"], default=None,
                   help="with --to meta: params.json + consolidated.pth, or config.json + model.safetensors "
                        "(default hub)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating weights")


def cmd_convert(args) -> None:
    from .checkpoint import check_output_dir, load_model, save_model

    check_output_dir(args.dst)  # before reading a large checkpoint, not after
    unused = [flag for flag, given, applies in (
        ("--entropy-model", args.entropy_model is not None, args.src_format == "meta"),
        ("--allow-unknown", args.allow_unknown, args.src_format == "meta"),
        ("--meta-layout", args.meta_layout is not None, args.dst_format == "meta")) if given and not applies]
    if unused:  # (they were silently ignored)
        raise ValueError(f"{', '.join(unused)} applies only with --from meta (--meta-layout: --to meta); "
                         f"this is --from {args.src_format} --to {args.dst_format}")
    if args.src_format == "hf":
        from .convert.hf import import_hf

        model = import_hf(args.src)
    elif args.src_format == "meta":
        from .convert.meta import import_meta

        model = import_meta(args.src, entropy_dir=args.entropy_model, allow_unknown=args.allow_unknown)
    else:
        model = load_model(args.src)
    dtype = _dtype(args.dtype)
    if args.dst_format == "hf":
        from .convert.hf import export_hf

        export_hf(model, args.dst, dtype=dtype)
    elif args.dst_format == "meta":
        from .convert.meta import export_meta

        if dtype is not None:
            model = model.to(dtype)
        export_meta(model, args.dst, layout=args.meta_layout or "hub")
    else:
        save_model(model, args.dst, dtype=dtype)
    print(f"converted {args.src} ({args.src_format}) -> {args.dst} ({args.dst_format})")


# -- main -----------------------------------------------------------------------------------------

def _lazy(module: str, name: str):
    """A handler imported only when its command runs (keeps `blt --help` instant)."""

    def run(args):
        import importlib

        return getattr(importlib.import_module(module, __package__), name)(args)

    return run


from .cli_data import add_data_args, add_eval_args, check_output_file  # noqa: E402  (torch-free)
from .cli_train import add_train_args  # noqa: E402

COMMANDS = {
    "init": (add_init_args, cmd_init, "create a random-weight model directory from a preset"),
    "train": (add_train_args, _lazy(".cli_train", "cmd_train"), "train a BLT or an entropy model from raw bytes"),
    "eval": (add_eval_args, _lazy(".cli_data", "cmd_eval"), "evaluate a model (bits per byte)"),
    "data": (add_data_args, _lazy(".cli_data", "cmd_data"), "prepare training data (precomputed patches)"),
    "generate": (add_generate_args, cmd_generate, "generate text (cached, batched, streaming)"),
    "info": (add_info_args, cmd_info, "config, parameter counts and FLOPs per byte of a model"),
    "patch": (add_patch_args, cmd_patch, "show each byte's entropy and where patches start"),
    "calibrate": (add_calibrate_args, cmd_calibrate, "the entropy threshold giving a wanted mean patch length"),
    "convert": (add_convert_args, cmd_convert, "import/export Meta and transformers checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blt", description="bltkit: the Byte Latent Transformer toolkit")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def _version() -> str:
    from . import __version__

    return f"bltkit {__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: a clear line, not a traceback
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `blt patch ... | head`
        sys.stderr.close()
