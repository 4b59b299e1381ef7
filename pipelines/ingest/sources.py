"""The inputs of ``data.input``: manifest (JSONL/CSV/parquet) or folder listing, as source rows.

A source row is one input: its path or URI, its caption (inline or a sidecar .txt file),
an optional ``start``/``end``/``fps`` and, when the listing itself shows it is unusable, the
reject reason in ``error``. Listing streams (a JSONL manifest is read 1 MiB at a time, a
folder one directory at a time), so a million-row manifest is never held in memory.
``source_datasource`` turns the listing into one streaming Ray Data read task.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from dcm import latents as lt
from dcm.config import ConfigError
from dcm.decode import SourceError
from dcm.files import is_remote

MANIFEST_KINDS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
FOLDER_MANIFESTS = ("captions.jsonl", "manifest.jsonl")  # a folder holding one is that manifest
SOURCE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("caption_file", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("fps", pa.float64()),
        ("error", pa.string()),
    ]
)


def _source_row(source: str, error: str | None = None) -> dict[str, Any]:
    """A source row with no caption, no segment and no fps; ``error`` is its reject reason."""
    return {
        "source": source,
        "caption": None,
        "caption_file": None,
        "start": math.nan,
        "end": math.nan,
        "fps": math.nan,
        "error": error,
    }


def _child_uri(base: str, rel: str) -> str:
    """Resolve a manifest entry against the manifest's folder (local path or URI)."""
    if is_remote(rel):
        return rel
    if not is_remote(base):
        p = Path(rel).expanduser()
        return str(p if p.is_absolute() else (Path(base) / p).resolve())
    scheme = base.split("://", 1)[0]
    return f"{scheme}://{rel.lstrip('/')}" if rel.startswith("/") else f"{base.rstrip('/')}/{rel}"


def input_uri(text: str) -> str:
    """A local path made absolute, or a URI as given."""
    return text if is_remote(text) else str(Path(text).expanduser().resolve())


def check_input(text: str) -> tuple[str, str]:
    """Validate ``data.input``: (uri, kind) with kind 'folder' or a manifest kind."""
    if not text:
        raise ConfigError("data.input is empty: pass --input MANIFEST_OR_FOLDER")
    uri = input_uri(text)
    fs, path = lt.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(
            f"data.input '{text}' does not exist: pass a manifest or a folder of videos"
        )
    if info.type == pafs.FileType.Directory:
        for name in FOLDER_MANIFESTS:
            if lt.exists(fs, lt.join(path, name)):
                return f"{uri.rstrip('/')}/{name}", "jsonl"
        return uri, "folder"
    kind = MANIFEST_KINDS.get(Path(path).suffix.lower())
    if kind is None:
        raise ConfigError(
            f"data.input '{text}' is not a manifest: use .jsonl, .csv or .parquet with "
            "'path' and 'caption' columns, or a folder of videos with .txt captions"
        )
    return uri, kind


def _num(value: Any, name: str) -> float:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SourceError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(out) or out < 0:
        raise SourceError(f"{name}={value!r} must be a non-negative number")
    return out


