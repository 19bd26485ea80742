"""Compile bltkit's Triton kernels for Hopper (sm_90) on any machine with Triton, GPU or not, and
print each launch configuration's registers a thread and stack bytes (spills), as ptxas reports
them: a CPU-only session's check that a kernel written under Triton's interpreter compiles, and
what its candidates cost in registers, which bounds how many programs an SM holds at once.

Covers `kernels._attend_kernel` in each way the generator calls it (the global step's RoPE with
first/last bounds, the rings', a mask, the encoder's open patch, plain) with every configuration
its autotuner may pick, with the first block loaded early (kernels.ATTEND_FIRST_BLOCK) and not, the
loop's blocks a block ahead (kernels.ATTEND_AHEAD) and not,
`kernels._cross_attend_kernel` with its candidates (its first units early and late,
kernels.CROSS_UNITS_EARLY; its input normed on the way in or not), `kernels._product_kernel`
with each candidate as the decoder's and the global stack's products call it
(generate.DECODER_PRODUCTS, GLOBAL_PRODUCTS, FRONT_PRODUCTS), and every other kernel as blt-1b's generator
launches it (each autotuner's candidates). Exits 1 if any fails to compile.

    python benchmarks/hopper_compile.py [--head-dims 64 128]

It needs Triton with its bundled ptxas and no TRITON_INTERPRET (it compiles, nothing runs).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("hopper_compile.py compiles for a GPU: unset TRITON_INTERPRET")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bltkit import kernels

TARGET = GPUTarget("cuda", 90, 32)  # an H100 / H200
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")



def arg_types(jit_fn, pointers: dict, floats: set) -> dict:
    """Each argument's Triton type: `*_ptr` a pointer to bf16 unless `pointers` names another,
    `floats` fp32, the rest int32 (constexprs are taken out by compile_for_hopper)."""
    return {n: ("*" + pointers.get(n, "bf16")) if n.endswith("_ptr") else "fp32" if n in floats else "i32"
            for n in inspect.signature(jit_fn.fn).parameters}


ATTEND_TYPES = arg_types(kernels._attend_kernel.fn, dict(part_ptr="fp32", last_ptr="i64", first_ptr="i64",
                                                          cos_ptr="fp32", sin_ptr="fp32", slot_ptr="i64"), {"scale"})
# (what, HAS_LAST, HAS_FIRST, HAS_MASK, ROPE, RING): the generator's calls of the attention kernel
ATTEND_CALLS = [
    ("global step (RoPE, bounds)", True, True, False, True, False),
    ("ring (RoPE, bounds)", True, True, False, True, True),
    ("mask", True, False, True, False, False),
    ("open patch (bounds)", True, True, False, False, False),
    ("plain", False, False, False, False, False),
]


def attend_values(what: str, H: int) -> dict:
    """The attention kernel's integer arguments as blt-1b's batch-64 step passes them (64 rows, 16
    heads, caches of 256 slots): Triton specialises on them (below)."""
    S, N, NK = (2, 16, 16) if what == "plain" else (256, 16, 16)
    v = dict(S=S, N=N, NK=NK, QN=N, sk_b=NK * S * H, sk_n=S * H, sk_s=H, sv_b=NK * S * H, sv_n=S * H, sv_s=H,
             sm_b=0, sm_s=1, s_last=1, SPLITS=1, s_rope=0, s_slot=0, window=0, sq_b=N * H, sq_n=H)
    if what.startswith("global"):  # q|k|v rows; each row its own slot, RoPE row and bounds
        v.update(sq_b=(N + 2 * NK) * H, sq_n=0, s_rope=H, s_slot=1)  # (rows of [B, 2, H/2] halves)
    elif what.startswith("ring"):  # one position for all rows, the window
        v.update(sq_b=(N + 2 * NK) * H, sq_n=0, s_last=0, window=512)
    elif what == "mask":
        v.update(sm_b=S)
    elif what.startswith("open"):  # the patch's 2 units' queries, `period` N over the encoder's cache
        v.update(N=2 * N, sq_b=2 * N * H, s_last=0)
    return v


# the other kernels, as blt-1b's generator launches them: (kernel, pointer types other than bf16,
# float arguments, integer arguments' values (Triton specialises on them), constexpr sets, warps
# where no autotuner chooses)
I64 = "i64"
OTHERS = [
    ("_norm_qkv_rope_kernel", dict(cos_ptr="fp32", sin_ptr="fp32", slot_ptr=I64), {"eps"},
     dict(D=2048, N=16, NK=16, skc_b=16 * 256 * 128, skc_n=256 * 128, skc_r=128, svc_b=16 * 256 * 128,
          svc_n=256 * 128, svc_r=128, s_slot=0, s_rope=0), [dict(H=128), dict(H=64)], 4),
    ("_rope_write_kernel", dict(cos_ptr="fp32", sin_ptr="fp32", slot_ptr=I64), set(),
     dict(N=16, NK=16, sy_b=6144, skc_b=16 * 256 * 128, skc_n=256 * 128, skc_r=128, svc_b=16 * 256 * 128,
          svc_n=256 * 128, svc_r=128, s_slot=1, s_rope=64), [dict(H=128), dict(H=64)], 4),
    ("_norm_swiglu_kernel", {}, {"eps"}, dict(D=2048, F=5632), [{}], 4),
    ("_swiglu_kernel", {}, set(), dict(F=5632, sy_b=11264), [dict(BLOCK=1024)], 4),
    ("_norm_cross_attend_kernel", {}, {"eps", "scale"},
     dict(D=1024, N=16, NK=16, K=2, sk_b=2048, sk_n=128, sk_s=64, sv_b=2048, sv_n=128, sv_s=64),
     [dict(H=64, BLOCK_K=2)], 4),
    ("_attend_combine_kernel", dict(part_ptr="fp32"), set(), dict(N=16, SPLITS=2), [dict(H=128, BLOCK_J=2)], 4),
    ("_add_norm_kernel", dict(acc_ptr="fp32"), {"eps", "beta"}, dict(B=64, D=2048, S=2),
     [dict(BLOCK_D=2048), dict(BLOCK_D=1024)], 4),
    ("_norms_kernel", {}, {"eps"}, dict(R=64, D=1024, L=9), [dict(BLOCK_D=1024)], 4),
    ("_hash_embed_kernel", dict(x_ptr=I64, hist_ptr=I64, coef_ptr=I64), set(),
     dict(D=1024, W=7, n_tables=6, vocab=500002, s_hist=7, s_out=1024), [dict(WIDTH=8, BLOCK_W=8, BLOCK_D=1024)], 4),
    ("_commit_rows_kernel", dict(close_ptr="i1"), set(),
     dict(n1=9, s0=9 * 64 * 2048, s1=64 * 2048, s2=2048, s3=128, s4=64, s5=1, d0=9 * 64 * 2048, d1=64 * 2048,
          d2=2048, d3=128, d4=64, d5=1, N3=16, N4=2, N5=64), [dict(B3=16, B4=2, B5=64)], 4),
    ("_greedy_kernel", dict(logits_ptr="fp32", next_ptr=I64), set(), dict(V=260, sx_b=260, sl_b=260),
     [dict(BLOCK_V=512)], 4),
    ("_advance_kernel", dict(x_ptr=I64, doc_ptr=I64, n_ptr=I64, start_ptr=I64), set(), dict(B=64, EOS=2),
     [dict(HAS_START=True, BLOCK=64), dict(HAS_START=False, BLOCK=64)], 4),
    ("_feed_kernel", dict(n_ptr=I64, lens_ptr=I64, buf_ptr=I64, next_ptr=I64, x_ptr=I64), set(),
     dict(B=64, s_buf=321), [dict(BLOCK=64)], 4),
    ("_linear_add_kernel", {}, {"beta"}, dict(D=1024, K=1024, sa_b=1024), [{}], 4),
]
CROSS_TYPES = arg_types(kernels._cross_attend_kernel.fn, dict(ss_ptr="fp32"), {"scale", "eps"})
CROSS_VALUES = dict(B=64, D=1024, N=16, NK=16, K=2, sx_b=1024, sk_b=2048, sk_n=128, sk_s=64, sv_b=2048, sv_n=128,
                    sv_s=64, T=64)
PRODUCT_TYPES = arg_types(kernels._product_kernel.fn, dict(ss_ptr="fp32", sso_ptr="fp32", cos_ptr="fp32",
                                                           sin_ptr="fp32", slot_ptr=I64), {"eps", "beta"})
# (what, EPI, NORM, K, N, global): the decoder's products at blt-1b's batch 64
# (generate.DECODER_PRODUCTS), the global stack's (GLOBAL_PRODUCTS), and those of the entropy
# model's shapes that the decoder's do not cover (FRONT_PRODUCTS; the encoder's are the decoder's)
PRODUCT_CALLS = [
    ("decoder wo (cross, self) + residual", kernels.EPI_RESIDUAL, False, 1024, 1024, False),
    ("decoder w2 + residual", kernels.EPI_RESIDUAL, False, 2816, 1024, False),
    ("decoder norm + q|k|v + RoPE", kernels.EPI_ROPE, True, 1024, 3072, False),
    ("decoder norm + w1|w3 + SwiGLU", kernels.EPI_SWIGLU, True, 1024, 5632, False),
    ("decoder norm + output head", kernels.EPI_PLAIN, True, 1024, 260, False),
    ("global wo + residual", kernels.EPI_RESIDUAL, False, 2048, 2048, True),
    ("global w2 + residual", kernels.EPI_RESIDUAL, False, 5632, 2048, True),
    ("global norm + q|k|v + RoPE", kernels.EPI_ROPE, True, 2048, 6144, True),
    ("global norm + w1|w3 + SwiGLU", kernels.EPI_SWIGLU, True, 2048, 11264, True),
    ("entropy norm + q|k|v + RoPE", kernels.EPI_ROPE, True, 768, 2304, False),
    ("entropy w2 + residual", kernels.EPI_RESIDUAL, False, 2048, 768, False),
    ("entropy norm + output head", kernels.EPI_PLAIN, True, 768, 260, False),
]


def product_values(K: int, N: int, glob: bool) -> dict:
    """The product kernel's integer arguments as the batch-64 step passes them: the decoder's (a
    ring of 512 slots, 16 heads of 64, one slot and RoPE row for every row) or the global stack's
    (a cache of 512 patches, 16 heads of 128, each row its own slot and RoPE row, the halves'
    rows H apart); T: the norm's
    SS_COLS chunks."""
    S, NK, H = 512, 16, 128 if glob else 64
    NK = 12 if K == 768 else NK  # the entropy model's 12 heads
    return dict(M=64, N=N, K=K, T=K // kernels.SS_COLS, sx=K, NQ=NK, NK=NK, s_rope=H if glob else 0,
                s_slot=1 if glob else 0, skc_b=NK * S * H, skc_n=S * H, skc_r=H, svc_b=NK * S * H, svc_n=S * H,
                svc_r=H)


def compile_for_hopper(jit_fn, types: dict, consts: dict, num_warps: int, values: dict | None = None,
                       num_stages: int | None = None):
    """The kernel compiled for TARGET, `consts` its constexprs. `values`: integer arguments' values,
    specialised as Triton's launcher does: an integer of 1 becomes a constant, one divisible by 16
    carries that divisibility (as does every pointer: PyTorch's allocations are aligned), which is
    what lets the compiler vectorise loads (without it every bf16 is a 2-byte load)."""
    names = list(inspect.signature(jit_fn.fn).parameters)
    consts = dict(consts)
    attrs = {}
    for n, v in (values or {}).items():
        if n not in consts and v == 1:
            consts[n] = 1
        elif n not in consts and v % 16 == 0:
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    for n in names:
        if n not in consts and types.get(n, "").startswith("*"):
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    signature = {n: "constexpr" if n in consts else types[n] for n in names}
    src = ASTSource(fn=jit_fn, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    return triton.compile(src, target=TARGET, options=options)


def usage(compiled) -> tuple[int, int]:
    """(registers a thread, stack bytes a thread) of a compiled kernel, read off its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    if regs is None or stack is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return int(regs.group(1)), int(stack.group(1))


def candidates(tuner) -> list[tuple[dict, int]]:
    """An autotuner's configurations as (constexprs, warps), repeats dropped."""
    out = []
    for c in tuner.configs:
        item = (dict(c.kwargs), c.num_warps)
        if item not in out:
            out.append(item)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128],
                    help="head dims to compile the attention kernel for (blt-1b: 128 global, 64 byte-level)")
    ap.add_argument("--quick", action="store_true",
                    help="only the global step's attention (the widest heads) and the rings' (the narrowest), "
                         "with the first block early, cross_attend's first two candidates and the other "
                         "autotuners' first (a test's check, ~40 s where all take ~4 minutes)")
    args = ap.parse_args()
    failed = 0

    def report(what: str, fn, types: dict, consts: dict, warps: int, values: dict, stages: int | None = None) -> None:
        nonlocal failed
        try:
            regs, stack = usage(compile_for_hopper(fn, types, consts, warps, values, stages))
            print(f"{what}: {regs} registers, {stack} stack bytes{'  (spills)' if stack else ''}", flush=True)
        except Exception as e:  # report every failure, not only the first
            failed += 1
            print(f"{what}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)

    configs = candidates(kernels._attend_kernel)
    calls, early = (ATTEND_CALLS[:2], (True,)) if args.quick else (ATTEND_CALLS, (True, False))
    for H, (what, last, first, mask, rope, ring) in itertools.product(args.head_dims, calls):
        if rope and not ring and H != max(args.head_dims):
            continue  # the global step: the widest heads
        if args.quick and ring and H != min(args.head_dims):
            continue  # the rings: the narrowest
        for (meta, warps), pre, ahead in itertools.product(configs, early, early):
            consts = dict(H=H, HAS_LAST=last, HAS_FIRST=first, HAS_MASK=mask, ROPE=rope, RING=ring, PRE=pre,
                          AHEAD=ahead, **meta)
            report(f"attend {what}, H {H}, BLOCK_S {meta['BLOCK_S']} x {warps} warps, first block "
                   f"{'early' if pre else 'late'}, {'a block ahead' if ahead else 'one block at a time'}",
                   kernels._attend_kernel.fn, ATTEND_TYPES, consts, warps, attend_values(what, H))
    # a one-slot cache: Triton specialises an integer argument of 1 as a constant
    report("attend plain, S = 1", kernels._attend_kernel.fn, ATTEND_TYPES,
           dict(H=64, BLOCK_S=16, HAS_LAST=False, HAS_FIRST=False, HAS_MASK=False, ROPE=False, RING=False,
                PRE=True, AHEAD=True), 1, attend_values("plain", 64) | {"S": 1})
    cross = candidates(kernels._cross_attend_kernel)
    for (meta, warps), K, units_early in itertools.product(cross[:2] if args.quick else cross, (None, 1), early):
        for norm in (False, True) if K is None else (False,):  # its input normed already, or normed on the way in
            consts = dict(H=64, HP=64, IEEE=False, EARLY=units_early, NORM=norm, TP=64, **meta) | \
                ({} if K is None else {"K": K})
            report(f"cross_attend H 64, BLOCK_B {meta['BLOCK_B']}, BLOCK_D {meta['BLOCK_D']} x {warps} warps, "
                   f"K {'a number' if K is None else K}, units {'early' if units_early else 'late'}"
                   f"{', normed on the way in' if norm else ''}",
                   kernels._cross_attend_kernel.fn, CROSS_TYPES, consts, warps,
                   CROSS_VALUES | ({} if K is None else {"K": K}))
    tuned = kernels._product_kernel.configs
    calls = [c for c in PRODUCT_CALLS if not c[-1]] if args.quick else PRODUCT_CALLS
    for (what, epi, norm, K, N, glob), c in itertools.product(calls, tuned[:1] if args.quick else tuned):
        consts = dict(NORM=norm, EPI=epi, H=128 if glob else 64, TP=triton.next_power_of_2(K // kernels.SS_COLS),
                      IEEE=False, **c.kwargs)
        report(f"product {what} ({K} -> {N}), blocks {c.kwargs['BLOCK_M']} x {c.kwargs['BLOCK_N']} x "
               f"{c.kwargs['BLOCK_K']}, {c.num_warps} warps, {c.num_stages} stages",
               kernels._product_kernel.fn, PRODUCT_TYPES, consts, c.num_warps, product_values(K, N, glob),
               c.num_stages)
    for name, pointers, floats, values, const_sets, warps in OTHERS:
        tuner = getattr(kernels, name)
        fn = tuner.fn if isinstance(tuner, triton.runtime.Autotuner) else tuner  # the JITFunction
        types = arg_types(fn, pointers, floats)
        tuned = candidates(tuner) if tuner is not fn else [({}, warps)]
        for consts, (meta, w) in itertools.product(const_sets, tuned[:1] if args.quick else tuned):
            shown = ", ".join(f"{k} {v}" for k, v in {**consts, **meta}.items())
            report(f"{name.strip('_')}{' ' + shown if shown else ''} x {w} warps", fn, types, consts | meta, w,
                   values)
    print(f"{'all compiled' if not failed else f'{failed} failed'} for sm_90", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
