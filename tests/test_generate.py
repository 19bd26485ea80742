"""The cached Generator against the uncached oracle (spec §13.2), on tiny fp32 models."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch

from bltkit import generate, native, presets
from bltkit.bytes import EOS_ID, decode, encode
from bltkit.checkpoint import init_model, save_model
from bltkit.generate import PATCH_EVERY_BYTE_ROWS, Generator, _conditional_nodes, reference_generate

MODES = {
    "entropy": {},
    "monotonic": {"monotonicity": True, "threshold": 0.3},
    "threshold_add": {"threshold_add": 0.2},
    "space": {"mode": "space"},
    "static": {"mode": "static", "patch_size": 3},
    "byte": {"mode": "byte"},
    "entropy+max3": {"max_patch_length": 3},
    "space+max4": {"mode": "space", "max_patch_length": 4},
}


# the step functions' two implementations on a CPU: PyTorch's (also the GPU's) and the C steps of
# bltkit.native (the CPU default where a C compiler is found)
NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(native.unavailable() is not None,
                                                             reason=str(native.unavailable())))]


def make_model(seed: int = 0, window: int | None = None, **patcher):
    cfg = presets.tiny()
    cfg = dataclasses.replace(cfg, patcher=dataclasses.replace(cfg.patcher, **patcher))
    if window is not None:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, window=window),
                                  decoder=dataclasses.replace(cfg.decoder, window=window),
                                  entropy_model=dataclasses.replace(cfg.entropy_model, window=window))
    model = init_model(cfg, seed=seed)
    with torch.no_grad():  # spread random entropies around the threshold (spec §15.3)
        model.entropy_model.output.weight.mul_(8.0)
    return model


def eos_heavy(model):
    """`model` with its decoder writing EOS about one byte in three: documents that start
    mid-generation, not from a prompt."""
    with torch.no_grad():
        w = model.local_decoder.output.weight
        w[EOS_ID] = w[EOS_ID] * 4 + w.std() * 2
    return model


def random_prompts(seed: int, n: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = "abcdefgh ijk,.é€\n"
    return [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))).encode() for _ in range(n)]


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("native_steps", NATIVE)
def test_greedy_equals_reference_every_mode(mode, speculate, native_steps):
    model = make_model(seed=1, **MODES[mode])
    prompts = random_prompts(seed=len(mode))
    gen = Generator(model, speculate=speculate, native=native_steps)
    out = gen.generate_ids(prompts, 24, stop_at_eos=False)
    ref = reference_generate(model, prompts, 24, stop_at_eos=False)
    assert out == ref


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("native_steps", NATIVE)
def test_greedy_equals_reference_window_and_documents(seed, speculate, native_steps):
    """Window 8 < sequence length exercises the ring caches; an EOS inside a prompt exercises the
    document masks and the patch-document mask of the global cache."""
    model = make_model(seed=seed, window=8)
    prompts = [[*encode("first doc"), EOS_ID, *encode("second one, longer than eight")], "short"]
    gen = Generator(model, speculate=speculate, native=native_steps)
    assert gen.generate_ids(prompts, 30, stop_at_eos=False) == reference_generate(model, prompts, 30,
                                                                                  stop_at_eos=False)


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("mode", [{}, {"mode": "space", "max_patch_length": 4}])
@pytest.mark.parametrize("native_steps", NATIVE)
def test_greedy_equals_reference_across_generated_documents(mode, speculate, native_steps):
    """EOS bytes the model writes itself start new documents mid-generation (every row's caches
    and its global patch documents move on step by step, not from a prompt)."""
    model = eos_heavy(make_model(seed=0, window=8, **mode))
    prompts = random_prompts(seed=1, n=3)
    want = reference_generate(model, prompts, 16, stop_at_eos=False)
    assert sum(row.count(EOS_ID) for row in want) >= 6
    assert Generator(model, speculate=speculate, native=native_steps).generate_ids(prompts, 16, stop_at_eos=False) == want


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("mode", ["entropy", "monotonic", "entropy+max3", "space+max4"])
@pytest.mark.parametrize("native_steps", NATIVE)
def test_wide_batches_equal_reference(mode, overlap, native_steps):
    """From PATCH_EVERY_BYTE_ROWS rows on the patch step runs every byte; overlapping, it runs for
    every row before the boundary is decided (beside the entropy model on a GPU) and is kept only
    for the rows whose patch closes. Ragged prompts, an EOS inside one, window 8 (ring caches),
    EOS written by the model: the bytes are the reference's either way."""
    from bltkit.generate import PATCH_EVERY_BYTE_ROWS

    model = eos_heavy(make_model(seed=4, window=8, **MODES[mode]))
    prompts = [*random_prompts(seed=9, n=PATCH_EVERY_BYTE_ROWS), [*encode("one doc"), EOS_ID, *encode("and another")]]
    gen = Generator(model, overlap=overlap, native=native_steps)
    out = gen.generate_ids(prompts, 20, stop_at_eos=False)
    assert gen.overlapping == overlap
    want = reference_generate(model, prompts, 20, stop_at_eos=False)
    assert sum(row.count(EOS_ID) for row in want) >= 6
    assert out == want


