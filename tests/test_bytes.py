"""Byte codec (spec §2): ids, encode/decode round trips, the streaming UTF-8 decoder, id checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bltkit.bytes import (
    BOE_ID,
    BOS_ID,
    EOS_ID,
    OFFSET,
    VOCAB_SIZE,
    Utf8Stream,
    check_ids,
    decode,
    encode,
    to_bytes,
)

TEXTS = ["", "Hello", "é€ 漢字 🙂", "line\nbreak\ttab\x00nul", "a" * 300]


def test_special_ids():
    assert (BOE_ID, BOS_ID, EOS_ID, OFFSET, VOCAB_SIZE) == (0, 1, 2, 4, 260)


def test_encode_hello_by_hand():
    assert encode("Hello") == [1, 76, 105, 112, 112, 115]
    assert encode("Hello", bos=False) == [76, 105, 112, 112, 115]
    assert encode("Hello", eos=True) == [1, 76, 105, 112, 112, 115, 2]
    assert encode("Hello", bos=False, eos=True) == [76, 105, 112, 112, 115, 2]
    assert encode("") == [1]
    assert encode("", bos=False) == []


def test_encode_non_ascii_by_hand():
    # "é€" is C3 A9 E2 82 AC in UTF-8 (spec §5.3 uses the same ids)
    assert encode("é€") == [1, 199, 173, 230, 134, 176]
    assert encode(b"\xc3\xa9\xe2\x82\xac") == [1, 199, 173, 230, 134, 176]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("eos", [True, False])
def test_str_round_trip(text, bos, eos):
    ids = encode(text, bos=bos, eos=eos)
    assert len(ids) == len(text.encode("utf-8")) + bos + eos
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode(ids) == text
    assert to_bytes(ids) == text.encode("utf-8")


def test_bytes_round_trip_all_256_values():
    data = bytes(range(256))
    ids = encode(data, bos=True, eos=True)
    assert ids[1:-1] == list(range(4, 260))
    assert to_bytes(ids) == data


@given(st.text(max_size=64), st.booleans(), st.booleans())
def test_round_trip_property(text, bos, eos):
    assert decode(encode(text, bos=bos, eos=eos)) == text


@given(st.binary(max_size=64))
def test_raw_bytes_round_trip_property(data):
    assert to_bytes(encode(data, eos=True)) == data


def test_no_normalisation():
    # é as one code point (NFC) and as e + combining acute (NFD) must stay distinct
    nfc, nfd = "\u00e9", "e\u0301"
    assert encode(nfc) != encode(nfd)
    assert decode(encode(nfd)) == nfd


def test_decode_drops_special_ids_and_pads():
    ids = [BOS_ID, *encode("ab", bos=False), BOE_ID, 3, -1, EOS_ID, *encode("c", bos=False), -1]
    assert decode(ids) == "abc"
    assert decode(ids, stop_at_eos=True) == "ab"


def test_decode_drops_invalid_utf8():
    ids = [BOS_ID, 0xFF + OFFSET, ord("H") + OFFSET, 0xC3 + OFFSET]  # invalid byte, 'H', lone lead byte
    assert decode(ids) == "H"
    # a truncated multi-byte character in the middle is dropped too
    ids = encode(b"a\xe2\x82b")
    assert decode(ids) == "ab"


def test_decode_errors_replace():
    ids = [BOS_ID, 0xFF + OFFSET, ord("H") + OFFSET]
    assert decode(ids, errors="replace") == "\ufffdH"
    assert decode(encode(b"a\xe2\x82"), errors="replace") == "a\ufffd"


def test_to_bytes_rejects_ids_beyond_vocab():
    with pytest.raises(ValueError, match="260"):
        to_bytes([BOS_ID, 260])
    with pytest.raises(ValueError, match="outside"):
        decode([1000])
    assert to_bytes([259]) == b"\xff"


def test_to_bytes_accepts_tensors():
    assert to_bytes(torch.tensor(encode("hi", eos=True))) == b"hi"


@given(st.text(max_size=40))
def test_utf8_stream_one_id_at_a_time(text):
    """Fed one id at a time, the stream emits exactly the longest complete-character prefix."""
    ids = encode(text, bos=True, eos=True)
    stream = Utf8Stream()
    out = ""
    fed = bytearray()
    for i in ids:
        piece = stream.feed([i])
        fed += to_bytes([i])
        out += piece
        # what has come out is the longest prefix of whole characters of the bytes fed so far
        assert out == _whole_prefix(fed)
        assert "\ufffd" not in out
    out += stream.flush()
    assert out == text


def _whole_prefix(buf: bytes) -> str:
    """Decode the longest prefix of `buf` that is valid UTF-8 (buf is valid UTF-8 cut short)."""
    for cut in range(len(buf), -1, -1):
        try:
            return bytes(buf[:cut]).decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("unreachable")


def test_utf8_stream_holds_back_partial_character():
    stream = Utf8Stream()
    euro = encode("€", bos=False)  # three ids
    assert stream.feed(euro[:1]) == ""
    assert stream.feed(euro[1:2]) == ""
    assert stream.feed(euro[2:]) == "€"


def test_utf8_stream_replaces_invalid_and_flushes_partial():
    stream = Utf8Stream()
    assert stream.feed([0xFF + OFFSET, ord("a") + OFFSET]) == "\ufffda"
    assert stream.feed([0xE2 + OFFSET]) == ""
    assert stream.flush() == "\ufffd"


def test_check_ids_accepts_valid():
    check_ids([0, 1, 2, 3, 259])
    check_ids(torch.tensor([[1, 76, 2]]))
    check_ids([])


@pytest.mark.parametrize("bad", [[1, 260], [1, -1], torch.tensor([[1, 300, 5]]), torch.tensor([-5])])
def test_check_ids_errors(bad):
    with pytest.raises(ValueError, match=r"0\.\.259") as exc:
        check_ids(bad)
    assert "encode" in str(exc.value)  # points to the helper that makes valid ids


def test_check_ids_names_the_bad_values():
    with pytest.raises(ValueError, match="300"):
        check_ids([1, 300])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        check_ids([1, 10], vocab_size=10)
