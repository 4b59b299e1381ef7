"""Ingest's write stage: a Ray Data UDF (CPU tasks) that writes latent rows as parquet where
the rows are, and passes on only a small record per clip written.

Each task gets about ``ingest.rows_per_shard`` rows and writes one file per shard group
present in them, ``shard-<group>-<first input>-<first clip>.parquet`` (rows sorted by input
and clip). The name is fixed by the rows it holds, so a retried task rewrites the same file
(atomically). The driver counts the records to know when a group is complete; it never
holds a latent.
"""

from __future__ import annotations

import os

import numpy as np

from dcm import latents as lt

WRITE_CPUS = 0.25  # parquet encoding + zstd of one batch; small, so it fits beside decoders


def shard_name(group: int, index: int, clip: int) -> str:
    """The file of group ``group`` whose first row is input ``index``'s clip ``clip``."""
    return f"shard-{group:05d}-{index:07d}-{clip:03d}.parquet"


def shard_group(name: str) -> int | None:
    """The group of a shard file name (or of its leftover temporary file), None for others."""
    parts = name.split("-")
    if parts[0] != "shard" or len(parts) < 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def write_batch(
    batch: dict[str, np.ndarray], out: str, group_size: int, dtype: str
) -> dict[str, np.ndarray]:
    """Ray Data UDF: latent rows with 'index' -> parquet files under ``out``; returns one
    record per row written: index, clip, file, and the writing process (pid, node)."""
    import ray

    fs, base = lt.filesystem(out)
    index = np.asarray(batch["index"], dtype=np.int64)
    clip = np.asarray(batch["clip"], dtype=np.int32)
    order = np.lexsort((clip, index))  # deterministic row order: by input, then clip
    groups = index[order] // group_size
    files = np.empty(len(order), dtype=object)
    for g in np.unique(groups):
        sel = order[groups == g]
        name = shard_name(int(g), int(index[sel[0]]), int(clip[sel[0]]))
        rows = {k: v[sel] for k, v in batch.items() if k != "index"}
        lt.write_table(fs, lt.join(base, name), lt.rows_to_table(rows, dtype=dtype))
        files[sel] = name
    node = ray.get_runtime_context().get_node_id()
    n = len(index)
    return {
        "index": index,
        "clip": clip,
        "file": files,
        "pid": np.full(n, os.getpid(), dtype=np.int64),
        "node": np.asarray([node] * n, dtype=object),
    }