@pytest.mark.parametrize(("fuse", "speculate", "native_steps"), [
    (True, False, False), (False, False, False), (True, True, False), *[
        pytest.param(True, spec, True, marks=NATIVE[1].marks) for spec in (False, True)]])
def test_step_logits_equal_full_forward_and_online_boundaries(fuse, speculate, native_steps):
    """Every step's logits equal the full forward's within 1e-5 (fp32; measured ~1e-6: the
    one-position attention sums keys in a different order), and the boundaries decided online
    equal those of the full patcher on the final text; with the fused q|k|v, w1|w3 projections
    (default) and without, and decoding before the boundary is known (speculate)."""
    model = make_model(seed=4, window=8)
    seq = [*encode("Online boundaries must equal offline ones"), EOS_ID, *encode("ok")]
    x = torch.tensor([seq])
    full = model(x)[0]
    starts = model.patch_starts(x)[0]
    gen = Generator(model, fuse=fuse, speculate=speculate, native=native_steps)
    gen._init_state(1, len(seq), [0])
    for n in range(len(seq)):
        logits, close = gen.step(x[:, n])
        assert (logits[0] - full[n]).abs().max().item() < 1e-5
        assert bool(close[0]) == bool(starts[n + 1])  # close after n  <=>  n+1 starts a patch


@pytest.mark.parametrize("native_steps", NATIVE)
def test_fused_projections_follow_weight_changes(native_steps):
    """The generator's fused copies (the PyTorch steps' q|k|v, w1|w3 and stacked cross K/V; the
    native steps' transposed weights) are refreshed when the model's weights change in place
    (training between calls): the output equals a fresh generator's and the reference."""
    model = make_model(seed=8)
    gen = Generator(model, native=native_steps)
    prompts = [b"weights change", b"x"]
    before = gen.generate_ids(prompts, 16, stop_at_eos=False)
    with torch.no_grad():
        for layer in model.local_decoder.layers:
            layer.attention.wq.weight.mul_(1.7)
            layer.feed_forward.w3.weight.mul_(-1.0)
        for cross in model.local_decoder.cross_attn_layers:
            cross.wv.weight.mul_(-1.3)
    after = gen.generate_ids(prompts, 16, stop_at_eos=False)
    assert after != before
    assert after == Generator(model, native=native_steps).generate_ids(prompts, 16, stop_at_eos=False)
    assert after == reference_generate(model, prompts, 16, stop_at_eos=False)


def test_attend_splits_bound_each_programs_keys():
    """kernels.attend's split of a row's keys (a plain function: CI has no Triton): enough
    programs in all, no program over ATTEND_MAX_CHUNK keys unless that would make chunks under
    ATTEND_MIN_CHUNK, and short caches of many rows unsplit (where the kernel was timed faster)."""
    from bltkit import kernels

    lo, hi, target = kernels.ATTEND_MIN_CHUNK, kernels.ATTEND_MAX_CHUNK, kernels.ATTEND_PROGRAMS
    assert hi >= 2 * lo
    assert kernels.attend_splits(64 * 16, 128) == 1  # blt-1b at 64 rows, a short cache
    assert kernels.attend_splits(64 * 16, 455) == 2  # ... a 2,048-byte prompt's global cache
    for programs in (1, 16, 100, 512, 1024, 4096):
        for keys in (1, 63, 64, 65, 127, 128, 200, 256, 257, 455, 512, 2048, 8192):
            n = kernels.attend_splits(programs, keys)
            chunk = -(-keys // n)
            assert n >= 1, (programs, keys, n)
            assert n == 1 or keys // n >= lo, (programs, keys, n)  # no chunk under lo
            assert chunk <= hi, (programs, keys, n)
            assert programs * n >= target or n == max(1, keys // lo), (programs, keys, n)


@pytest.mark.parametrize("native_steps", NATIVE)
def test_batch_equals_single_and_order_independent(native_steps):
    model = make_model(seed=5)
    prompts = [b"alpha", b"", "é€ mixed".encode(), b"a much longer prompt than the others"]
    gen = Generator(model, native=native_steps)
    batch = gen.generate_ids(prompts, 20, temperature=0.9, top_k=40, seed=11, stop_at_eos=False)
    single = [gen.generate_ids([p], 20, temperature=0.9, top_k=40, seed=11, stop_at_eos=False)[0] for p in prompts]
    assert batch == single
    rev = gen.generate_ids(prompts[::-1], 20, temperature=0.9, top_k=40, seed=11, stop_at_eos=False)
    assert rev[::-1] == batch


@pytest.mark.parametrize("kw", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5},
                                {"temperature": 1.3, "top_p": 0.8}, {"temperature": 1.0, "top_k": 50, "top_p": 0.5}])
@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("native_steps", NATIVE)
def test_sampling_equals_reference(kw, speculate, native_steps):
    model = make_model(seed=6)
    prompts = random_prompts(seed=9, n=2)
    gen = Generator(model, speculate=speculate, native=native_steps)
    out = gen.generate_ids(prompts, 20, seed=3, stop_at_eos=False, **kw)
    assert out == reference_generate(model, prompts, 20, seed=3, stop_at_eos=False, **kw)
    assert out == gen.generate_ids(prompts, 20, seed=3, stop_at_eos=False, **kw)  # reproducible
    assert out != gen.generate_ids(prompts, 20, seed=4, stop_at_eos=False, **kw)  # the seed matters


