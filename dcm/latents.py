"""The latent-row schema shared by ingest and distill, and the parquet folder's manifest.

One row per clip (docs/ARCHITECTURE.md, "Latent rows"):

| column      | type                         |
|-------------|------------------------------|
| `latents`   | float32 (C, T, h, w), RAW VAE latents (normalise with `Bundle.normalize`) |
| `text`      | float32 (L, D) text-encoder hidden states (zero past the prompt)           |
| `text_mask` | int8 (L,), 1 = real token                                                  |
| `pooled`    | float32 (P,), HunyuanVideo's pooled CLIP text; only when the manifest's ``pooled_dim`` > 0 |
| `caption`   | str                                                                         |
| `source`    | str, the input video's path or URI                                          |
| `clip`      | int32, index of the clip within its source                                  |

In parquet the tensors are stored as flat fixed-size lists (plain Arrow, readable by any
parquet tool) and the shapes live in ``manifest.json``; ``table_to_rows`` restores them.
The float tensors are stored as float32 (default, lossless) or, with ``ingest.dtype:
bfloat16``, as bfloat16 bit patterns in uint16 lists (half the bytes; exact when the
encoders computed in bf16, else rounded to nearest even). ``table_to_rows`` reads either
kind from the column's type and always returns float32. A
parquet folder holds ``shard-NNNNN.parquet`` files, ``manifest.json`` (schema version,
encoder id, latent normalisation, shapes, counts, shard list), ``rejects.parquet`` (path,
reason) and ``empty_prompt.parquet`` (the empty prompt's ``text`` / ``text_mask`` [/
``pooled``], so that training needs no text encoder for CFG or prompt dropout).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcm.files import is_remote, write_atomic

LATENTS_SCHEMA_VERSION = 1
COLUMNS = ("latents", "text", "text_mask", "caption", "source", "clip")
POOLED = "pooled"  # the optional column (HunyuanVideo)
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
EMPTY_PROMPT = "empty_prompt.parquet"
REJECT_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
STORAGE_DTYPES = ("float32", "bfloat16")  # how latents/text/pooled are stored in parquet


class LatentsError(ValueError):
    """A latents folder or row batch is unusable; the message names it and what to do."""


# ---------------------------------------------------------------- file systems
def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system and the path inside it: local paths or s3://, gs://, ... URIs."""
    text = str(uri)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise LatentsError(
            f"cannot open '{text}' ({err}): use a local path or a pyarrow URI"
        ) from None


def join(base: str, *parts: str) -> str:
    """Join paths inside a pyarrow file system (always '/')."""
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# ---------------------------------------------------------------- rows <-> arrow
def check_rows(rows: dict[str, np.ndarray]) -> int:
    """Validate a batch of latent rows (numpy, leading batch axis); return its size."""
    missing = [c for c in COLUMNS if c not in rows]
    if missing:
        raise LatentsError(f"latent rows lack the columns {missing}: expected {list(COLUMNS)}")
    n = len(rows["caption"])
    dims = {"latents": 5, "text": 3, "text_mask": 2}
    for name, ndim in dims.items():
        arr = np.asarray(rows[name])
        if arr.ndim != ndim or arr.shape[0] != n:
            raise LatentsError(
                f"column '{name}' must be shaped (B, ...) with {ndim} axes, got {arr.shape}"
            )
    if POOLED in rows:
        arr = np.asarray(rows[POOLED])
        if arr.ndim != 2 or arr.shape[0] != n:
            raise LatentsError(f"column '{POOLED}' must be shaped (B, P), got {arr.shape}")
    return n


def columns(pooled_dim: int) -> list[str]:
    """The columns of a folder whose manifest says ``pooled_dim``."""
    return [*COLUMNS, POOLED] if pooled_dim else list(COLUMNS)


