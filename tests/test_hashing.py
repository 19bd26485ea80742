"""Hash n-gram ids (spec §5): the golden vectors of §5.3, the int64 wrap, history for incremental
decoding, the fused-table offsets, and agreement with transformers' hash function."""

from __future__ import annotations

import pytest
import torch

from bltkit.model import hashing
from bltkit.model.hashing import PRIMES, hash_ids, prime_powers

HELLO = [1, 76, 105, 112, 112, 115]  # BOS + "Hello"
EURO = [1, 199, 173, 230, 134, 176]  # BOS + UTF-8 of "é€"
P0, P1 = 1000000007, 5915587277
VH = 500002

# spec §5.3, p = 1000000007, V_h = 500002, ids at t = 0..5
HELLO_VECTORS = {
    3: [443987, 124875, 393970, 386145, 358223, 190185],
    4: [437197, 433869, 117936, 254402, 246577, 30240],
    5: [123201, 168913, 27892, 170862, 307328, 265602],
    6: [166353, 160907, 92310, 405250, 48218, 280239],
    7: [34117, 338221, 15158, 281878, 94816, 340137],
    8: [172383, 205585, 456240, 129346, 299568, 322649],
}


def all_hash_ids(*args, **kwargs) -> list[torch.Tensor]:
    """`hashing.all_hash_ids` as one [B, T] tensor per table, whether it returns a list of
    tables or one [B, T, n_tables] tensor (the fused layout is being changed concurrently)."""
    out = hashing.all_hash_ids(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        assert out.dim() == 3
        return list(out.unbind(-1))
    return list(out)


def _ids(tokens, g, prime, vocab=VH):
    return hash_ids(torch.tensor([tokens]), g, prime, vocab)[0].tolist()


def test_primes_table():
    assert PRIMES == (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
                      9576890767, 3628273133, 2860486313, 5463458053, 3367900313)


@pytest.mark.parametrize("g", sorted(HELLO_VECTORS))
def test_hello_vectors(g):
    assert _ids(HELLO, g, P0) == HELLO_VECTORS[g]


def test_second_prime_vector():
    assert _ids(HELLO, 3, P1) == [45033, 214129, 1694, 65329, 10661, 145767]


def test_non_ascii_vectors():
    assert _ids(EURO, 3, P0) == [443987, 410542, 383321, 83986, 251291, 71546]
    assert _ids(EURO, 8, P0) == [172383, 198466, 427511, 462979, 469745, 371131]


def _unbounded(tokens, g, prime, vocab):
    """Exact-integer hash without the 64-bit wrap (the wrong recipe of spec §5.3's sanity check)."""
    padded = [0] * (g - 1) + list(tokens)
    return [sum(padded[t + i] * prime**i for i in range(g)) % vocab for t in range(len(tokens))]


def _reference(tokens, g, prime, vocab):
    """Spec §5.1 literally: exact integer, reduced mod 2^64, read as signed, floor-mod V_h."""
    out = []
    padded = [0] * (g - 1) + list(tokens)
    for t in range(len(tokens)):
        h = sum(padded[t + i] * prime**i for i in range(g)) % (1 << 64)
        if h >= 1 << 63:
            h -= 1 << 64
        out.append(h % vocab)  # Python's % is floor-mod
    return out


def test_wraparound_sanity_check():
    assert _unbounded(HELLO, 3, P0, VH)[1] == 238885  # what a missing wrap gives (spec §5.3)
    assert _ids(HELLO, 3, P0)[1] == 124875
    assert _reference(HELLO, 3, P0, VH) == HELLO_VECTORS[3]


def test_matches_reference_on_random_ids():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (3, 40), generator=gen)
    for prime in PRIMES:
        for g in (1, 3, 8):
            got = hash_ids(tokens, g, prime, 101)
            for b in range(3):
                assert got[b].tolist() == _reference(tokens[b].tolist(), g, prime, 101)


def test_floor_modulo_range():
    # large ids make many negative int64 hashes; floor-mod must still land in [0, V)
    tokens = torch.full((1, 64), 259)
    for prime in PRIMES:
        ids = hash_ids(tokens, 8, prime, 500002)
        assert int(ids.min()) >= 0
        assert int(ids.max()) < 500002