def test_stop_strings_and_eos():
    model = make_model(seed=7)
    gen = Generator(model)
    full = gen.generate(b"stop test", 40)[0]
    assert len(full) == 40
    stop = full[10:13]  # a stop string is matched on bytes (given as bytes here: any the model wrote)
    first = full.find(stop)
    assert 0 <= first <= 10
    assert gen.generate(b"stop test", 40, stop=[stop])[0] == full[:first]
    assert gen.generate(b"stop test", 40, stop=stop)[0] == full[:first]  # one alone, not in a list
    # ending on the last byte max_new_bytes allows, it is cut too (it was left in before)
    assert gen.generate(b"stop test", first + 3, stop=[stop])[0] == full[:first]
    # streamed: the same text, without the stop string (the stream handed it out before)
    for n in (40, first + 3):
        streamed = "".join(gen.stream(b"stop test", n, stop=[stop]))
        assert streamed == full[:first].decode("utf-8", errors="replace")
    for bad, err in (([b""], ValueError), ("", ValueError), ([3], TypeError)):
        with pytest.raises(err, match="stop string"):
            gen.generate(b"stop test", 4, stop=bad)
        with pytest.raises(err, match="stop string"):
            list(gen.stream(b"stop test", 4, stop=bad))
    # EOS: a decoder head that always predicts EOS (used by both the generator and the forward)
    def eos_head(z):
        return torch.zeros(*z.shape[:-1], 260).index_fill_(-1, torch.tensor([EOS_ID]), 1.0)

    model.local_decoder.head = eos_head
    eos_gen = Generator(model, native=False)  # a Python head: the PyTorch steps
    assert eos_gen.generate_ids(["x"], 10) == [[]]
    assert EOS_ID in eos_gen.generate_ids(["x"], 10, stop_at_eos=False)[0]


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("every", [3, 1000])
def test_bytes_read_back_every_few_steps(every, ahead, monkeypatch):
    """generate_ids reads generated bytes back every READ_EVERY steps (1000: only after the last
    step), and on CUDA ahead (READ_AHEAD: copied without a wait, handed out a read later; here on
    the CPU, with the same lag): the same rows as reading every step, with rows ended by EOS at
    different steps, by a stop string, or by max_new_bytes."""
    monkeypatch.setattr(generate, "_reads_ahead", lambda buf: ahead)
    model = eos_heavy(make_model(seed=9))
    prompts = random_prompts(seed=10, n=4)
    gen = Generator(model)
    free = gen.generate_ids(prompts, 16, stop_at_eos=False)
    stop = chr(next(b for row in free for b in row[2:] if b < 0x80))  # a byte some row writes
    monkeypatch.setattr(generate, "READ_EVERY", 1)
    want = [gen.generate_ids(prompts, 16), gen.generate_ids(prompts, 16, stop=[stop]),
            gen.generate_ids(prompts, 16, stop_at_eos=False)]
    assert want[0] == reference_generate(model, prompts, 16)
    assert len({len(row) for row in want[0]}) > 1  # EOS ended the rows at different steps
    assert want[1] != want[2]  # the stop string cut something
    monkeypatch.setattr(generate, "READ_EVERY", every)
    assert [gen.generate_ids(prompts, 16), gen.generate_ids(prompts, 16, stop=[stop]),
            gen.generate_ids(prompts, 16, stop_at_eos=False)] == want


@pytest.mark.parametrize("matrices", [True, False])
def test_rope_from_tables(matrices, monkeypatch):
    """The steps take RoPE from tables made with the state: the fused steps' rotation matrices of
    every position, or (past ROPE_MATRIX_BYTES) each step's matrix made from the tables' cos
    and sin; the reference's bytes either way."""
    if not matrices:
        monkeypatch.setattr(generate, "ROPE_MATRIX_BYTES", 0)
    model = make_model(seed=11, window=8)
    prompts = random_prompts(seed=12)
    gen = Generator(model, native=False)  # the PyTorch steps' RoPE
    assert gen.generate_ids(prompts, 14, stop_at_eos=False) == reference_generate(model, prompts, 14,
                                                                                    stop_at_eos=False)
    assert all(("R" in t) == matrices for t in gen._rope_tables.values())


def test_stream_pieces_are_whole_characters():
    model = make_model(seed=8)
    gen = Generator(model)
    pieces = list(gen.stream("Stream", 48, temperature=1.0, seed=2))
    ids = gen.generate_ids(["Stream"], 48, temperature=1.0, seed=2)[0]
    assert "".join(pieces) == decode(ids, errors="replace")
    for piece in pieces[:-1]:
        piece.encode("utf-8")  # every piece is valid text on its own
    marker = "\u2063"  # a character these 48 sampled bytes do not produce (checked below)
    assert marker not in "".join(pieces)
    marked = "".join(gen.stream("Stream", 48, temperature=1.0, seed=2, patch_marker=marker))
    assert marked.replace(marker, "") == "".join(pieces)
    assert 0 < marked.count(marker) <= len(ids)