def to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(arr), np.uint32(0x7FC0), rounded).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def rows_to_table(rows: dict[str, np.ndarray], dtype: str = "float32") -> pa.Table:
    """Numpy latent rows (leading batch axis) -> an Arrow table of plain fixed-size lists;
    ``dtype`` ('float32' or 'bfloat16') is how the float tensors are stored."""
    n = check_rows(rows)
    if dtype not in STORAGE_DTYPES:
        raise LatentsError(f"storage dtype {dtype!r} is not one of {list(STORAGE_DTYPES)}")

    def flat(arr: np.ndarray, np_type: Any, pa_type: pa.DataType) -> pa.Array:
        a = np.ascontiguousarray(arr, dtype=np_type).reshape(n, -1)  # (B, prod(shape))
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=pa_type), a.shape[1])

    def floats(arr: np.ndarray) -> pa.Array:
        if dtype == "bfloat16":
            return flat(to_bf16_bits(np.asarray(arr)), np.uint16, pa.uint16())
        return flat(arr, np.float32, pa.float32())

    cols = {
        "latents": floats(rows["latents"]),
        "text": floats(rows["text"]),
        "text_mask": flat(rows["text_mask"], np.int8, pa.int8()),
        "caption": pa.array([str(c) for c in rows["caption"]], pa.string()),
        "source": pa.array([str(s) for s in rows["source"]], pa.string()),
        "clip": pa.array(np.asarray(rows["clip"], dtype=np.int32), pa.int32()),
    }
    if POOLED in rows:
        cols[POOLED] = floats(rows[POOLED])
    return pa.table(cols)


def table_to_rows(
    table: pa.Table,
    latent_shape: tuple[int, ...],
    text_shape: tuple[int, ...],
    pooled_dim: int = 0,
) -> dict[str, np.ndarray]:
    """An Arrow table written by ``rows_to_table`` -> numpy rows with their tensor shapes."""
    n = table.num_rows

    def unflat(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        col = table.column(name).combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False)
        if values.dtype == np.uint16 and dtype == np.float32:  # stored as bfloat16 bits
            values = from_bf16_bits(values)
        values = values.astype(dtype, copy=False)
        if values.size != n * math.prod(shape):
            raise LatentsError(
                f"column '{name}' holds {values.size // max(n, 1)} values per row, the manifest "
                f"says {tuple(shape)}: the folder mixes runs; re-run ingest into an empty folder"
            )
        return values.reshape((n, *shape))

    rows = {
        "latents": unflat("latents", tuple(latent_shape), np.float32),  # (B, C, T, h, w)
        "text": unflat("text", tuple(text_shape), np.float32),  # (B, L, D)
        "text_mask": unflat("text_mask", (text_shape[0],), np.int8),  # (B, L)
        "caption": np.asarray(table.column("caption").to_pylist(), dtype=object),
        "source": np.asarray(table.column("source").to_pylist(), dtype=object),
        "clip": table.column("clip").to_numpy().astype(np.int32),
    }
    if pooled_dim:
        rows[POOLED] = unflat(POOLED, (pooled_dim,), np.float32)  # (B, P)
    return rows


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write a parquet file atomically (temporary name, then move)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_atomic(path, sink.getvalue().to_pybytes(), fs)


def rejects_table(records: list[tuple[str, str]] | list[dict[str, str]]) -> pa.Table:
    """(path, reason) records -> the rejects table."""
    rows = [r if isinstance(r, dict) else {"path": r[0], "reason": r[1]} for r in records]
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def empty_prompt_table(
    text: np.ndarray, mask: np.ndarray, pooled: np.ndarray | None = None
) -> pa.Table:
    """The empty prompt's text (L, D), mask (L,) [and pooled (P,)] as a one-row table."""

    def one(arr: np.ndarray, dtype: Any) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(arr, dtype).reshape(-1)), int(np.size(arr))
        )

    cols = {"text": one(text, np.float32), "text_mask": one(mask, np.int8)}
    if pooled is not None:
        cols[POOLED] = one(pooled, np.float32)
    return pa.table(cols)


# ---------------------------------------------------------------- manifest
@dataclass
class LatentManifest:
    """What a parquet latents folder holds (``manifest.json``)."""

    encoder: dict[str, Any]  # model path, backbone, posterior, dtype
    normalisation: dict[str, Any]  # how Bundle.normalize maps RAW latents (Wan mean/std, scale)
    latent_shape: tuple[int, int, int, int]  # (C, T, h, w)
    text_shape: tuple[int, int]  # (L, D)
    video: dict[str, Any]  # num_frames, height, width, target_fps, clips_per_video
    counts: dict[str, int]  # inputs, videos, clips, rejects, shards
    shards: list[dict[str, Any]] = field(default_factory=list)  # {file, rows}
    pooled_dim: int = 0  # P of the 'pooled' column (HunyuanVideo), 0 = no such column
    dtype: str = "float32"  # how latents/text/pooled are stored: float32 or bfloat16 bits
    empty_prompt: str = EMPTY_PROMPT
    rejects: str = REJECTS
    schema_version: int = LATENTS_SCHEMA_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["latent_shape"] = list(self.latent_shape)
        data["text_shape"] = list(self.text_shape)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_manifest(root: str | Path, manifest: LatentManifest) -> str:
    """Write ``manifest.json`` into a latents folder (local or URI); return its path."""
    fs, base = filesystem(root)
    path = join(base, MANIFEST)
    write_atomic(path, manifest.to_json(), fs)
    return path