def test_prime_powers_wrap():
    pw = prime_powers(P1, 8)
    assert pw[0] == 1
    assert pw[1] == P1
    assert all(-(1 << 63) <= p < (1 << 63) for p in pw)
    assert pw[7] == ((P1**7) % (1 << 64)) - ((1 << 64) if (P1**7) % (1 << 64) >= 1 << 63 else 0)


def test_rows_are_independent_and_left_padded_with_boe():
    # each row is left-padded with BOE (0) on its own: a row's ids do not depend on other rows
    a = torch.tensor([HELLO])
    b = torch.tensor([EURO])
    both = hash_ids(torch.cat([a, b]), 5, P0, VH)
    assert torch.equal(both[0], hash_ids(a, 5, P0, VH)[0])
    assert torch.equal(both[1], hash_ids(b, 5, P0, VH)[0])


@pytest.mark.parametrize("prime", [P0, P1])
@pytest.mark.parametrize("g", [3, 4, 5, 6, 7, 8])
def test_history_equals_full_sequence(g, prime):
    """Hashing the last token with a 7-id history equals the last column of the full pass."""
    gen = torch.Generator().manual_seed(g)
    tokens = torch.randint(0, 260, (2, 30), generator=gen)
    full = hash_ids(tokens, g, prime, VH)
    for n_new in (1, 3):
        hist = tokens[:, -n_new - 7:-n_new]
        step = hash_ids(tokens[:, -n_new:], g, prime, VH, history_BH=hist)
        assert torch.equal(step, full[:, -n_new:])


def test_history_of_zeros_equals_boe_padding():
    tokens = torch.tensor([HELLO])
    for g in (3, 8):
        assert torch.equal(hash_ids(tokens, g, P0, VH, history_BH=torch.zeros(1, 7, dtype=torch.long)),
                           hash_ids(tokens, g, P0, VH))


def test_all_hash_ids_history_matches_full():
    tokens = torch.tensor([HELLO + EURO[1:]])
    full = all_hash_ids(tokens, [3, 4, 5, 6, 7, 8], 2, 101)
    step = all_hash_ids(tokens[:, -1:], [3, 4, 5, 6, 7, 8], 2, 101, history_BH=tokens[:, -8:-1])
    for a, b in zip(full, step, strict=True):
        assert torch.equal(a[:, -1:], b)


def test_fused_table_offsets():
    """Table n = f·|G| + gi (function-major) at rows n·V_h .. (n+1)·V_h - 1 (spec §5.2)."""
    sizes, vocab = [3, 4, 5, 6, 7, 8], 101
    tokens = torch.tensor([HELLO, EURO])
    out = all_hash_ids(tokens, sizes, 2, vocab)
    assert len(out) == 12
    for f in range(2):
        for gi, g in enumerate(sizes):
            n = f * len(sizes) + gi
            ids = out[n]
            assert torch.equal(ids, hash_ids(tokens, g, PRIMES[f], vocab) + n * vocab)
            assert int(ids.min()) >= n * vocab
            assert int(ids.max()) < (n + 1) * vocab


def test_prime_cycling_past_eleven_functions():
    tokens = torch.tensor([HELLO])
    out = all_hash_ids(tokens, [3], 12, 101)
    # function 11 reuses PRIMES[0] (f mod 11), in its own table
    assert torch.equal(out[11] - 11 * 101, out[0])


def test_released_config_first_table_is_the_hello_vector():
    out = all_hash_ids(torch.tensor([HELLO]), [3, 4, 5, 6, 7, 8], 1, VH)
    for gi, g in enumerate([3, 4, 5, 6, 7, 8]):
        assert (out[gi][0] - gi * VH).tolist() == HELLO_VECTORS[g]


@pytest.mark.hf
@pytest.mark.parametrize("prime", PRIMES)
def test_matches_transformers_hash(prime):
    modeling = pytest.importorskip("transformers.models.blt.modeling_blt")
    gen = torch.Generator().manual_seed(prime % 1000)
    tokens = torch.randint(0, 260, (3, 50), generator=gen)
    for g in (1, 2, 3, 4, 5, 6, 7, 8):
        for vocab in (101, 500002):
            theirs = modeling.byte_group_hash_function(tokens, g, prime, vocab)
            assert torch.equal(hash_ids(tokens, g, prime, vocab), theirs)