def test_empty_prompt_and_limits():
    model = make_model(seed=9)
    gen = Generator(model)
    assert gen.generate_ids([""], 5, stop_at_eos=False) == reference_generate(model, [[]], 5, stop_at_eos=False)
    assert gen.generate([], 5) == []  # an empty batch (it raised max()'s ValueError)
    with pytest.raises(ValueError, match=r"max_new_bytes must be a whole number >= 0, got 5\.0"):
        gen.generate("x", 5.0)  # (a TypeError from torch.zeros before)
    for call in (lambda: Generator(model.entropy_model), lambda: reference_generate(model.entropy_model, ["x"], 2)):
        with pytest.raises(ValueError, match="needs a BLT, got EntropyModel"):  # (an AttributeError before)
            call()
    with pytest.raises(TypeError, match="a prompt is str, bytes or a list of ids"):
        gen.generate([5], 3)
    with pytest.raises(TypeError, match="prompts is a list of prompts"):
        gen.generate(5, 3)
    small = dataclasses.replace(model.config, max_bytes=32)
    model.config = small
    gen = Generator(model)
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        gen.generate("x" * 40, 1)
    with pytest.raises(ValueError, match="at most"):
        gen.generate("x" * 20, 20)
    with pytest.raises(ValueError, match=r"0\.\.259"):
        gen.generate_ids([[1, 300]], 2)


@pytest.mark.parametrize(("kw", "what"), [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 0.8, "top_k": -1}, "top_k"), ({"temperature": 0.8, "top_k": 2.5}, "top_k"),
    ({"temperature": 0.8, "top_p": 0.0}, "top_p"), ({"temperature": 0.8, "top_p": 1.5}, "top_p"),
])
def test_sampling_settings_out_of_range_are_refused(kw, what):
    """A negative temperature was read as greedy and top_p outside (0, 1] as no filter; now each
    entry point refuses them, naming the setting and its allowed values. top_k 0 and top_p 1 stay
    "no filter" (as in transformers), and equal no setting at all."""
    model = make_model(seed=9)
    gen = Generator(model)
    for call in (lambda: gen.generate("abc", 4, **kw), lambda: list(gen.stream("abc", 4, **kw)),
                 lambda: reference_generate(model, ["abc"], 4, **kw)):
        with pytest.raises(ValueError, match=what):
            call()
    free = {"temperature": 0.9, "seed": 3}
    want = gen.generate_ids(["abc"], 6, stop_at_eos=False, **free)
    assert gen.generate_ids(["abc"], 6, stop_at_eos=False, top_k=0, top_p=1.0, **free) == want


def test_bf16_on_a_cpu_is_warned_about():
    """load_model keeps the stored dtype (the bundled model's is bf16), and a CPU Generator then runs
    PyTorch's bf16 steps, ~30x slower than the C steps of fp32 weights: it says so and what to do."""
    model = make_model(seed=9)
    with pytest.warns(UserWarning, match=r"dtype=torch\.float32, or call model\.float\(\)"):
        Generator(copy.deepcopy(model).to(torch.bfloat16))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Generator(model)  # fp32: nothing to say


