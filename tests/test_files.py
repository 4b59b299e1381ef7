"""dcm.files: the one atomic write and the one remote-path test."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from dcm.files import is_remote, write_atomic, write_json


def test_is_remote():
    assert is_remote("s3://bucket/runs") and is_remote("gs://b/x")
    assert (
        not is_remote("runs/demo")
        and not is_remote("/abs/path")
        and not is_remote("bundled:shapes")
    )


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})

    def crash(path):
        path.write_text('{"step": 2')  # half written, then the process dies
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, crash)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_bytes_text_and_pyarrow_file_system(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01", fsync=True)
    write_atomic(str(tmp_path / "b.txt"), "hello", fs=pafs.LocalFileSystem())
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]
