"""Data sources, token streams, the train/val split, the resumable loader and `prepare`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from bltkit import data
from bltkit.bytes import BOS_ID, EOS_ID, encode
from bltkit.data import (
    Batch,
    BatchLoader,
    DataConfig,
    TokenStream,
    build_streams,
    iter_documents,
    prepare,
    split_documents,
)

ASSETS = Path(__file__).parent / "assets"


def _docs(path, field="text") -> list[bytes]:
    return list(iter_documents(path, field))


def _words(n: int, seed: int = 0) -> list[bytes]:
    """n distinct small documents."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: ".encode() + bytes(rng.integers(97, 123, rng.integers(5, 40)).astype(np.uint8))
            for i in range(n)]


# -- sources --------------------------------------------------------------------------------------


def test_text_file_is_one_raw_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("héllo\r\nworld\n\n".encode())
    assert _docs(f) == ["héllo\r\nworld\n\n".encode()]  # stored bytes, no normalisation


def test_asset_sample_reads(tmp_path):
    f = ASSETS / "pride_20k.txt"
    if not f.is_file():
        pytest.skip("tests/assets/pride_20k.txt not present")
    assert _docs(f) == [f.read_bytes()]


@pytest.mark.parametrize("sidecar", ["corpus.docs", "corpus.txt.docs"])
def test_docs_sidecar_splits_at_offsets(tmp_path, sidecar):
    pieces = [b"first\n\nstill first", b"second", b"third\n"]
    text = b"\n\n".join(p.rstrip(b"\n") for p in pieces) + b"\n"
    offsets = [0, len(pieces[0]) + 2, len(pieces[0]) + len(pieces[1]) + 4]
    (tmp_path / "corpus.txt").write_bytes(text)
    (tmp_path / sidecar).write_text("".join(f"{o}\n" for o in offsets))
    assert _docs(tmp_path / "corpus.txt") == [b"first\n\nstill first", b"second", b"third"]
    # in a folder the sidecar is used, not read as a document of its own
    assert _docs(tmp_path) == [b"first\n\nstill first", b"second", b"third"]


def test_bad_docs_sidecar(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"abc")
    (tmp_path / "c.docs").write_text("0\n7\n")
    with pytest.raises(ValueError, match=r"c\.docs: offsets must start at 0"):
        _docs(tmp_path / "c.txt")


def test_folder_sorted_recursive_skips_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_bytes(b"z")
    (tmp_path / "b" / "a.py").write_bytes(b"print(1)")
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / ".hidden.txt").write_bytes(b"hidden")
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref")
    (tmp_path / "blob.bin").write_bytes(b"x\0y")
    with pytest.warns(UserWarning, match=r"skipped 1 binary file\(s\).*blob\.bin"):
        assert _docs(tmp_path) == [b"a", b"print(1)", b"z"]


def test_jsonl_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"body": "ä"}, {"body": ""}, {"body": "b", "x": 1}]) + "\n\n")
    assert _docs(f, "body") == ["ä".encode(), b"b"]


