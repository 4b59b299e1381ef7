"""Paths and file writes shared by the library, the stages and Serve.

``is_remote`` is the one test for "a URI, not a local path" (``s3://``, ``gs://``, ...);
``write_atomic`` the one way to write a file that readers must never see half-written: the
bytes go to a temporary name beside the target, then one rename (a move for pyarrow file
systems) puts them in place.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_remote(path: str | Path) -> bool:
    """True for a URI with a scheme (``s3://bucket/x``), False for a local path."""
    return "://" in str(path)


def write_atomic(
    path: str | Path,
    data: bytes | str | Callable[[Path], Any],
    fs: Any = None,
    fsync: bool = False,
) -> None:
    """Write ``data`` (bytes, text, or a function that writes the file it is given) to
    ``path`` so that a crash leaves either the old file or the new one, never half of one.

    ``fs``: a ``pyarrow.fs.FileSystem`` for remote paths (bytes or text only). ``fsync``:
    flush to disk before the rename (for files a restart depends on).
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if fs is not None:
        if callable(data):
            raise TypeError("write_atomic on a pyarrow file system takes bytes or text")
        with fs.open_output_stream(tmp) as out:
            out.write(data.encode() if isinstance(data, str) else data)
        fs.move(tmp, str(path))
        return
    tmp_path = Path(tmp)
    try:
        if callable(data):
            data(tmp_path)
        elif isinstance(data, str):
            tmp_path.write_text(data)
        else:
            tmp_path.write_bytes(data)
        if fsync:
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any, **dumps: Any) -> None:
    """``write_atomic`` of ``json.dumps(data, indent=2, sort_keys=True, **dumps)``."""
    write_atomic(path, json.dumps(data, **{"indent": 2, "sort_keys": True, **dumps}))
