"""The generator's step functions in C for a CPU and fp32 (`Generator(native=...)`).

On a CPU a small model's one-byte step is nearly all PyTorch's per-operator overhead: the tiny
preset's ~500 operators a byte cost ~3.4 ms eagerly, and compiled ones still ~0.8 ms
(docs/benchmarks.md, fourteenth to sixteenth sessions). `native.c` runs the same steps (front,
patch, decode with sampling, advance, feed, flag, and a whole byte in one call) on the
generator's own state tensors, one row and one operation after another, with no allocation. The
host loop and the prefill (one full forward) stay in PyTorch, so the state is the generator's,
step for step (tests/test_native.py compares the two paths' state and bytes).

The C file is compiled on first use by the system's C compiler (`$CC`, else `cc`, `gcc` or
`clang`), as torch.compile's CPU backend does, into `$BLTKIT_CACHE` (default
`~/.cache/bltkit`)/native, keyed by the source, the flags and the CPU, and loaded with ctypes.
Without a compiler the generator keeps its PyTorch steps (`native.unavailable()` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .bytes import BOS_ID, EOS_ID, OFFSET

VERSION = 1  # native.c's NATIVE_VERSION: the description's order
_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp-simd"]
_lib = None
_error: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    sig = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sig + line
    except OSError:
        pass
    return sig + platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("BLTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bltkit")
    return Path(root) / "native"


def _build(cc: str) -> Path:
    """Compile native.c (once per source, compiler, flags and CPU) and return the library's path.
    Written to a temporary name and renamed, so a concurrent or killed build leaves no half file."""
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + cc.encode() + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out = _cache_dir() / f"blt_step_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (["-march=native"], []):  # -march=native where the compiler takes it
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *_FLAGS, *arch, "-o", tmp, str(_SOURCE), "-lm"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode == 0:
            os.replace(tmp, out)
            return out
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {run.stderr.strip()[-500:]}")
    raise RuntimeError("compiling bltkit/native.c failed:\n" + "\n".join(errors))


def load():
    """The compiled library (built on first use); raises RuntimeError with the reason if it
    cannot be built or loaded."""
    global _lib, _error
    if _lib is not None:
        return _lib
    if _error is not None:
        raise RuntimeError(_error)
    try:
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set $CC, or install cc, gcc or clang)")
        lib = ctypes.CDLL(str(_build(cc)))
        if lib.blt_version() != VERSION:
            raise RuntimeError(f"bltkit/native.c is version {lib.blt_version()}, native.py expects {VERSION}")
    except (RuntimeError, OSError) as e:
        _error = f"bltkit's native CPU steps are unavailable: {e}"
        raise RuntimeError(_error) from e
    ptr = ctypes.c_void_p
    lib.blt_new.restype = ptr
    lib.blt_new.argtypes = [ptr, ptr, ctypes.c_int64]
    lib.blt_free.argtypes = [ptr]
    lib.blt_free.restype = None
    for name in ("blt_front", "blt_patch", "blt_advance", "blt_feed", "blt_flag"):
        getattr(lib, name).argtypes = [ptr]
        getattr(lib, name).restype = ctypes.c_int
    sampling = [ctypes.c_double, ctypes.c_int64, ctypes.c_double]  # temperature, top_k, top_p
    lib.blt_decode.argtypes = [ptr, *sampling]
    lib.blt_byte.argtypes = [ptr, ctypes.c_int, *sampling]
    for name in ("blt_decode", "blt_byte"):
        getattr(lib, name).restype = ctypes.c_int
    _lib = lib
    return lib


def unavailable() -> str | None:
    """Why the native steps cannot run here (None: they can)."""
    try:
        load()
    except RuntimeError as e:
        return str(e)
    return None


def refusal(model) -> str | None:
    """Why `model` cannot run the native steps (None: it can)."""
    if model.device.type != "cpu":
        return f"the native steps run on a CPU; this model is on {model.device}"
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            return f"the native steps run in fp32; {name} is {p.dtype} (model.float())"
        if not p.is_contiguous():
            return f"the native steps read contiguous weights; {name} is not"
    c = model.config
    if c.encoder.dim != c.decoder.dim:
        return "the native steps need the encoder's and the decoder's widths equal"
    return None


class _Description:
    """The flat lists blt_new reads, in its order: integers (and addresses), reals. Matrices go as
    transposed copies ([in, out], `t`), which native.c's products read, kept in `transposed`
    across descriptions and remade only where a weight changed (its version counter)."""

    def __init__(self, transposed: dict):
        self.ints: list[int] = [VERSION]
        self.reals: list[float] = []
        self.keep: list[torch.Tensor] = []  # tensors made here, alive as long as the steps
        self.transposed = transposed
        self.used: set[int] = set()

    def i(self, *values: int) -> None:
        self.ints.extend(int(v) for v in values)

    def f(self, *values: float) -> None:
        self.reals.extend(float(v) for v in values)

    def p(self, *tensors) -> None:
        for t in tensors:
            if t is None:
                self.ints.append(0)
                continue
            if not t.is_contiguous():
                raise ValueError(f"native steps: a tensor of shape {tuple(t.shape)} is not contiguous")
            self.ints.append(t.data_ptr())

    def t(self, *weights) -> None:
        """Matrices [out, in] as their transposed copies."""
        for w in weights:
            if w is None:
                self.p(None)
                continue
            key = id(w)
            held, version, copy = self.transposed.get(key, (None, None, None))
            if held is not w or version != w._version:  # (held keeps w alive: its id is not reused)
                with torch.no_grad():
                    copy = w.detach().t().contiguous()
                self.transposed[key] = (w, w._version, copy)
            self.used.add(key)
            self.p(copy)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        self.keep.append(t)
        return t

    def stack(self, gen, layers, cfg, eps: float, k, v, slots, ring=None) -> None:
        """A stack: its shape, norm eps, blocks, caches, ring and RoPE tables."""
        N, Nk, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.i(cfg.dim, N, Nk, H, cfg.ffn_dim, len(layers))
        self.f(eps)
        for b in layers:
            a, ff = b.attention, b.feed_forward
            self.p(b.attention_norm.weight)
            self.t(a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight)
            self.p(b.ffn_norm.weight)
            self.t(ff.w1.weight, ff.w3.weight, ff.w2.weight)
        self.p(k, v)
        self.i(slots)
        if ring is not None:
            self.p(ring.pos, ring.doc)
            self.i(ring.window or 0)
        t = gen._rope_tables[(H, cfg.rope_theta)]
        self.p(self.own(t["cos"][:, :, 0]), self.own(t["sin"][:, :, 1]))

    def cross(self, layers) -> None:
        self.i(len(layers))
        for c in layers:
            self.i(c.n_heads, c.n_kv_heads, c.head_dim)
            self.f(c.cross_attn_norm_q.eps)
            self.p(c.cross_attn_norm_q.weight, c.cross_attn_norm_kv.weight)
            self.t(c.wq.weight, c.wk.weight, c.wv.weight, c.wo.weight)


class Steps:
    """The native step functions of a Generator (`functions()`), over the state that `bind()`
    hands them after each `_init_state` (the addresses of that state and of the model's weights)."""

    def __init__(self, gen):
        self._lib = load()
        self._gen = gen
        self._h = None
        self._transposed: dict[int, tuple] = {}  # id(weight) -> (weight, its version, copy)

    def bind(self) -> None:
        """Describe the generator's current state and weights to the C side."""
        from .model.hashing import _coef_tensor

        self.free()
        gen, lib = self._gen, self._lib
        if why := refusal(gen.model):  # moved or cast since the Generator was made
            raise ValueError(f"the native steps cannot run this model any more: {why}; make a new Generator "
                             "(or Generator(model, native=False))")
        m, c, pc = gen.model, gen.cfg, gen.cfg.patcher
        d = _Description(self._transposed)
        B = gen.x.shape[0]
        d.i(B, c.vocab_size, c.cross_attn_k, gen.capacity, gen.p_cap, gen.buf.shape[1], gen.hist.shape[1])
        d.i(BOS_ID, EOS_ID, OFFSET)
        mode = ("entropy", "space", "static", "byte").index(pc.mode)
        d.i(mode, pc.monotonicity, pc.threshold_add is not None, pc.doc_boundaries,
            int(pc.patch_size) if pc.mode == "static" else 1, pc.max_patch_length or 0)
        d.f(pc.threshold, pc.threshold_add or 0.0)
        d.i(gen.ent is not None)
        if gen.ent is not None:
            em = m.entropy_model
            d.stack(gen, em.layers, em.config, em.config.norm_eps, gen.ent.k, gen.ent.v, gen.ent.pos.shape[0], gen.ent)
            d.p(em.tok_embeddings.weight, em.norm.weight)
            d.t(em.output.weight)
            d.i(em.output.out_features)
            d.f(em.norm.eps)
        enc, dec = m.local_encoder, m.local_decoder
        d.stack(gen, enc.layers, c.encoder, c.norm_eps, gen.enc.k, gen.enc.v, gen.enc.pos.shape[0], gen.enc)
        bag = m.encoder_hash_tok_embedding
        d.p(enc.tok_embeddings.weight, bag.weight if bag is not None else None)
        if bag is not None:
            coef = _coef_tensor(tuple(c.hash_sizes), c.hash_functions, max(c.hash_sizes), torch.device("cpu"))
            d.i(coef.shape[0])
            d.p(d.own(coef))
        else:
            d.i(0)
            d.p(None)
        d.i(c.hash_vocab)
        d.cross(enc.cross_attn_layers)
        d.i(*[-1 if (j := enc.cross_index(i)) is None else j for i in range(len(enc.layers))])
        d.t(enc.patch_embedding_projection.weight)
        d.p(gen.enc_xk, gen.enc_xv, gen.runmax)
        gt = m.global_transformer
        d.stack(gen, gt.layers, c.global_transformer, c.norm_eps, gen.g_k, gen.g_v, gen.g_k.shape[3])
        proj = gt.token_embedding_projection
        d.t(proj.weight if proj is not None else None)
        d.p(gen.g_doc)
        d.cross(dec.cross_attn_layers)
        d.stack(gen, dec.layers, c.decoder, c.norm_eps, gen.dec.k, gen.dec.v, gen.dec.pos.shape[0], gen.dec)
        d.i(*[-1 if (j := dec.cross_index(i)) is None else j for i in range(len(dec.layers))])
        d.t(dec.patch_embedding_projection.weight)
        d.p(gen.dec_xk, gen.dec_xv, dec.norm.weight)
        d.t(dec.output.weight)
        d.f(dec.norm.eps)
        d.p(gen.n, gen.hist, gen.doc, gen.open_len, gen.open_start, gen.p, gen.pdoc, gen.x, gen.buf, gen.lens,
            gen.next, gen.h_prev, gen.h, gen.logits, gen.H, gen.like_prev, gen.open_eos, gen.close, gen.any_close,
            gen.keys)
        d.i(VERSION)
        for key in set(self._transposed) - d.used:  # weights no longer in the model
            del self._transposed[key]
        self._ints = torch.tensor(d.ints, dtype=torch.int64)
        self._reals = torch.tensor(d.reals or [0.0], dtype=torch.float64)
        self._keep = d.keep
        handle = lib.blt_new(self._ints.data_ptr(), self._reals.data_ptr(), len(d.ints))
        if not handle:
            raise RuntimeError("bltkit/native.c refused the generator's description (a stale build, or out of "
                               "memory); remove the cache folder " + str(_cache_dir()))
        self._h = ctypes.c_void_p(handle)

    def free(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h is not None:
            self._lib.blt_free(h)

    __del__ = free

    def _check(self, code: int) -> None:
        if code == 2:
            raise IndexError(f"a row has more patches than the global cache holds ({self._gen.p_cap}: "
                             "config.max_patches or the bytes asked for, + 1); generate fewer bytes or raise max_patches")
        if code:
            raise IndexError(f"native step at position {int(self._gen.n)}, outside the state's "
                             f"{self._gen.capacity} positions (Generator._init_state sizes it)")

    def front(self) -> None:
        self._check(self._lib.blt_front(self._h))

    def patch(self, L: int | None = None) -> None:
        self._check(self._lib.blt_patch(self._h))

    def _sampling(self) -> tuple[float, int, float]:
        """The generator's (temperature, top_k, top_p) as native.c takes them (0: off)."""
        temperature, top_k, top_p = self._gen.sampling
        return float(temperature), int(top_k or 0), float(top_p or 0.0)

    def decode(self) -> None:
        """The decoder, and the next byte: greedy, or sampled as bltkit.sampling.sample does (the
        same noise; its fp32 softmax summed in another order, so only a near-tie can differ)."""
        self._check(self._lib.blt_decode(self._h, *self._sampling()))

    def advance(self) -> None:
        self._check(self._lib.blt_advance(self._h))

    def back(self) -> None:
        self.decode()
        self.advance()

    def feed(self) -> None:
        self._check(self._lib.blt_feed(self._h))

    def flag(self) -> None:
        self._lib.blt_flag(self._h)

    def byte(self, pending: bool) -> None:
        """A whole byte in one call (`Generator._step`): the waiting back and feed steps of the
        last byte (`pending`), the front, and the patch step if some row closes a patch."""
        self._check(self._lib.blt_byte(self._h, int(pending), *self._sampling()))

    def front_patch(self, L: int | None = None) -> None:
        self.front()
        self.patch()

    def speculative(self) -> None:
        """The front and the decoder as if no patch closes (`Generator._run_speculative`; the
        decoder reads nothing the front's entropy model and boundary write)."""
        self.front()
        self.decode()

    def functions(self) -> dict:
        """The Generator's step-function table (`Generator._fns`) for these steps."""
        return {"front": self.front, "patch": self.patch, "back": self.back, "decode": self.decode,
                "advance": self.advance, "feed": self.feed, "flag": self.flag, "front_patch": self.front_patch,
                "speculative": self.speculative}


