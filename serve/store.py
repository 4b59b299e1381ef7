"""Where /v1/videos jobs live: one JSON record per job, its video, and cancel markers.

A folder or any URI pyarrow.fs understands (``s3://``, ``gs://``, ``hdfs://``, ``file://``),
else any fsspec protocol (``memory://`` in tests, ``az://`` ...) through pyarrow's fsspec
bridge. Layout under the root::

    jobs/<id>.json     the record (written whole, atomically: temp file + rename on a
                       local disk; object stores make a single PUT visible at once)
    videos/<id>.<fmt>  the result (mp4 or gif)
    cancel/<id>        present once DELETE asked a running job to stop

The ingress writes queued/cancelled/failed records, the replica running a job writes
running/succeeded/failed/cancelled ones; both write the whole record, never a patch.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_ROOT = Path.home() / ".cache" / "dcm" / "serve-jobs"


def new_job_id() -> str:
    return uuid.uuid4().hex


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a folder or a URI."""
    if not uri:
        uri = str(DEFAULT_ROOT)
    if "://" not in uri:
        path = Path(uri).expanduser().resolve()
        return pafs.LocalFileSystem(), str(path)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as arrow_err:  # pyarrow.ArrowInvalid is a ValueError
        try:
            import fsspec
            from fsspec.core import split_protocol

            fs = fsspec.filesystem(split_protocol(uri)[0])
        except (ImportError, ValueError) as err:
            raise ValueError(
                f"serve.job_store '{uri}' is not a URI pyarrow or fsspec can open "
                f"({arrow_err}; {err}): use a folder or e.g. s3://bucket/prefix"
            ) from None
        root = fs._strip_protocol(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root.rstrip("/")


class JobStore:
    """Records, videos and cancel markers of jobs under one root (see the module doc)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri or str(DEFAULT_ROOT)
        self.fs, self.root = _filesystem(uri)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        for sub in ("jobs", "videos", "cancel"):
            self.fs.create_dir(self._path(sub), recursive=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _put(self, path: str, data: bytes) -> None:
        if self._local:  # readers never see half a file: write aside, then rename
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def _get(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as inp:
                return inp.read()
        except (FileNotFoundError, OSError):
            return None

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(path)

    # ------------------------------------------------------------ records
    def write(self, record: dict[str, Any]) -> None:
        self._put(self._path("jobs", f"{record['id']}.json"), json.dumps(record).encode())

    def read(self, job_id: str) -> dict[str, Any] | None:
        if not JOB_ID.match(job_id):
            return None
        raw = self._get(self._path("jobs", f"{job_id}.json"))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:  # not ours (a stray file): treat as absent
            return None

    def records(self) -> list[dict[str, Any]]:
        """Every job record (order unspecified)."""
        selector = pafs.FileSelector(self._path("jobs"), allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            if info.type == pafs.FileType.File and name.endswith(".json"):
                rec = self.read(name[: -len(".json")])
                if rec is not None:
                    out.append(rec)
        return out

    # ------------------------------------------------------------ videos
    def write_video(self, job_id: str, fmt: str, data: bytes) -> None:
        self._put(self._path("videos", f"{job_id}.{fmt}"), data)

    def read_video(self, job_id: str, fmt: str) -> bytes | None:
        return self._get(self._path("videos", f"{job_id}.{fmt}")) if JOB_ID.match(job_id) else None

    # ------------------------------------------------------------ cancellation
    def request_cancel(self, job_id: str) -> None:
        self._put(self._path("cancel", job_id), b"")

    def cancel_requested(self, job_id: str) -> bool:
        info = self.fs.get_file_info(self._path("cancel", job_id))
        return info.type == pafs.FileType.File

    def delete(self, job_id: str, fmt: str) -> None:
        """Remove a job's record, video and marker (TTL expiry)."""
        self._delete(self._path("videos", f"{job_id}.{fmt}"))
        self._delete(self._path("cancel", job_id))
        self._delete(self._path("jobs", f"{job_id}.json"))