@pytest.mark.parametrize(("content", "match"), [
    ('{"text": "a"}\n{"text": \n', r"d\.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n\n{"body": "b"}\n', r"d\.jsonl:3: no field 'text' \(has \['body'\]\)"),
    ('{"text": 5}\n', r"d\.jsonl:1 field 'text': expected a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        _docs(tmp_path / "d.jsonl")


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["one", None, "три"]}), f)
    assert _docs(f, "content") == [b"one", "три".encode()]
    with pytest.raises(ValueError, match=r"d\.parquet has no column 'text' \(columns: \['id', 'content'\]\)"):
        _docs(f)


def test_save_to_disk_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    root = tmp_path / "ds"
    root.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, texts in zip(names, [["a", "b"], ["c"]], strict=True):
        table = pa.table({"text": texts, "n": list(range(len(texts)))})
        with pa.ipc.new_stream(str(root / name), table.schema) as w:  # datasets writes stream format
            w.write_table(table)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (root / "dataset_info.json").write_text("{}")
    assert _docs(root) == [b"a", b"b", b"c"]
    with pytest.raises(ValueError, match="has no column 'body'"):
        _docs(root, "body")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ValueError, match=r"DatasetDict; pass one split folder, e.g. .*dd/train"):
        _docs(tmp_path / "dd")


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist"):
        _docs(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt contains no documents"):
        _docs(tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder contains no documents"):
        _docs(tmp_path / "folder")


def test_hub_source_needs_datasets(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match="need the `datasets` package"):
        _docs("hf:someone/corpus:train")


# -- streams and splitting ------------------------------------------------------------------------


def test_token_stream_encoding():
    s = TokenStream.from_documents([b"ab", b"\xff", "é".encode()])
    assert s.ids.dtype == np.uint16
    assert s.doc_starts.dtype == np.int64
    assert s.ids.tolist() == [*encode(b"ab", eos=True), *encode(b"\xff", eos=True), *encode("é", eos=True)]
    assert s.ids.tolist()[:5] == [BOS_ID, 97 + 4, 98 + 4, EOS_ID, BOS_ID]
    assert s.doc_starts.tolist() == [0, 4, 7]
    assert (s.n_docs, s.n_bytes, len(s)) == (3, 5, 11)
    assert s.document(1).tolist() == [BOS_ID, 259, EOS_ID]


def test_token_stream_save_load(tmp_path):
    s = TokenStream.from_documents(_words(5))
    s.save(tmp_path / "a")
    back = TokenStream.load(tmp_path / "a")
    assert np.array_equal(back.ids, s.ids)
    assert np.array_equal(back.doc_starts, s.doc_starts)
    assert back.entropies is None
    s.entropies = np.arange(len(s), dtype=np.float16)
    s.save(tmp_path / "b")
    back = TokenStream.load(tmp_path / "b", mmap=False)
    assert np.array_equal(back.entropies, s.entropies)
    with pytest.raises(FileNotFoundError, match=r"ids\.npy is missing"):
        TokenStream.load(tmp_path / "nothing")


def test_split_is_deterministic_and_disjoint():
    docs = _words(2000)
    train, val = split_documents(docs, 0.05, None, seed=3)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(docs)
    assert 0.03 < len(val) / len(docs) < 0.07
    assert (train, val) == split_documents(docs, 0.05, None, seed=3)
    assert val != split_documents(docs, 0.05, None, seed=4)[1]
    # the cap sends later picks to train
    _, capped = split_documents(docs, 0.05, 200, seed=3)
    assert sum(map(len, capped)) <= 200
    assert capped == val[:len(capped)]


def test_single_document_splits_at_a_line():
    doc = b"".join(f"line {i:03d}\n".encode() for i in range(100))
    train, val = split_documents([doc], 0.1, None, seed=0)
    assert len(train) == len(val) == 1
    assert val[0].startswith(b"line ")
    assert train[0] + b"\n" + val[0] == doc
    assert abs(len(val[0]) - 0.1 * len(doc)) <= 10
    # a few big documents: too big for the fraction, so the last one is cut instead
    train, val = split_documents([doc, doc + b"x"], 0.01, None, seed=0)
    assert train[0] == doc
    assert val[0].endswith(b"x")
    assert train[1] + b"\n" + val[0] == doc + b"x"


def test_build_streams_and_cache(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in _words(300)))
    cfg = DataConfig(paths=[str(tmp_path / "d.jsonl")], val_fraction=0.1)
    train, val = build_streams(cfg, cache_dir=tmp_path / "cache")
    assert train.n_docs + val.n_docs == 300
    assert val.n_docs > 0
    monkeypatch.setattr(data, "iter_documents", lambda *a: pytest.fail("cache not used"))
    train2, val2 = build_streams(cfg, cache_dir=tmp_path / "cache")
    assert np.array_equal(train2.ids, train.ids)
    assert np.array_equal(val2.ids, val.ids)


# -- the loader -----------------------------------------------------------------------------------


def _stream(n_ids: int) -> TokenStream:
    """ids 1..n: each id names its own position (the loader never looks at values)."""
    return TokenStream(np.arange(1, n_ids + 1, dtype=np.uint16), np.zeros(1, np.int64))


def _rows(loader: BatchLoader, n: int) -> list[list[int]]:
    return [row for _ in range(n) for row in loader.next_batch().tokens.tolist()]


def test_windows_cover_every_target_once_per_epoch():
    s = _stream(1000)
    loader = BatchLoader(s, 3, 16, seed=1, drop_last=False)
    assert loader.windows_per_epoch == 63
    assert loader.batches_per_epoch == 21
    rows = _rows(loader, loader.batches_per_epoch)
    assert sorted((r[0] - 1) // 16 for r in rows) == list(range(63))
    assert sorted(t for r in rows for t in r[1:] if t != 0) == list(range(2, 1001))
    assert rows[[r[0] for r in rows].index(62 * 16 + 1)] == [*range(993, 1001), *[0] * 9]  # padded tail
    b = BatchLoader(s, 3, 16, seed=1)
    assert (b.windows_per_epoch, b.batches_per_epoch) == (62, 20)  # the tail window is dropped


def test_batch_layout_and_epoch_reshuffle():
    s = _stream(401)  # 400 targets: 50 windows, 25 batches, none dropped
    loader = BatchLoader(s, 2, 8, seed=0)
    batch = next(iter(loader))
    assert isinstance(batch, Batch)
    assert batch.entropies is None
    assert batch.tokens.dtype == torch.int64
    assert batch.tokens.shape == (2, 9)
    first = loader.order(0)
    assert loader.state_dict()["step_in_epoch"] == 1
    rows0 = _rows(loader, loader.batches_per_epoch - 1)
    rows1 = _rows(loader, loader.batches_per_epoch)
    assert loader.epoch == 1
    assert not np.array_equal(loader.order(1), first)
    assert sorted(map(tuple, rows1)) == sorted(map(tuple, batch.tokens.tolist() + rows0))
    assert not np.array_equal(BatchLoader(s, 2, 8, seed=0, shuffle=False).order(0)[:5], first[:5])


def test_short_stream_is_padded_and_tiny_stream_errors():
    s = TokenStream.from_documents([b"hi"])
    batch = BatchLoader(s, 1, 8).next_batch()
    assert batch.tokens.tolist() == [[BOS_ID, 108, 109, EOS_ID, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(_stream(100), 4, 32)
    with pytest.raises(ValueError, match="empty token stream"):
        BatchLoader(TokenStream.from_documents([]), 1, 8)


@given(n_ids=st.integers(40, 400), seq_len=st.integers(1, 12), batch_size=st.integers(1, 4),
       world=st.integers(1, 2), shuffle=st.booleans(), drop_last=st.booleans(), stop=st.integers(0, 30),
       total=st.integers(1, 30))
def test_resume_equals_uninterrupted(n_ids, seq_len, batch_size, world, shuffle, drop_last, stop, total):
    stop = min(stop, total)
    s = _stream(n_ids)
    assume(not drop_last or (n_ids - 1) // seq_len >= batch_size * world)

    def make():
        return [BatchLoader(s, batch_size, seq_len, seed=7, rank=r, world_size=world, shuffle=shuffle,
                            drop_last=drop_last) for r in range(world)]

    full = [_rows(ld, total) for ld in make()]
    first = make()
    head = [_rows(ld, stop) for ld in first]
    resumed = make()
    for ld, old in zip(resumed, first, strict=True):
        ld.load_state_dict(json.loads(json.dumps(old.state_dict())))
    tail = [_rows(ld, total - stop) for ld in resumed]
    assert [h + t for h, t in zip(head, tail, strict=True)] == full


@given(n_ids=st.integers(60, 300), seq_len=st.integers(1, 8), batch_size=st.integers(1, 3),
       shuffle=st.booleans(), drop_last=st.booleans())
def test_ranks_partition_the_doubled_batch(n_ids, seq_len, batch_size, shuffle, drop_last):
    s = _stream(n_ids)
    assume(not drop_last or (n_ids - 1) // seq_len >= 2 * batch_size)
    one = BatchLoader(s, 2 * batch_size, seq_len, seed=3, shuffle=shuffle, drop_last=drop_last)
    ranks = [BatchLoader(s, batch_size, seq_len, seed=3, rank=r, world_size=2, shuffle=shuffle,
                         drop_last=drop_last) for r in range(2)]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch
    for _ in range(2 * one.batches_per_epoch + 1):  # across an epoch boundary
        both = [ld.next_batch().tokens for ld in ranks]
        assert torch.equal(torch.cat(both), one.next_batch().tokens)


def test_resume_with_another_world_size_and_changed_data():
    s = _stream(500)
    a = BatchLoader(s, 4, 8, seed=2)
    _rows(a, 3)
    b = [BatchLoader(s, 2, 8, seed=2, rank=r, world_size=2) for r in range(2)]
    for ld in b:
        ld.load_state_dict(a.state_dict())
    assert torch.equal(torch.cat([ld.next_batch().tokens for ld in b]), a.next_batch().tokens)
    with pytest.raises(ValueError, match=r"windows_per_epoch=.*the data or its settings changed"):
        BatchLoader(_stream(900), 4, 8, seed=2).load_state_dict(a.state_dict())


# -- prepare --------------------------------------------------------------------------------------


@pytest.fixture
def entropy_dir(tmp_path):
    from bltkit.checkpoint import init_model, save_model
    from bltkit.presets import entropy_tiny

    cfg = dataclasses.replace(entropy_tiny(), max_seqlen=64)  # small, so long documents are chunked
    return save_model(init_model(cfg, seed=0), tmp_path / "ent")


def test_prepare_matches_the_entropy_model_per_document(tmp_path, entropy_dir):
    from bltkit.checkpoint import load_entropy_model

    docs = [*_words(30), b"long " * 40]  # 200 bytes + BOS/EOS: 4 chunks of max_seqlen 64
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in docs))
    cfg = DataConfig(paths=[str(tmp_path / "src.jsonl")], val_fraction=0.2, seq_len=32)
    info = prepare(cfg, entropy_dir, tmp_path / "prep", batch_size=2)
    assert info["train"]["documents"] + info["val"]["documents"] == len(docs)
    assert len(info["entropy_model_sha256"]) == 64
    assert info["entropy_max_seqlen"] == 64
    assert json.loads((tmp_path / "prep" / "prepare.json").read_text()) == info
    train, val = build_streams(DataConfig(paths=[str(tmp_path / "prep")]))
    plain_train, _ = build_streams(cfg)
    assert np.array_equal(train.ids, plain_train.ids)
    model = load_entropy_model(entropy_dir)
    for s in (train, val):
        assert s.entropies.dtype == np.float16
        for i in range(s.n_docs):
            ids = torch.from_numpy(s.document(i).astype(np.int64))
            expect = torch.cat([model.entropies(c[None])[0] for c in ids.split(64)])  # context resets
            got = torch.from_numpy(s.entropies[s.doc_starts[i]:s.doc_starts[i] + len(ids)].astype(np.float32))
            torch.testing.assert_close(got, expect.half().float(), atol=0, rtol=0)
    batch = BatchLoader(train, 2, 32).next_batch()
    assert batch.entropies.dtype == torch.float32
    assert batch.entropies.shape == batch.tokens.shape


def test_cli_data_stats_and_prepare(tmp_path, entropy_dir, capsys):
    from bltkit.cli import main

    f = tmp_path / "t.txt"
    f.write_bytes(("héllo world\n" * 50).encode())
    main(["data", "stats", str(f), "--xz", "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["documents"], row["bytes"]) == (1, 650)
    assert row["non_ascii"] == pytest.approx(100 / 650)
    assert 0 < row["xz_bpb"] < 8
    main(["data", "prepare", "--entropy-model", str(entropy_dir), "--data", str(f), "--out",
          str(tmp_path / "p"), "--device", "cpu", "--val-fraction", "0.1"])
    assert "wrote" in capsys.readouterr().out
    assert data.prepared_info(tmp_path / "p")["val"]["documents"] == 1
    # again into the same folder: replaced; into the data's own folder: refused, nothing lost
    argv = ["data", "prepare", "--entropy-model", str(entropy_dir), "--data", str(f), "--device", "cpu"]
    main([*argv, "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path)])
    assert "t.txt" in capsys.readouterr().err
    assert f.is_file()


def test_prepare_with_no_validation_and_bad_sizes(tmp_path, entropy_dir):
    """val_fraction=0 prepares an empty val/ (as build_streams gives); batch_size < 1 and
    val_max_bytes < 1 are refused rather than accepted silently."""
    (tmp_path / "t.txt").write_text("hello world\n" * 20)
    cfg = DataConfig(paths=[str(tmp_path / "t.txt")], val_fraction=0)
    info = prepare(cfg, entropy_dir, tmp_path / "p")
    assert (info["train"]["documents"], info["val"]["documents"]) == (1, 0)
    train, val = build_streams(DataConfig(paths=[str(tmp_path / "p")]))
    assert (len(train), len(val), len(val.entropies)) == (240 + 2, 0, 0)  # BOS + 240 bytes + EOS
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        prepare(cfg, entropy_dir, tmp_path / "q", batch_size=0)
    with pytest.raises(ValueError, match="val_max_bytes must be >= 1"):
        DataConfig(paths=["x"], val_max_bytes=-1)
    for kw in ({"batch_size": 0}, {"seq_len": -3}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be >= 1"):
            BatchLoader(_stream(100), **{"batch_size": 1, "seq_len": 8, **kw})