def test_cli_generate(tmp_path, capsys):
    from bltkit.cli import main

    model = make_model(seed=10)
    save_model(model, tmp_path / "m")
    main(["generate", "--model", str(tmp_path / "m"), "Hi", "--max-new-bytes", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    expected = Generator(model).generate("Hi", 12)[0].decode("utf-8", errors="replace")
    assert out == "Hi" + expected + "\n"
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    main(["generate", "--model", str(tmp_path / "m"), "--prompts-file", str(tmp_path / "p.txt"),
          "--max-new-bytes", "4", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["one", "two"]
    main(["generate", "--model", str(tmp_path / "m"), "Hi", "--max-new-bytes", "12", "--device", "cpu",
          "--show-patches"])
    assert capsys.readouterr().out.replace("|", "").startswith("Hi")


def test_cli_generate_refuses_what_it_cannot_read(tmp_path, capsys, monkeypatch):
    """Text that is not UTF-8 (a prompts file, standard input, an argument) is refused with where
    (line and column) and what to do, not a codec's traceback line; Windows line ends and blank
    lines in a prompts file are not prompts; the batch mode with a PROMPT is refused, not ignored."""
    import io

    from bltkit.cli import main

    save_model(make_model(seed=10), tmp_path / "m")
    base = ["generate", "--model", str(tmp_path / "m"), "--max-new-bytes", "3", "--device", "cpu"]
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso \xff fine\n")
    (tmp_path / "crlf.txt").write_bytes(b"one\r\n\r\ntwo\x0cthree\r\n")

    def error(argv) -> str:
        with pytest.raises(SystemExit):
            main([*base, *argv])
        return capsys.readouterr().err

    assert "bad.txt is not valid UTF-8: byte 0xff at line 2, column 6" in error(["--prompts-file",
                                                                              str(tmp_path / "bad.txt")])
    assert "not valid UTF-8: byte 0xff at line 1, column 3" in error(["ab\udcffc"])  # argv's surrogate escape
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"x\xfe")))
    assert "standard input is not valid UTF-8: byte 0xfe at line 1, column 2" in error(["-"])
    assert "without a PROMPT argument" in error(["Hi", "--prompts-file", str(tmp_path / "crlf.txt")])
    assert f"--prompts-file {tmp_path}: Is a directory" in error(["--prompts-file", str(tmp_path)])  # (a traceback)
    main([*base, "--prompts-file", str(tmp_path / "crlf.txt")])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["one", "two\x0cthree"]
    assert "applies to the batch mode" in error(["Hi", "--batch-size", "2"])


def test_cli_batch_mode_groups_prompts_by_length(tmp_path, capsys):
    """--prompts-file runs batches of --batch-size prompts of similar lengths and prints the rows in
    the file's order: the same completions as one batch of all (rows do not depend on their batch)."""
    from bltkit.cli import main

    model = make_model(seed=10)
    save_model(model, tmp_path / "m")
    prompts = ["a much longer prompt than the others", "b", "medium one", "cc", "another long prompt here", "d"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    want = [b.decode("utf-8", errors="replace") for b in Generator(model).generate(prompts, 6, stop=None)]
    for batch in ("2", "64"):
        main(["generate", "--model", str(tmp_path / "m"), "--max-new-bytes", "6", "--device", "cpu",
              "--prompts-file", str(tmp_path / "p.txt"), "--batch-size", batch])
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["prompt"] for r in rows] == prompts
        assert [r["completion"] for r in rows] == want
    # the library's: Generator.generate_in_batches, in the prompts' order; bad sizes refused at the call
    gen = Generator(model)
    got = list(gen.generate_in_batches(prompts, 2, max_new_bytes=6))
    assert [i for i, _ in got] == list(range(len(prompts)))
    assert [b.decode("utf-8", errors="replace") for _, b in got] == want
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        gen.generate_in_batches(prompts, 0)


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("mode", ["entropy", "threshold_add", "space+max4"])
@pytest.mark.parametrize("native_steps", NATIVE)
def test_prefill_forward_equals_stepping(mode, speculate, native_steps, monkeypatch):
    """Reading prompts with one full forward leaves the caches as byte-by-byte stepping does:
    same greedy and sampled outputs, and the following steps' logits equal a full forward. (The
    native steps would step through these short prompts: NATIVE_STEP_PROMPT_WORK 0 keeps the
    forward.)"""
    monkeypatch.setattr(generate, "NATIVE_STEP_PROMPT_WORK", 0)
    model = make_model(seed=12, window=8, **MODES[mode])
    prompts = [[*encode("a prompt, longer than the window"), EOS_ID, *encode("and a 2nd doc")],
               "and a second, shorter prompt"]
    fast = Generator(model, prefill=True, speculate=speculate, native=native_steps)
    slow = Generator(model, prefill=False, native=native_steps)
    for kw in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
        assert fast.generate_ids(prompts, 16, stop_at_eos=False, **kw) == slow.generate_ids(
            prompts, 16, stop_at_eos=False, **kw)
    seq = prompts[0] + fast.generate_ids(prompts[:1], 12, stop_at_eos=False)[0]
    x = torch.tensor([seq])
    full = model(x)[0]
    n0 = len(prompts[0])
    fast._init_state(1, len(seq), [0])
    fast._prefill(x[:, :n0])
    assert (fast.logits[0] - full[n0 - 1]).abs().max().item() < 1e-5
    for n in range(n0, len(seq)):
        logits, _ = fast.step(x[:, n])
        assert (logits[0] - full[n]).abs().max().item() < 1e-5


@pytest.mark.parametrize("head_dim", [2, 8, 64, 128])
def test_rope_matrix_equals_apply_rope(head_dim):
    """The step's RoPE as `x @ R` equals the elementwise rotation (fp32, within 1e-6: products
    summed in another order)."""
    from bltkit.generate import _rope_matrix
    from bltkit.model.layers import apply_rope, rope_cos_sin

    for pos in (0, 1, 37, 5000):
        cos, sin = rope_cos_sin(torch.tensor([[pos]]), head_dim, 500000.0)
        x = torch.randn(3, 1, 5, head_dim, generator=torch.Generator().manual_seed(pos))
        torch.testing.assert_close(x @ _rope_matrix(cos, sin), apply_rope(x, cos, sin), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("prefill", "speculate"), [(True, False), (False, False), (False, True)])
def test_global_cache_buckets_read_only_the_patches_so_far(prefill, speculate):
    """The patch step attends the first L global-cache slots, L a host-side bound on every row's
    p + 1 rounded to `global_bucket`: with buckets of 2 slots the step shapes change as patches
    accumulate, and the output still equals the reference (and the whole-capacity reads)."""
    model = make_model(seed=9)
    prompts = [b"a prompt with several patches in it", b"short", b""]
    gen = Generator(model, prefill=prefill, speculate=speculate, native=False)  # the PyTorch patch step's L
    gen.global_bucket = 2
    seen = []
    real_patch = gen._run_patch
    gen._fns = {**gen._fns, "patch": lambda L=None: (seen.append(L), real_patch(L))}
    out = gen.generate_ids(prompts, 24, stop_at_eos=False)
    assert out == reference_generate(model, prompts, 24, stop_at_eos=False)
    assert len(set(seen)) > 3  # several shapes, growing
    assert seen == sorted(seen)
    assert max(seen) <= gen.p_cap + 1
    assert int(gen.p.max()) <= seen[-1]  # p grew by at most one after the last patch step


@pytest.mark.slow  # ~30 s on 2 cores with a cold compile cache, nearly all of it compiling
def test_compiled_generator_equals_reference():
    """Generator(compile=True) (`blt generate --compile`): the step functions under torch.compile
    give the reference's bytes, greedy and sampled, and a second call with prompts of other
    lengths (caches sized by powers of two: the same shapes) too."""
    model = make_model(seed=4, window=8)
    gen = Generator(model, compile=True)
    for prompts, kw in ((random_prompts(seed=5, n=2), {}),
                        ([b"a different prompt", b""], {"temperature": 1.0, "top_k": 50, "seed": 3})):
        assert gen.generate_ids(prompts, 12, stop_at_eos=False, **kw) == \
            reference_generate(model, prompts, 12, stop_at_eos=False, **kw)
        assert gen.capacity == 256


def test_oversized_caches_change_nothing():
    """Caches larger than the text (what compiled generators use, sized by powers of two) give
    the same bytes: capacity is only buffer room."""
    model = make_model(seed=10, window=8)
    prompts = [b"room to spare", b"x"]
    gen = Generator(model)
    gen.compiled = True  # the sizing rule only; the steps themselves stay eager here
    out = gen.generate_ids(prompts, 20, stop_at_eos=False)
    assert gen.capacity == 256
    assert out == reference_generate(model, prompts, 20, stop_at_eos=False)


def test_kernels_default_only_where_they_can_run(monkeypatch):
    """Generator() picks bltkit.kernels by itself only for a CUDA model whose stacks they take;
    Triton's CPU interpreter (tests) runs them only when asked."""
    from types import SimpleNamespace

    from bltkit import kernels
    from bltkit.generate import _kernels_refusal

    model = make_model()
    monkeypatch.setattr(kernels, "available", lambda device: True)
    assert Generator(model).kernels is False
    cuda = torch.device("cuda")
    assert _kernels_refusal(cuda, True, [SimpleNamespace(head_dim=64), SimpleNamespace(head_dim=128)]) is None
    assert "head dims" in _kernels_refusal(cuda, True, [SimpleNamespace(head_dim=64), SimpleNamespace(head_dim=96)])
    assert "fuse=True" in _kernels_refusal(cuda, False, [SimpleNamespace(head_dim=64)])
    monkeypatch.setattr(kernels, "available", lambda device: False)
    assert "triton" in _kernels_refusal(cuda, True, [SimpleNamespace(head_dim=64)])


def test_speculative_decoding_repeats_only_after_a_patch_step():
    """Speculating, the decoder runs once a byte before the boundary is known and once more only
    when a patch closes; from PATCH_EVERY_BYTE_ROWS rows on the generator does not speculate."""
    from bltkit.generate import PATCH_EVERY_BYTE_ROWS

    model = make_model(seed=12)
    prompts = random_prompts(seed=5, n=3)
    gen = Generator(model, speculate=True)
    calls = {"decode": 0, "patch": 0}
    for name in calls:
        real = gen._fns[name]
        gen._fns[name] = lambda *a, name=name, real=real: (calls.__setitem__(name, calls[name] + 1), real(*a))
    gen._fns["speculative"] = lambda real=gen._fns["speculative"]: (calls.__setitem__("decode", calls["decode"] + 1),
                                                                      real())
    out = gen.generate_ids(prompts, 24, stop_at_eos=False)
    assert gen.speculating
    assert out == reference_generate(model, prompts, 24, stop_at_eos=False)
    assert calls["patch"] > 0
    assert calls["decode"] == gen.stats["steps"] + calls["patch"]
    wide = Generator(model, speculate=True)
    rows = random_prompts(seed=6, n=PATCH_EVERY_BYTE_ROWS)
    assert wide.generate_ids(rows, 8, stop_at_eos=False) == reference_generate(model, rows, 8, stop_at_eos=False)
    assert not wide.speculating


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the second stream, the graphs)")
@pytest.mark.parametrize("kernels", [False, None])
def test_speculation_on_cuda_equals_plain_steps(kernels):
    """On a GPU the speculative step forks the entropy model onto a second stream inside the CUDA
    graph: its logits and bytes equal the plain steps' exactly (the same kernels on the same
    inputs), greedy and sampled, batch 1 and 3, with the Triton kernels (None: where they run)
    and without."""
    model = make_model(seed=13).cuda()
    for prompts in (random_prompts(seed=7, n=1), random_prompts(seed=8, n=3)):
        for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
            plain = Generator(model, kernels=kernels, speculate=False)
            spec = Generator(model, kernels=kernels, speculate=True)
            want = plain.generate_ids(prompts, 40, stop_at_eos=False, **kw)
            assert spec.generate_ids(prompts, 40, stop_at_eos=False, **kw) == want
            assert spec.speculating
            assert spec._side is not None
            # one graph a launch: the last byte's advance and feed run with the next byte's front
            assert set(spec.graphs) == {("speculative", "flag"), ("advance", "feed", "speculative", "flag"),
                                        ("patch", "decode"), ("advance", "feed")}
            torch.testing.assert_close(spec.logits, plain.logits, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the second stream, the graphs)")
