"""bltkit.native: the generator's C steps against its PyTorch steps and the uncached oracle, on
tiny fp32 models of several shapes (GQA, cross-attention in every encoder layer or in one
decoder layer, no hash tables, a global input projection, short windows, documents)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bltkit import native, presets
from bltkit.bytes import EOS_ID, encode
from bltkit.checkpoint import init_model
from bltkit.generate import Generator, reference_generate

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=str(native.unavailable()))


def _replace(cfg, part: str, **kw):
    return dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **kw)})


def shape(name: str):
    """The tiny preset and variants whose steps take other paths through native.c."""
    cfg = presets.tiny()
    if name == "gqa":  # grouped keys/values in every stack and in the cross-attention
        for part in ("encoder", "decoder"):
            cfg = _replace(cfg, part, n_kv_heads=2, cross_attn_n_kv_heads=2)
        cfg = _replace(cfg, "global_transformer", n_kv_heads=1)
        cfg = _replace(cfg, "entropy_model", n_kv_heads=2)
    elif name == "cross_layers":  # the encoder's cross-attention in both layers, the decoder's in its first
        cfg = _replace(cfg, "encoder", n_layers=2, cross_attn_all_layers=True)
        cfg = _replace(cfg, "decoder", n_layers=3, cross_attn_all_layers=False)
    elif name == "no_hash_projected":  # no hash tables; K x encoder width != global width: a projection
        cfg = dataclasses.replace(cfg, hash_functions=0)
        cfg = _replace(cfg, "global_transformer", dim=48, n_heads=4, ffn_dim=96)
    elif name == "windows":  # rings shorter than the text, documents, max patch length
        for part in ("encoder", "decoder", "entropy_model"):
            cfg = _replace(cfg, part, window=6)
        cfg = _replace(cfg, "patcher", max_patch_length=3)
    model = init_model(cfg, seed=7)
    with torch.no_grad():  # spread random entropies around the threshold
        model.entropy_model.output.weight.mul_(8.0)
    return model


SHAPES = ["tiny", "gqa", "cross_layers", "no_hash_projected", "windows"]
PROMPTS = [[*encode("one doc"), EOS_ID, *encode("and the next")], encode("ragged"), encode("x")]


@pytest.mark.parametrize("name", SHAPES)
def test_native_steps_equal_pytorch_steps(name):
    """Byte by byte through `step` (the prompts teacher-forced, no prefill): every step's logits
    and boundaries, then the whole state, equal the PyTorch steps'. Tolerance 1e-5 on fp32 values
    of order 1-10: both sum the same products in other orders (~1e-6 apart, as the PyTorch steps
    are from the full forward, tests/test_generate.py)."""
    model = shape(name)
    seqs = [p + encode(" more bytes, then some") for p in PROMPTS]
    T = min(len(s) for s in seqs)
    x = torch.tensor([s[:T] for s in seqs])
    gens = [Generator(model, native=False), Generator(model, native=True)]
    for g in gens:
        g._init_state(x.shape[0], T, [0, 0, 0])
    for n in range(T):
        (la, ca), (lb, cb) = (tuple(t.clone() for t in g.step(x[:, n])) for g in gens)
        assert torch.equal(ca, cb), n
        assert (la - lb).abs().max().item() < 1e-5, n
    a, b = (g._state_tensors() for g in gens)
    p = a["p"]
    assert torch.equal(p, b["p"])
    assert int(p.min()) > 1
    for key in a:
        if key == "H":  # the PyTorch plain steps keep the entropy local
            continue
        u, v = a[key], b[key]
        if key in ("g_k", "g_v"):  # the closed patches' slots (PyTorch writes every row's next slot too)
            u = torch.cat([u[:, r, :, :int(p[r])] for r in range(len(p))], 2)
            v = torch.cat([v[:, r, :, :int(p[r])] for r in range(len(p))], 2)
        if u.is_floating_point():
            fin = torch.isfinite(u)
            assert torch.equal(fin, torch.isfinite(v)), key
            assert torch.allclose(u[fin], v[fin], rtol=0.0, atol=1e-5), key
        else:
            assert torch.equal(u, v), key


@pytest.mark.parametrize("name", SHAPES)
def test_native_greedy_and_sampled_equal_reference(name):
    model = shape(name)
    gen = Generator(model)
    assert gen.native  # the CPU default
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}):
        assert gen.generate_ids(PROMPTS, 20, stop_at_eos=False, **kw) == reference_generate(
            model, PROMPTS, 20, stop_at_eos=False, **kw)


def test_native_refusals_say_why():
    model = init_model(presets.tiny(), seed=0)
    with pytest.raises(ValueError, match="fp32"):
        Generator(model.to(torch.bfloat16), native=True)
    model.float()
    with pytest.raises(ValueError, match="compile"):
        Generator(model, compile=True, native=True)
    assert not Generator(model, compile=True).native  # the default steps aside for compile
    gen = Generator(model)
    model.to(torch.bfloat16)  # cast after the Generator was made: refused, not misread
    with pytest.raises(ValueError, match=r"any more.*fp32"):
        gen.generate("x", 4)


def test_no_compiler_falls_back_to_pytorch_steps(monkeypatch, tmp_path):
    """Without a C compiler the default is the PyTorch steps, and native=True says what is missing;
    with one, a fresh cache builds the library again."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    model = init_model(presets.tiny(), seed=0)
    assert "no C compiler" in native.unavailable()
    assert not Generator(model).native
    with pytest.raises(ValueError, match="no C compiler"):
        Generator(model, native=True)
    monkeypatch.undo()
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("BLTKIT_CACHE", str(tmp_path))
    assert native.unavailable() is None
    assert [p.name for p in (tmp_path / "native").iterdir()] == [f.name for f in (tmp_path / "native").glob("*.so")]


def test_native_steps_refuse_positions_past_the_state():
    """The C steps check the position against the state they were given, not write past it."""
    gen = Generator(init_model(presets.tiny(), seed=0), native=True)
    gen._init_state(1, 4, [0])
    for n in range(4):
        gen.step(torch.tensor([65 + n]))
    with pytest.raises(IndexError, match="outside the state"):
        gen.step(torch.tensor([70]))


def test_native_steps_read_short_prompts_byte_by_byte(monkeypatch):
    """A forward's fixed cost outweighs a small model's steps on short prompts: those are stepped
    (prompt bytes x parameters less the embedding tables <= NATIVE_STEP_PROMPT_WORK); longer ones,
    and every prompt of the PyTorch steps, are read by the forward. The same bytes either way."""
    from bltkit import generate

    model = shape("tiny")
    prompts = [encode("a short prompt"), encode("and another one")]
    forwards = []
    for native_steps, work, want in ((True, None, 0), (True, 0, 1), (False, None, 1)):
        if work is not None:
            monkeypatch.setattr(generate, "NATIVE_STEP_PROMPT_WORK", work)
        gen = Generator(model, native=native_steps)
        real = gen._prefill
        calls = []
        gen._prefill = lambda x, real=real, calls=calls: (calls.append(x.shape), real(x))
        forwards.append(gen.generate_ids(prompts, 12, stop_at_eos=False))
        assert len(calls) == want, (native_steps, work)
        monkeypatch.undo()
    assert forwards[0] == forwards[1] == forwards[2]
