"""Document sources for training and evaluation: each yields documents as raw bytes.

Plain files (one document each, or split at a `NAME.docs` sidecar's offsets), folders, `.jsonl`,
`.parquet`, `.arrow`, `datasets.save_to_disk` folders and (online only) hub datasets. Bad input
raises an error that names the file and what is wrong with it.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

PREPARED = "prepare.json"  # marks a `blt data prepare` output folder
_ARROW_META = {"dataset_info.json", "state.json", "dataset_dict.json"}


# -- sources --------------------------------------------------------------------------------------


def _as_bytes(value, where: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(f"{where}: expected a string, got {type(value).__name__}")


def _sidecar(path: Path) -> Path | None:
    for cand in (path.with_suffix(".docs"), path.with_name(path.name + ".docs")):
        if cand != path and cand.is_file():
            return cand
    return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


def _text_documents(path: Path, data: bytes | None = None) -> Iterator[bytes]:
    """One document, or the pieces between the offsets of a `.docs` sidecar (trailing newlines,
    i.e. the blank line that joins documents, stripped)."""
    data = _read(path) if data is None else data
    docs = _sidecar(path)
    if docs is None:
        yield data
        return
    try:
        offsets = [int(line) for line in _read(docs).split()]
    except ValueError:
        raise ValueError(f"{docs}: every line must be one decimal byte offset") from None
    if not offsets or offsets[0] != 0 or any(b <= a for a, b in itertools.pairwise(offsets)) \
            or offsets[-1] >= max(len(data), 1):
        raise ValueError(f"{docs}: offsets must start at 0, increase strictly and stay below the size "
                         f"of {path.name} ({len(data)} bytes); rebuild it or delete it to read one document")
    for a, b in zip(offsets, [*offsets[1:], len(data)], strict=True):
        yield data[a:b].rstrip(b"\n")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[bytes]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{n}: no field {text_field!r} (has {keys}); choose one with "
                                 "text_field / --text-field")
            doc = _as_bytes(record[text_field], f"{path}:{n} field {text_field!r}")
            if doc:
                yield doc


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError("reading Parquet/Arrow data needs pyarrow: pip install 'bltkit[data]'") from None
    return pyarrow


def _column_documents(batches: Iterable, column: str, where: str) -> Iterator[bytes]:
    for batch in batches:
        if column not in batch.schema.names:
            raise ValueError(f"{where} has no column {column!r} (columns: {batch.schema.names}); "
                             "choose one with text_field / --text-field")
        for value in batch.column(column).to_pylist():
            doc = _as_bytes(value, f"{where} column {column!r}")
            if doc:
                yield doc


def _parquet_documents(path: Path, column: str) -> Iterator[bytes]:
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"cannot read {path} as Parquet: {e}") from None
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no column {column!r} (columns: {pf.schema_arrow.names}); "
                         "choose one with text_field / --text-field")
    yield from _column_documents(pf.iter_batches(columns=[column]), column, str(path))


def _arrow_documents(path: Path, column: str) -> Iterator[bytes]:
    """An Arrow IPC file in stream format (what `datasets.save_to_disk` writes) or file format."""
    pa = _pyarrow()
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"cannot read {path} as Arrow IPC data: {e}") from None
    yield from _column_documents(reader, column, str(path))


def _saved_dataset_documents(root: Path, column: str) -> Iterator[bytes]:
    """A folder written by `datasets.Dataset.save_to_disk`, read without the datasets package."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{root} holds a DatasetDict; pass one split folder, e.g. {root / (splits or ['train'])[0]}")
    files = sorted(root.glob("*.arrow"))
    state = root / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        files = [root / n for n in names] or files
    for f in files:
        yield from _arrow_documents(f, column)


def _hub_documents(spec: str, column: str) -> Iterator[bytes]:
    name, _, split = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec}: hub datasets need the `datasets` package and network access "
                         "(pip install datasets); offline, save the dataset with save_to_disk "
                         "elsewhere and pass that folder") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise ValueError(f"{spec}: could not load hub dataset {name!r} split {split or 'train'!r} "
                         f"(offline? wrong name?): {e}") from None
    if column not in ds.column_names:
        raise ValueError(f"{spec} has no column {column!r} (columns: {ds.column_names})")
    for i, value in enumerate(ds[column]):
        doc = _as_bytes(value, f"{spec} row {i}")
        if doc:
            yield doc


def _is_saved_dataset(path: Path) -> bool:
    return any((path / n).is_file() for n in _ARROW_META) and (
        any(path.glob("*.arrow")) or (path / "dataset_dict.json").is_file())


def folder_files(root: Path) -> list[Path]:
    """Files under root in sorted relative-path order, hidden files and folders left out."""
    files = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(top) / n for n in names if not n.startswith(".")]
    return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def _is_sidecar(p: Path) -> bool:
    return p.suffix == ".docs" and ((p.parent / p.stem).is_file() or any(
        q.stem == p.stem and q != p and q.is_file() for q in p.parent.iterdir()))


def _folder_documents(root: Path, text_field: str) -> Iterator[bytes]:
    skipped: list[str] = []
    for p in folder_files(root):
        if _is_sidecar(p) or (p.name in _ARROW_META and any(p.parent.glob("*.arrow"))):
            continue
        if p.suffix.lower() in (".jsonl", ".parquet", ".arrow"):
            yield from _file_documents(p, text_field)
            continue
        data = _read(p)
        if b"\0" in data:
            skipped.append(p.relative_to(root).as_posix())
            continue
        yield from (d for d in _text_documents(p, data) if d)
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} binary file(s) containing NUL bytes "
                      f"(e.g. {skipped[0]})", stacklevel=3)


def _file_documents(path: Path, text_field: str) -> Iterator[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    if suffix == ".parquet":
        return _parquet_documents(path, text_field)
    if suffix == ".arrow":
        return _arrow_documents(path, text_field)
    return (d for d in _text_documents(path) if d)


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[bytes]:
    """Documents of one source as raw bytes (UTF-8 as stored, never normalised); empty ones skipped.

    A text file is one document, or several when a sidecar `NAME.docs` (one byte offset per line)
    sits next to it; a folder is its files in sorted order (hidden and binary files skipped);
    `.jsonl`, `.parquet`, `.arrow` and `save_to_disk` folders give `text_field`; `hf:NAME[:split]`
    loads a hub dataset (needs `datasets` and a network).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unreadable or malformed data, or no documents at all.
    """
    spec = str(path)
    if spec.startswith("hf:"):
        docs = _hub_documents(spec, text_field)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_dir() and (p / PREPARED).is_file():
            raise ValueError(f"{p} is a `blt data prepare` output; use it through build_streams / "
                             "`blt train` data.paths, as the only path")
        if p.is_dir():
            docs = _saved_dataset_documents(p, text_field) if _is_saved_dataset(p) else _folder_documents(p, text_field)
        else:
            docs = _file_documents(p, text_field)
    count = 0
    for doc in docs:
        count += 1
        yield doc
    if count == 0:
        raise ValueError(f"{spec} contains no documents (empty file or folder?)")