@pytest.mark.parametrize("kernels", [False, None])
def test_overlap_on_cuda_equals_plain_steps(kernels):
    """On a GPU, batches of PATCH_EVERY_BYTE_ROWS rows or more run the global step beside the
    entropy model (a second stream, forked and joined inside one CUDA graph): logits and bytes
    equal the sequential steps' exactly, greedy and sampled, with the Triton kernels (None: where
    they run) and without; greedy, the reference's bytes."""
    model = make_model(seed=13).cuda()
    prompts = random_prompts(seed=8, n=PATCH_EVERY_BYTE_ROWS + 1)
    for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        plain = Generator(model, kernels=kernels, overlap=False)
        ovl = Generator(model, kernels=kernels)
        want = plain.generate_ids(prompts, 40, stop_at_eos=False, **kw)
        if not kw:
            assert want == reference_generate(model, prompts, 40, stop_at_eos=False)
        assert ovl.generate_ids(prompts, 40, stop_at_eos=False, **kw) == want
        assert ovl.overlapping
        assert not plain.overlapping
        assert ovl._side is not None
        assert set(ovl.graphs) == ({"byte"} if ovl.byte_graph else {("front_patch", "back", "feed")})
        torch.testing.assert_close(ovl.logits, plain.logits, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the second stream, the graphs)")