def _text(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _record(base: str, rec: Any, where: str) -> dict[str, Any]:
    """One manifest entry -> a source row (its 'error' names what is wrong, if anything)."""
    row = _source_row(where)
    if not isinstance(rec, dict):
        row["error"] = f"{where} is not an object with 'path' and 'caption'"
        return row
    path = _text(rec.get("path"))
    if not isinstance(path, str) or not path.strip():
        row["error"] = f"{where} has no 'path'"
        return row
    row["source"] = _child_uri(base, path.strip())
    caption = _text(rec.get("caption"))
    try:
        if caption is not None and not isinstance(caption, str):
            raise SourceError(f"caption of {where} is not text")
        row["caption"] = caption
        for key in ("start", "end", "fps"):
            row[key] = _num(rec.get(key), key)
    except SourceError as err:
        row["error"] = str(err)
    return row


def _jsonl_records(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[Any, str]]:
    """Stream a JSONL manifest line by line (1 MiB reads), never holding the whole file."""
    with fs.open_input_stream(path) as f:
        tail, lineno = b"", 0
        while True:
            chunk = f.read(1 << 20)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop() if chunk else b""
            for raw in lines:
                lineno += 1
                if not raw.strip():
                    continue
                where = f"{name} line {lineno}"
                try:
                    yield json.loads(raw.decode("utf-8", errors="replace")), where
                except json.JSONDecodeError:
                    yield f"{where} is not valid JSON", where
            if not chunk:
                return


def _csv_records(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.csv as pacsv

    bad: list[int] = []

    def skip(row: Any) -> str:
        bad.append(row.number or -1)
        return "skip"

    reader = pacsv.open_csv(
        fs.open_input_stream(path),
        parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
        # bytes, so that one non-UTF-8 caption is that row's reject, not a failed file
        convert_options=pacsv.ConvertOptions(
            column_types={"path": pa.binary(), "caption": pa.binary()},
            strings_can_be_null=True,
        ),
    )
    line = 1  # the header
    for batch in reader:
        for rec in batch.to_pylist():
            line += 1
            yield rec, f"{name} row {line - 1}"
        while bad:
            n = bad.pop(0)
            yield f"{name} line {n} has the wrong number of fields", f"{name} line {n}"


def _parquet_records(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield rec, f"{name} row {row}"


def _folder_rows(fs: pafs.FileSystem, path: str, uri: str) -> Iterator[dict[str, Any]]:
    """Walk a folder one directory at a time (sorted): each non-hidden file is an input,
    a same-name .txt beside it is its caption; a .txt with no video beside it is a reject."""
    infos = sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.base_name)
    files = {i.base_name: i for i in infos if i.type == pafs.FileType.File}
    stems = {Path(n).stem for n in files if not n.lower().endswith(".txt")}
    for info in infos:
        name = info.base_name
        if name.startswith(".") or name.startswith("_"):
            continue
        child = f"{uri.rstrip('/')}/{name}"
        if info.type == pafs.FileType.Directory:
            yield from _folder_rows(fs, info.path, child)
            continue
        row = _source_row(child)
        if name.lower().endswith(".txt"):
            if Path(name).stem in stems:
                continue
            row["error"] = "caption file without a video of the same name"
        else:
            sidecar = Path(name).stem + ".txt"
            sidecar = next((n for n in files if n.lower() == sidecar.lower()), sidecar)
            row["caption_file"] = f"{uri.rstrip('/')}/{sidecar}"
        yield row


def iter_sources(uri: str, kind: str) -> Iterator[dict[str, Any]]:
    """Every input of ``data.input`` in a fixed order, as source rows (without 'index')."""
    fs, path = lt.filesystem(uri)
    if kind == "folder":
        yield from _folder_rows(fs, path, uri)
        return
    base = uri.rsplit("/", 1)[0]
    name = uri.rsplit("/", 1)[-1]
    reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}[kind]
    for rec, where in reader(fs, path, name):
        if isinstance(rec, str):  # the reader's own error text
            yield _source_row(where, rec)
        else:
            yield _record(base, rec, where)


def source_datasource(uri: str, kind: str, group_size: int, skip: frozenset[int]) -> Any:
    """The listing as a Ray Data datasource; inputs of the groups in ``skip`` (finished by an
    earlier run) are left out here, before any decoding."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class SourceList(Datasource):
        """One streaming read task over the listing; one source per block so that decode
        tasks get one video each."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: Any = None, data_context: Any = None
        ) -> list[Any]:
            def read() -> Iterator[pa.Table]:
                for i, row in enumerate(iter_sources(uri, kind)):
                    if i // group_size not in skip:
                        yield pa.Table.from_pylist([{**row, "index": i}], schema=SOURCE_SCHEMA)

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(read, meta, schema=SOURCE_SCHEMA)]

    return SourceList()
