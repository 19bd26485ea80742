"""Patching (spec §4): property tests on `bltkit.model.patching` and on the model's patcher
composition (mode rule | document starts, then max_patch_length), plus the spec's hand-worked
examples. Starts are boolean [B, T+1] (next-token convention, spec §4.6)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bltkit.bytes import BOS_ID, EOS_ID, encode
from bltkit.config import PatcherConfig
from bltkit.model import BLT
from bltkit.model import patching as P
from bltkit.presets import tiny

THETA = 1.335442066192627

# ------------------------------------------------------------------------------------------
# helpers and strategies

# Bytes drawn by hypothesis index these alphabets (st.binary is far cheaper to generate and shrink
# than lists of one_of strategies); the first entries are what examples shrink towards.
TOKEN_ALPHABET = (
    [ord(c) + 4 for c in "abcXYZ019"]  # word bytes
    + [b + 4 for b in b" ,.!?-:;()[]{}'\"\n@`~\x7f"]  # space-like bytes
    + [0xC3 + 4, 0xA9 + 4, 0xE2 + 4, 0x80 + 4, 0xFF + 4]  # UTF-8 lead/continuation bytes, 0xFF
    + [0, 1, 2, 3]  # BOE, BOS, EOS, BPE delimiter inside the row
    + list(range(4, 260, 7))  # a spread of other bytes
)
# a grid over 0-2.5 nats plus θ itself (the threshold is strict) and values near it
ENTROPY_VALUES = [round(0.05 * i, 2) for i in range(51)] + [THETA, THETA + 1e-3, THETA - 1e-3, 0.3]


def _row(draw, n: int, table: list) -> list:
    return [table[b % len(table)] for b in draw(st.binary(min_size=n, max_size=n))]


@st.composite
def batches(draw, max_b: int = 3, max_t: int = 40):
    """(tokens [B,T] with BOS first, entropies [B,T] fp32)."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    tokens = [[BOS_ID, *_row(draw, T - 1, TOKEN_ALPHABET)] for _ in range(B)]
    ents = [_row(draw, T, ENTROPY_VALUES) for _ in range(B)]
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(ents, dtype=torch.float32)


@st.composite
def random_starts(draw, max_l: int = 40):
    """Boolean starts [B, L] with positions 0 and 1 set (what every patcher produces)."""
    B = draw(st.integers(1, 3))
    L = draw(st.integers(2, max_l))
    return torch.tensor([[True, True, *_row(draw, L - 2, [False, True])] for _ in range(B)])


def strip(row: torch.Tensor) -> list[int]:
    return [int(v) for v in row if int(v) != 0]