def read_manifest(root: str | Path) -> LatentManifest:
    """Read and check ``manifest.json`` of a latents folder, with one clear error if unusable."""
    fs, base = filesystem(root)
    path = join(base, MANIFEST)
    if not exists(fs, path):
        raise LatentsError(
            f"'{root}' has no {MANIFEST}: it is not a finished ingest folder; run "
            "`dcm ingest --out` into it (or pass the folder ingest wrote)"
        )
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentsError(f"'{path}' is not valid JSON ({err}): re-run ingest") from None
    version = data.get("schema_version")
    if version != LATENTS_SCHEMA_VERSION:
        raise LatentsError(
            f"'{path}' has schema_version {version!r}, this code reads {LATENTS_SCHEMA_VERSION}: "
            "re-run ingest with this version"
        )
    known = {f for f in LatentManifest.__dataclass_fields__}
    try:
        m = LatentManifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as err:
        raise LatentsError(f"'{path}' lacks a field ({err}): re-run ingest") from None
    m.latent_shape = tuple(int(v) for v in m.latent_shape)  # type: ignore[assignment]
    m.text_shape = tuple(int(v) for v in m.text_shape)  # type: ignore[assignment]
    return m


def shard_paths(root: str | Path, manifest: LatentManifest | None = None) -> list[str]:
    """Paths (inside the folder's file system) of the shards the manifest lists."""
    manifest = manifest or read_manifest(root)
    _, base = filesystem(root)
    return [join(base, s["file"]) for s in manifest.shards]


def read_empty_prompt(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's ``text`` (L, D) float32 and ``text_mask`` (L,) int8 of a folder."""
    manifest = read_manifest(root)
    fs, base = filesystem(root)
    path = join(base, manifest.empty_prompt)
    if not exists(fs, path):
        raise LatentsError(f"'{path}' is missing: re-run ingest into this folder")
    table = pq.read_table(path, filesystem=fs)
    length, dim = manifest.text_shape
    text = table.column("text").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    mask = table.column("text_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if text.size != length * dim or mask.size != length:
        raise LatentsError(f"'{path}' does not match the text shape {(length, dim)}: re-run ingest")
    return text.astype(np.float32).reshape(length, dim), mask.astype(np.int8)


def read_empty_pooled(root: str | Path) -> np.ndarray | None:
    """The empty prompt's pooled text (P,) float32 of a folder, None when it has none."""
    manifest = read_manifest(root)
    if not manifest.pooled_dim:
        return None
    fs, base = filesystem(root)
    table = pq.read_table(join(base, manifest.empty_prompt), filesystem=fs)
    if POOLED not in table.column_names:
        raise LatentsError(f"'{root}' lacks the empty prompt's pooled text: re-run ingest")
    values = table.column(POOLED).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32).reshape(manifest.pooled_dim)


def read_rejects(root: str | Path) -> list[dict[str, str]]:
    """The rejects table of a latents folder as a list of {path, reason}."""
    fs, base = filesystem(root)
    path = join(base, REJECTS)
    if not exists(fs, path):
        return []
    return pq.read_table(path, filesystem=fs).to_pylist()


def describe_normalisation(backbone_kind: str, vae_config: dict[str, Any]) -> dict[str, Any]:
    """How ``Bundle.normalize`` maps RAW latents, for the manifest (METHOD.md section 1)."""
    if backbone_kind == "wan":
        return {
            "kind": "per_channel",
            "formula": "(z - mean) / std",
            "mean": [float(v) for v in vae_config["latents_mean"]],
            "std": [float(v) for v in vae_config["latents_std"]],
        }
    return {
        "kind": "scale",
        "formula": "z * scaling_factor",
        "scaling_factor": float(vae_config["scaling_factor"]),
    }
