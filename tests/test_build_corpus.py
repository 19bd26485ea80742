"""Pieces of scripts/build_corpus.py that need no package downloads."""

from __future__ import annotations

import gettext
import hashlib
import io
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import build_corpus


def _mo(entries: list[tuple[str, str]], end: str = "<") -> bytes:
    """A GNU .mo catalog (format: the gettext manual, 'The Format of GNU MO Files'), entries
    sorted by msgid as msgfmt writes them; plural ids/strings joined by NUL."""
    entries = sorted(entries)
    ids = [k.encode() for k, _ in entries]
    strs = [v.encode() for _, v in entries]
    n, o_ids = len(entries), 28
    o_strs = o_ids + 8 * n
    data_at = o_strs + 8 * n
    blob, table_ids, table_strs = b"", [], []
    for s, table in [(s, table_ids) for s in ids] + [(s, table_strs) for s in strs]:
        table.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    head = struct.pack(end + "7I", 0x950412DE, 0, n, o_ids, o_strs, 0, 0)
    tables = b"".join(struct.pack(end + "II", *e) for e in table_ids + table_strs)
    return head + tables + blob


ENTRIES = [("", "Content-Type: text/plain; charset=UTF-8\n"), ("Open", "खोलें"),
           ("one file\0%d files", "एक फ़ाइल\0%d फ़ाइलें"), ("Untranslated", "")]


@pytest.mark.parametrize("end", ["<", ">"])
def test_mo_strings_reads_translations_in_table_order(end):
    data = _mo(ENTRIES, end)
    assert build_corpus.mo_strings(data) == ["खोलें", "एक फ़ाइल\n%d फ़ाइलें"]
    if end == "<":  # the standard library reads the same catalog the same way
        catalog = gettext.GNUTranslations(io.BytesIO(data))
        assert catalog.gettext("Open") == "खोलें"
        assert catalog.ngettext("one file", "%d files", 2) == "%d फ़ाइलें"


def test_mo_strings_rejects_other_files():
    with pytest.raises(build_corpus.BuildError, match=r"not a GNU \.mo catalog"):
        build_corpus.mo_strings(b"\0" * 28)


@pytest.mark.skipif(shutil.which("xz") is None, reason="needs the xz program")
def test_pack_of_one_bundle_keeps_the_other_packed_files(tmp_path):
    files = {"main/train.txt": b"main\n", "main/train.docs": b"0\n",
             "extra/train.txt": b"extra\n", "extra/train.docs": b"0\n"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack/main.txt.xz").write_bytes(b"packed before")
    sha = {rel: hashlib.sha256(files[rel]).hexdigest() for rel in ("main/train.txt", "extra/train.txt")}
    manifest = {"files": {rel: {"bytes": len(files[rel]), "sha256": sha[rel]} for rel in sha},
                "pack": {"main.txt.xz": 13}}
    timings = {}
    build_corpus.pack(tmp_path, manifest, timings, ["extra"])
    assert (tmp_path / "pack/main.txt.xz").read_bytes() == b"packed before"
    assert manifest["pack"]["main.txt.xz"] == 13
    assert "main.docs.xz" not in manifest["pack"]
    assert "xz9_bytes" in manifest["files"]["extra/train.txt"]
    assert "xz9_bytes" not in manifest["files"]["main/train.txt"]
    with tarfile.open(tmp_path / "pack/extra.tar.xz") as tf:
        assert tf.getnames() == ["extra/train.txt", "extra/train.docs"]
        assert tf.extractfile("extra/train.txt").read() == b"extra\n"
    assert (tmp_path / "pack/SHA256SUMS").read_text() == (
        f"{sha['extra/train.txt']}  extra/train.txt\n{sha['main/train.txt']}  main/train.txt\n")
    assert set(timings) == {"pack_extra"}