def meta_split(lengths: list[int], m: int) -> list[int]:
    """Spec §4.7: each l > m becomes floor(l/m) pieces of m, then the remainder if non-zero."""
    out: list[int] = []
    for l in lengths:
        if l > m:
            out += [m] * (l // m) + ([l % m] if l % m else [])
        else:
            out.append(l)
    return out


PATCHERS = {
    "entropy": PatcherConfig(mode="entropy"),
    "entropy-monotonic": PatcherConfig(mode="entropy", monotonicity=True, threshold=0.3),
    "entropy-add": PatcherConfig(mode="entropy", threshold_add=0.1),
    "space": PatcherConfig(mode="space"),
    "static": PatcherConfig(mode="static", patch_size=3),
    "byte": PatcherConfig(mode="byte"),
}
PATCHERS.update({f"{k}+max3": dataclasses.replace(v, max_patch_length=3) for k, v in list(PATCHERS.items())})
PATCHERS["entropy-no-doc-boundaries"] = PatcherConfig(mode="entropy", doc_boundaries=False)

# these properties run once per patcher (x13): half the profile's examples each (20 by default)
PER_PATCHER = settings(max_examples=max(10, settings.default.max_examples // 2))

_MODELS: dict[str, BLT] = {}


def meta_blt(name: str) -> BLT:
    """A tiny BLT on the meta device with patcher PATCHERS[name]: `patch_starts` with given
    entropies touches no weight, so this exercises the model's own patcher composition."""
    if name not in _MODELS:
        with torch.device("meta"):
            _MODELS[name] = BLT(dataclasses.replace(tiny(), patcher=PATCHERS[name]))
    return _MODELS[name]


def model_starts(name: str, tokens: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return meta_blt(name).patch_starts(tokens, H)


# ------------------------------------------------------------------------------------------
# invariants of lengths


@pytest.mark.parametrize("name", sorted(PATCHERS))
@PER_PATCHER
@given(batch=batches())
def test_lengths_invariants(name, batch):
    tokens, H = batch
    B, T = tokens.shape
    starts = model_starts(name, tokens, H)
    assert starts.shape == (B, T + 1)
    assert starts.dtype == torch.bool
    assert starts[:, 0].all()  # positions 0 and 1 always start
    assert starts[:, 1].all()
    lengths = P.starts_to_lengths(starts)
    assert (lengths.sum(1) == T + 1).all()  # T+1 convention
    assert (lengths[:, 0] == 1).all()  # the BOS alone
    assert (lengths >= 0).all()
    nonzero = lengths > 0
    assert not (nonzero[:, 1:] & ~nonzero[:, :-1]).any()  # no non-zero after a zero
    assert nonzero[:, -1].any()  # no all-zero column at the end
    assert torch.equal(P.lengths_to_starts(lengths, T + 1), starts)  # starts <-> lengths
    assert torch.equal(P.normalize_lengths(lengths, T), lengths)  # already normalised
    if PATCHERS[name].max_patch_length is not None:
        assert int(lengths.max()) <= PATCHERS[name].max_patch_length


@given(starts=random_starts())
def test_starts_lengths_round_trip(starts):
    L = starts.shape[1]
    lengths = P.starts_to_lengths(starts)
    assert (lengths.sum(1) == L).all()
    assert torch.equal(P.lengths_to_starts(lengths, L), starts)
    for b in range(starts.shape[0]):
        pos = starts[b].nonzero().flatten().tolist()
        assert strip(lengths[b]) == [e - s for s, e in zip(pos, [*pos[1:], L], strict=True)]


@given(starts=random_starts(), m=st.integers(1, 6))
def test_limit_patch_length_is_metas_split_rule(starts, m):
    """Spec §4.7 applied on the T+1 lengths, row by row; re-padded with zeros."""
    limited = P.limit_patch_length(starts, m)
    assert (limited | starts).eq(limited).all()  # only adds starts
    lengths = P.starts_to_lengths(starts)
    got = P.starts_to_lengths(limited)
    assert int(got.max()) <= m
    for b in range(starts.shape[0]):
        assert strip(got[b]) == meta_split(strip(lengths[b]), m)


def test_limit_patch_length_hand_example():
    # one patch of 10 after the BOS, m = 4 -> 4, 4, 2 (spec §4.7)
    starts = P.lengths_to_starts(torch.tensor([[1, 10]]), 11)
    assert P.starts_to_lengths(P.limit_patch_length(starts, 4)).tolist() == [[1, 4, 4, 2]]
    # a multiple of m closes: [1, 8] -> [1, 4, 4]; the online rule "closes after its m-th byte"
    starts = P.lengths_to_starts(torch.tensor([[1, 8]]), 9)
    assert P.starts_to_lengths(P.limit_patch_length(starts, 4)).tolist() == [[1, 4, 4]]


# ------------------------------------------------------------------------------------------
# batch independence and incrementality


@pytest.mark.parametrize("name", sorted(PATCHERS))
@PER_PATCHER
@given(batch=batches(max_b=4))
def test_batch_independence(name, batch):
    """A row patched inside a batch equals the row patched alone (spec §16.13)."""
    tokens, H = batch
    starts = model_starts(name, tokens, H)
    lengths = P.starts_to_lengths(starts)
    for b in range(tokens.shape[0]):
        alone = model_starts(name, tokens[b:b + 1], H[b:b + 1])
        assert torch.equal(starts[b:b + 1], alone)
        assert strip(lengths[b]) == strip(P.starts_to_lengths(alone)[0])


@pytest.mark.parametrize("name", sorted(PATCHERS))
@PER_PATCHER
@given(batch=batches(max_b=2, max_t=30))
def test_incremental(name, batch):
    """Patching x[:i] (T+1 convention) equals the full patching's starts at positions <= i.

    Entropies of a prefix are the prefix of the entropies (causal entropy model), so the prefix
    is patched with H[:, :i]. Top-k would fail this; it is not offered (test_config)."""
    tokens, H = batch
    T = tokens.shape[1]
    full = model_starts(name, tokens, H)
    for i in range(1, T + 1):
        assert torch.equal(model_starts(name, tokens[:, :i], H[:, :i]), full[:, :i + 1]), f"prefix {i}"


def test_topk_is_not_offered():
    """The documented exception to incrementality: top-k entropy patching (spec §4.3) depends on
    the whole sequence, so bltkit does not offer it and says why."""
    with pytest.raises(ValueError, match="not incremental"):
        PatcherConfig(mode="topk")
    assert not any("topk" in name or "top_k" in name for name in dir(P))


@given(batch=batches())
def test_entropy_starts_rule_global(batch):
    """t >= 2 starts iff H[t-1] > θ (strict), H[0] never used (spec §4.2)."""
    _, H = batch
    starts = P.entropy_starts(H, THETA)
    B, T = H.shape
    for b in range(B):
        for t in range(2, T + 1):
            assert bool(starts[b, t]) == bool(H[b, t - 1] > THETA)


@given(batch=batches())
def test_entropy_starts_rule_monotonic(batch):
    """monotonicity: 2 always starts; t >= 3 iff H[t-1] - H[t-2] > θ (spec §4.3)."""
    _, H = batch
    theta = 0.3
    starts = P.entropy_starts(H, theta, monotonicity=True)
    B, T = H.shape
    for b in range(B):
        if T >= 2:
            assert bool(starts[b, 2])
        for t in range(3, T + 1):
            assert bool(starts[b, t]) == bool(H[b, t - 1] - H[b, t - 2] > theta), f"t={t}"


@given(batch=batches())
def test_entropy_starts_rule_threshold_add(batch):
    """threshold_add a: 0,1,2 start, 3 never, t >= 4 iff H[t-1] > θ and H[t-1]-H[t-2] > a."""
    _, H = batch
    a = 0.1
    starts = P.entropy_starts(H, THETA, threshold_add=a)
    B, T = H.shape
    for b in range(B):
        if T >= 2:
            assert bool(starts[b, 2])
        if T >= 3:
            assert not bool(starts[b, 3])
        for t in range(4, T + 1):
            want = bool(H[b, t - 1] > THETA) and bool(H[b, t - 1] - H[b, t - 2] > a)
            assert bool(starts[b, t]) == want, f"t={t}"


# ------------------------------------------------------------------------------------------
# hand-worked examples


def _lengths_from_entropies(H: list[float], **kw) -> list[int]:
    return P.starts_to_lengths(P.entropy_starts(torch.tensor([H]), THETA, **kw))[0].tolist()


def test_spec_4_6_example():
    """N = 6, starts {0,1,4}: [Meta] [1,3,3] if H[5] <= θ, [1,3,2,1] if H[5] > θ."""
    hi, lo = 2.0, 0.5
    # H[0] is never used: make it high to show it
    assert _lengths_from_entropies([hi, lo, lo, hi, lo, lo]) == [1, 3, 3]
    assert _lengths_from_entropies([hi, lo, lo, hi, lo, hi]) == [1, 3, 2, 1]
    # the HF forms of the same patchings normalise to the Meta forms
    assert P.normalize_lengths(torch.tensor([[1, 3, 2]]), 6).tolist() == [[1, 3, 3]]
    assert P.normalize_lengths(torch.tensor([[1, 3, 2, 0]]), 6).tolist() == [[1, 3, 2, 1]]


def test_entropy_threshold_is_strict():
    assert _lengths_from_entropies([0.0, THETA, 0.0]) == [1, 3]  # H[1] == θ does not start 2
    assert _lengths_from_entropies([0.0, THETA + 1e-3, 0.0]) == [1, 1, 2]


def test_spec_4_3_monotonic_quirk_position_2_always_starts():
    # H[1] - H[0] is very negative, yet position 2 starts; 3 starts iff H[2]-H[1] > θ
    H = [3.0, 0.0, 0.0, 2.0, 2.1]
    starts = P.entropy_starts(torch.tensor([H]), 1.0, monotonicity=True)[0].tolist()
    # t=3: H2-H1 = 0 no; t=4: H3-H2 = 2 yes; t=5: H4-H3 = 0.1 no
    assert starts == [True, True, True, False, True, False]


def test_spec_4_3_threshold_add_quirk_position_3_never_starts():
    # H[2] is high and rises steeply, which would start position 3 under the rule; it never does
    H = [0.0, 0.0, 3.0, 3.5, 0.0, 2.0]
    starts = P.entropy_starts(torch.tensor([H]), THETA, threshold_add=0.1)[0].tolist()
    # t=4: H3 = 3.5 > θ and H3-H2 = 0.5 > 0.1 -> yes; t=5: H4 = 0 no; t=6: H5 = 2 > θ, +2 -> yes
    assert starts == [True, True, True, False, True, False, True]


def _space_lengths(text: str | bytes, eos: bool = False) -> list[int]:
    tokens = torch.tensor([encode(text, eos=eos)])
    return P.starts_to_lengths(P.space_starts(tokens))[0].tolist()


def test_space_rule_hand_examples():
    # derived by hand from spec §4.4: a space-like byte ends its patch, unless it directly
    # follows another space-like byte; positions 0 and 1 start; lengths cover T+1.
    # "Hi, you!": BOS H i , _ y o u ! -> ',' ends a patch (start at 4); '_' follows ',' and does
    # not count; '!' ends one (start at 9 = the phantom position).
    assert _space_lengths("Hi, you!") == [1, 3, 5, 1]
    # "a b": BOS a _ b -> '_' ends its patch, start at 3
    assert _space_lengths("a b") == [1, 2, 2]
    # two spaces: only the first counts
    assert _space_lengths("a  b") == [1, 2, 3]
    # digits and letters are not space-like; ':' (0x3A) and '@' (0x40) are
    assert _space_lengths("a1:b@c") == [1, 3, 2, 2]
    # a UTF-8 lead byte (>= 0xC0) is space-like; continuation bytes (0x80-0xBF) are not:
    # "aé" = BOS a C3 A9 -> C3 ends its patch
    assert _space_lengths("aé") == [1, 2, 2]
    # special ids always count, even right after another space-like id: "a" EOS BOS "b"
    tokens = torch.tensor([[BOS_ID, ord("a") + 4, EOS_ID, BOS_ID, ord("b") + 4]])
    assert P.starts_to_lengths(P.space_starts(tokens))[0].tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("byte", [0x2F, 0x3A, 0x40, 0x5B, 0x60, 0x7B, 0x7F, 0xC0, 0xFF])
def test_space_like_byte_ends_patch(byte):
    assert _space_lengths(b"ab" + bytes([byte]) + b"cd") == [1, 3, 3]


@pytest.mark.parametrize("byte", [0x30, 0x39, 0x41, 0x5A, 0x61, 0x7A, 0x80, 0xBF])
def test_word_byte_does_not_end_patch(byte):
    assert _space_lengths(b"ab" + bytes([byte]) + b"cd") == [1, 6]


def test_static_hand_examples():
    # [1] then chunks of `size` over the rest of the T+1 positions (spec §4.4, bltkit's choice)
    assert P.starts_to_lengths(P.static_starts(1, 10, 4))[0].tolist() == [1, 4, 4, 2]
    assert P.starts_to_lengths(P.static_starts(1, 8, 4))[0].tolist() == [1, 4, 4]
    assert P.starts_to_lengths(P.static_starts(2, 3, 1)).tolist() == [[1, 1, 1, 1]] * 2
    assert P.starts_to_lengths(P.static_starts(1, 1, 4))[0].tolist() == [1, 1]


def test_byte_mode():
    assert P.starts_to_lengths(P.byte_starts(2, 5)).tolist() == [[1] * 6] * 2


def test_document_starts_hand_example():
    tokens = torch.tensor([encode("ab", eos=True) + encode("c", eos=True)])  # 1 a b 2 1 c 2
    assert P.document_starts(tokens)[0].nonzero().flatten().tolist() == [1, 4, 5, 7]


# ------------------------------------------------------------------------------------------
# normalize_lengths


@pytest.mark.parametrize(("given", "T", "want"), [
    ([1, 3, 2, 0], 6, [1, 3, 2, 1]),  # HF trailing-zero marker: a patch starts at position T
    ([1, 3, 2], 6, [1, 3, 3]),  # sum T, no marker: position T joins the last patch
    ([1, 3, 3], 6, [1, 3, 3]),  # already T+1
    ([1, 3, 2, 1], 6, [1, 3, 2, 1]),
    ([1, 3, 2, 0, 0], 6, [1, 3, 2, 1, 0]),
    ([1, 3, 3, 0], 6, [1, 3, 3, 0]),  # sum T+1 with padding: unchanged
    ([1, 0], 1, [1, 1]),  # T = 1: HF's patcher form (position 1 always starts)
    ([1, 1], 1, [1, 1]),
    ([1], 1, [1, 1]),  # sum T without marker; position 1 still starts, the first patch stays 1
])
def test_normalize_lengths(given, T, want):
    assert P.normalize_lengths(torch.tensor([given]), T).tolist() == [want]


def test_normalize_lengths_per_row():
    got = P.normalize_lengths(torch.tensor([[1, 3, 2, 0], [1, 5, 0, 0], [1, 2, 2, 2]]), 6)
    assert got.tolist() == [[1, 3, 2, 1], [1, 5, 1, 0], [1, 2, 2, 2]]


def test_normalize_lengths_accepts_1d_and_lists():
    assert P.normalize_lengths([1, 3, 2], 6).tolist() == [[1, 3, 3]]


@pytest.mark.parametrize(("given", "T", "match"), [
    ([2, 3, 2], 6, "first patch must have length 1"),
    ([3, 3, 3], 8, "first patch must have length 1"),
    ([0, 4, 3], 6, "first patch must have length 1"),
    ([1, 3, 1], 6, r"sum to the sequence length 6 or 7.*\[5\]"),
    ([1, 3, 4], 6, "sum to the sequence length 6 or 7"),
    ([1, 4, -1, 2], 6, ">= 0"),
    ([1, 0, 3, 2], 6, "non-empty patch follows an empty one"),
    ([1, 3, 0, 3], 6, "non-empty patch follows an empty one"),
])
def test_normalize_lengths_rejects(given, T, match):
    with pytest.raises(ValueError, match=match):
        P.normalize_lengths(torch.tensor([given]), T)


def test_normalize_lengths_rejects_bad_shapes():
    with pytest.raises(ValueError, match="first patch"):
        P.normalize_lengths(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\[batch, patches\]"):
        P.normalize_lengths(torch.ones(1, 2, 3, dtype=torch.long), 3)


# ------------------------------------------------------------------------------------------
# patch ids


def test_patch_ids_small_example():
    pid, dec = P.patch_ids(torch.tensor([[1, 3, 2, 1]]), 6)
    assert pid.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert dec.tolist() == [[0, 0, 0, 1, 1, 2]]  # the last byte closes patch 2 and reads it
    pid, dec = P.patch_ids(torch.tensor([[1, 3, 3]]), 6)
    assert pid.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert dec.tolist() == [[0, 0, 0, 1, 1, 1]]  # patch 2 is still open at the last byte


def test_patch_ids_skip_zero_length_padding():
    pid, dec = P.patch_ids(torch.tensor([[1, 3, 3, 0], [1, 1, 1, 4]]), 6)
    assert pid.tolist() == [[0, 1, 1, 1, 2, 2], [0, 1, 2, 3, 3, 3]]
    assert dec.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 2, 2, 2, 2]]


@given(starts=random_starts())
def test_patch_ids_match_definition(starts):
    """pid(t) = #{j : s_j <= t} - 1 and d(t) = pid(t+1) - 1 (spec §4.8)."""
    L = starts.shape[1]
    T = L - 1
    pid, dec = P.patch_ids(P.starts_to_lengths(starts), T)
    counts = starts.long().cumsum(1) - 1  # pid at every position 0..T
    assert torch.equal(pid, counts[:, :T])
    assert torch.equal(dec, counts[:, 1:] - 1)


SENTENCE = "Daenerys Targaryen is in Game of Thrones, a fantasy epic by George R.R. Martin."
SPEC_LENGTHS = [1, 1, 1, 1, 1, 15, 3, 3, 1, 1, 3, 12, 1, 1, 1, 1, 1, 5, 5, 1, 2, 1, 19]
SPEC_PATCHES = ("<s> | D | a | e | n | erys_Targaryen_ | is_ | in_ | G | a | me_ | of_Thrones,_ | a | _ | f | a "
                "| n | tasy_ | epic_ | b | y_ | G | eorge_R.R._Martin.</s>")


def test_spec_4_8_worked_example():
    tokens = encode(SENTENCE, bos=True, eos=True)
    N = len(tokens)
    assert N == 81
    assert sum(SPEC_LENGTHS) == N
    # the lengths cut the sentence into the spec's patches
    pieces, pos = [], 0
    for length in SPEC_LENGTHS:
        chunk = tokens[pos:pos + length]
        text = "".join("<s>" if i == BOS_ID else "</s>" if i == EOS_ID else chr(i - 4) for i in chunk)
        pieces.append(text.replace(" ", "_"))
        pos += length
    assert " | ".join(pieces) == SPEC_PATCHES
    lengths = P.normalize_lengths(torch.tensor([SPEC_LENGTHS]), N)
    assert lengths[0, -1] == 20  # with L = N+1 the last length is 20
    starts = P.lengths_to_starts(lengths, N + 1)[0].nonzero().flatten().tolist()
    assert starts[:8] == [0, 1, 2, 3, 4, 5, 20, 23]
    pid, dec = P.patch_ids(lengths, N)
    assert chr(tokens[5] - 4) == "e"
    assert chr(tokens[19] - 4) == " "
    assert pid[0, 5] == 5
    assert dec[0, 5] == 4
    assert pid[0, 19] == 5
    assert dec[0, 19] == 5
    # HF's L = N form gives the same ids (its last patch holds no phantom)
    pid_hf, dec_hf = P.patch_ids(P.normalize_lengths(torch.tensor(SPEC_LENGTHS), N), N)
    assert torch.equal(pid, pid_hf)
    assert torch.equal(dec, dec_hf)
