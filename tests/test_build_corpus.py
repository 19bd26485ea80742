"""Pieces of scripts/build_corpus.py that need no package downloads."""

from __future__ import annotations

import gettext
import io
import struct
import sys
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