def test_entropy_model_on_fewer_sms_equals_plain_steps(monkeypatch):
    """generate.ENTROPY_SMS: the overlapping steps with the entropy model's stream in a CUDA green
    context of 16 SMs (inside the captured graph: a fork into another context and a join) give the
    sequential steps' bytes and logits exactly, greedy and sampled."""
    model = make_model(seed=13).cuda()
    prompts = random_prompts(seed=8, n=PATCH_EVERY_BYTE_ROWS + 1)
    monkeypatch.setattr(generate, "ENTROPY_SMS", 16)
    ovl = Generator(model, kernels=None)
    try:  # the state (and its streams) is made by the first call
        ovl.generate_ids(prompts, 1, stop_at_eos=False)
    except RuntimeError as e:
        if "ENTROPY_SMS" not in str(e):
            raise
        pytest.skip(f"no green context here: {e}")
    assert ovl._green is not None
    for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        plain = Generator(model, kernels=None, overlap=False)
        want = plain.generate_ids(prompts, 40, stop_at_eos=False, **kw)
        assert plain._green is None  # not overlapping: the entropy model on the chain's stream
        assert ovl.generate_ids(prompts, 40, stop_at_eos=False, **kw) == want
        torch.testing.assert_close(ovl.logits, plain.logits, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_entropy_sms_without_green_contexts_says_what_to_do(monkeypatch):
    """Where no green context can be made, ENTROPY_SMS's stream fails with what to set instead,
    and on a CPU the switch is not read at all (no second stream)."""
    with pytest.raises(RuntimeError, match="ENTROPY_SMS = None"):
        generate._green_stream(torch.device("cuda"), 16)
    model = make_model(seed=13)
    prompts = random_prompts(seed=8, n=PATCH_EVERY_BYTE_ROWS + 1)
    want = Generator(model).generate_ids(prompts, 8, stop_at_eos=False)
    monkeypatch.setattr(generate, "ENTROPY_SMS", 16)
    gen = Generator(model)
    assert gen.generate_ids(prompts, 8, stop_at_eos=False) == want
    assert gen._green is None
    assert gen._side is None


@pytest.mark.skipif(not torch.cuda.is_available() or not _conditional_nodes(),
                    reason="needs a CUDA device whose graphs hold conditional nodes")
@pytest.mark.parametrize("kernels", [False, None])
def test_byte_graph_on_cuda_equals_step_graphs(kernels):
    """A byte's steps captured as one CUDA graph, the patch step in a conditional node, give the
    logits and bytes of one graph per launch exactly (the same kernels on the same
    inputs): greedy and sampled; batch 1 and 3 (the branch; speculating and not), 9 (no branch,
    overlapping); entropy and space patching. And the steps then run without a host sync: under
    torch.cuda's sync debug mode "error" a host sync raises (the per-launch graphs' check for a
    closed patch, `bool(any_close)`, is one)."""
    for patcher in ({}, {"mode": "space", "max_patch_length": 4}):
        model = make_model(seed=13, **patcher).cuda()
        for n, spec in ((1, True), (3, False), (PATCH_EVERY_BYTE_ROWS + 1, None)):
            prompts = random_prompts(seed=8 + n, n=n)
            for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
                steps = Generator(model, kernels=kernels, speculate=spec, byte_graph=False)
                one = Generator(model, kernels=kernels, speculate=spec, byte_graph=True)
                want = steps.generate_ids(prompts, 40, stop_at_eos=False, **kw)
                assert one.generate_ids(prompts, 40, stop_at_eos=False, **kw) == want
                assert set(one.graphs) == {"byte"}
                assert "byte" not in steps.graphs
                torch.testing.assert_close(one.logits, steps.logits, rtol=0, atol=0)
        # no host sync between bytes (the buckets' graphs captured first: capturing syncs)
        gen = Generator(model, kernels=kernels, byte_graph=True)
        prompts = [b"abc def, ghi jk"]
        gen.generate_ids(prompts, 4, stop_at_eos=False)
        gen._init_state(1, 64, [0])
        gen._prefill(torch.tensor([encode(prompts[0])], device="cuda"))
        gen._prepare_graphs()
        gen._byte_graph(gen._global_slots())
        torch.cuda.synchronize()
        closes = torch.zeros(30, dtype=torch.long, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(30):
                gen.step(gen.next)
                closes[i] = gen.close.long().sum()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert 0 < int(closes.sum()) < 30  # the branch was taken, and skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the graphs)")
def test_graph_capture_survives_garbage_holding_cuda_graphs():
    """An unreachable Generator (a reference cycle: its step functions are its bound methods)
    keeps its CUDA graphs until the garbage collector frees them, which freeing inside another
    capture is not allowed to do. Here the last reference to such a Generator goes away during a
    capture and the collector is set to run at every allocation: the capture still succeeds (the
    collector is off while capturing) and the bytes are the reference's."""
    import gc

    model = make_model(seed=13).cuda()
    prompts = random_prompts(seed=7, n=1)
    dead = [Generator(model)]
    dead[0].generate_ids(prompts, 4, stop_at_eos=False)
    assert dead[0].graphs is not None
    gen = Generator(model)
    patch = gen._fns["patch"]

    def drop_then_patch(L=None):
        if torch.cuda.is_current_stream_capturing():
            dead.clear()  # unreachable now, mid-capture
            for _ in range(100):
                [object()]  # allocations: chances for the collector
        patch(L)

    gen._fns["patch"] = drop_then_patch
    threshold = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        out = gen.generate_ids(prompts, 24, stop_at_eos=False)
    finally:
        gc.set_threshold(*threshold)
    assert out == reference_generate(model, prompts, 24, stop_at_eos=False)


def test_kernels_refuse_weights_they_would_misread():
    """The Triton kernels read a weight [out, in] as contiguous rows. A column-major copy (the
    CPU's fused layout) is refused with an error that says so, before any kernel runs (triton
    need not be installed): the fifteenth session's column-major copies were read wrong, silently,
    under Triton's interpreter until the seventeenth."""
    from bltkit import kernels

    col = torch.randn(8, 4).t().contiguous().t()
    x, g = torch.randn(1, 4), torch.ones(4)
    for call in (lambda: kernels.norm_swiglu(x, g, 1e-5, col), lambda: kernels.linear_add(torch.randn(1, 8), x, col),
                 lambda: kernels.norm_cross_attend(x, g, 1e-5, col, torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))):
        with pytest.raises(ValueError, match=r"contiguous rows \[out, in\]"):
            call()


def test_fused_bytes_is_what_the_fused_copies_take():
    """The default decides on the global stack's fused copies by this count (against free memory)."""
    from bltkit.generate import _fits, _Fused, _fused_bytes

    layers = make_model().global_transformer.layers
    fused = _Fused(layers)
    assert _fused_bytes(layers) == sum(t.numel() * t.element_size() for t in [*fused.qkv.values(), *fused.w13.values()])
    # on a CPU column-major (contiguous along the outputs: faster one-row products from memory)
    assert all(w.stride() == (1, w.shape[0]) for w in [*fused.qkv.values(), *fused.w13.values()])
    assert all(torch.equal(fused.qkv[id(b)], torch.cat([b.attention.wq.weight, b.attention.wk.weight,
                                                        b.attention.wv.weight])) for b in layers)
    assert _fits(10**15, torch.device("cpu"))  # host memory is not checked


def test_graph_buckets_cover_every_step_they_are_made_for():
    """CUDA graphs are captured for the global-cache buckets the next steps can reach
    (`_buckets`): every step's slot count is among them, and buckets no step reaches are left out."""
    gen = Generator(make_model(seed=3))
    gen._init_state(1, 3000, [0])
    gen.global_bucket = 256
    for g_used, steps in ((1, 10), (1, 300), (255, 1), (256, 1), (460, 128), (2900, 200), (10, 3000)):
        gen.g_used = g_used
        buckets = gen._buckets(steps)
        reached = set()
        for i in range(steps):
            gen.g_used = g_used + i
            reached.add(gen._global_slots())
        assert reached <= set(buckets)
        assert len(buckets) <= len(reached) + 1  # at most the bucket of the step after the last
    gen.g_used = 1
    assert gen._buckets()[-1] == gen.p_cap + 1  # None: every bucket up to capacity
