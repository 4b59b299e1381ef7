"""`dcm ingest`: raw videos + captions -> latent rows, as parquet shards or a live stream.

Ray Data pipeline (DESIGN.md, data flow):

    list sources (one streaming read task: manifest rows or a folder walk)
      -> decode clips (CPU tasks, decord; dcm.decode)
      -> encode (actor pool: VAE + text encoder loaded once per actor; GPU when given)
      -> parquet shards + manifest.json + rejects.parquet    (run_ingest)
      or the same rows streamed into training               (stream_latents)

Bad inputs never stop the job: the decode and encode stages report every source's outcome
to a small ledger actor (no CPUs), which keeps the rejects (path + reason) and the
counts that must reconcile: inputs = sources with encoded clips + rejected sources.

Resumable parquet output: inputs are cut, in listing order, into groups of
``max(1, ingest.rows_per_shard // data.clips_per_video)``; group g becomes
``shard-<g>.parquet`` plus a done record ``_ingest/done-<g>.json`` (its counts and rejects),
both written atomically once every source of the group is accounted for. A re-run with the
same settings skips finished groups at listing time (no decoding).

Online mode (``stream_latents``): the dataset carries only clip rows, so rejects are logged
as warnings by the decode tasks, kept by the ledger (``stream_summary(ds)``), and written to
``<ingest.out>/rejects.parquet`` when ``ingest.out`` is set. Each epoch re-decodes and
re-encodes (fresh posterior samples); the ledger counts every input once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

import pipelines.args
from dcm import latents as lt
from dcm.config import Config, ConfigError
from dcm.decode import SourceError, check_caption, decode_clips, read_caption, to_pixels

log = logging.getLogger("dcm.ingest")

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
STATE_DIR = "_ingest"


# ================================================================ listing
def _child_uri(base: str, rel: str) -> str:
    """Resolve a manifest entry against the manifest's folder (local path or URI)."""
    if "://" in rel:
        return rel
    if "://" not in base:
        p = Path(rel).expanduser()
        return str(p if p.is_absolute() else (Path(base) / p).resolve())
    scheme = base.split("://", 1)[0]
    return f"{scheme}://{rel.lstrip('/')}" if rel.startswith("/") else f"{base.rstrip('/')}/{rel}"


def _input_uri(text: str) -> str:
    return text if "://" in text else str(Path(text).expanduser().resolve())


def check_input(text: str) -> tuple[str, str]:
    """Validate ``data.input``: (uri, kind) with kind 'folder' or a manifest kind."""
    if not text:
        raise ConfigError("data.input is empty: pass --input MANIFEST_OR_FOLDER")
    uri = _input_uri(text)
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
    row: dict[str, Any] = {
        "source": where,
        "caption": None,
        "caption_file": None,
        "start": math.nan,
        "end": math.nan,
        "fps": math.nan,
        "error": None,
    }
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
        row = {
            "source": child,
            "caption": None,
            "caption_file": None,
            "start": math.nan,
            "end": math.nan,
            "fps": math.nan,
            "error": None,
        }
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
            yield {
                "source": where,
                "caption": None,
                "caption_file": None,
                "start": math.nan,
                "end": math.nan,
                "fps": math.nan,
                "error": rec,
            }
        else:
            yield _record(base, rec, where)


def _source_datasource(uri: str, kind: str, group_size: int, skip: frozenset[int]) -> Any:
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


# ================================================================ ledger
def _ledger_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Ledger:
        """Outcome of every input (clips or reject), timing, and what the encoder reported."""

        def __init__(self, group_size: int, rejects_file: str = "") -> None:
            self.group_size = group_size
            self.rejects_file = rejects_file  # online mode: rewritten on each new reject
            self.groups: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
            self.failed: dict[int, dict[tuple[int, int], dict[str, Any]]] = defaultdict(dict)
            self.times = {"decode": 0.0, "encode": 0.0}
            self.window: list[float] | None = None  # [first end, last end, first rows]
            self.encoded = 0
            self.encoder: dict[str, Any] | None = None

        def decoded(self, records: list[dict[str, Any]], seconds: float) -> None:
            fresh = []
            for r in records:
                group = self.groups[r["index"] // self.group_size]
                if r["index"] not in group:
                    group[r["index"]] = r
                    fresh.append(r)
            self.times["decode"] += seconds
            self._save_rejects([r for r in fresh if r["reason"]])

        def encode_failed(self, records: list[dict[str, Any]]) -> None:
            for r in records:
                self.failed[r["index"] // self.group_size][(r["index"], r["clip"])] = r
            self._save_rejects(records)

        def encoded_batch(self, rows: int, seconds: float, end: float) -> None:
            # Steady-state window of the encoders: from the end of the first batch (model
            # warm-up excluded) to the end of the last one, idle gaps (starved actors) included.
            if self.window is None:
                self.window = [end, end, rows]
            self.window[1] = max(self.window[1], end)
            self.encoded += rows
            self.times["encode"] += seconds

        def set_encoder(self, info: dict[str, Any]) -> None:
            if self.encoder is None:
                self.encoder = info

        def get_encoder(self) -> dict[str, Any] | None:
            return self.encoder

        def status(self, groups: list[int]) -> dict[int, dict[str, Any]]:
            return {g: self._group(g) for g in groups}

        def pop_group(self, g: int) -> dict[str, Any]:
            out = self._group(g)
            self.groups.pop(g, None)
            self.failed.pop(g, None)
            return out

        def open_groups(self) -> list[int]:
            return sorted(set(self.groups) | set(self.failed))

        def _group(self, g: int) -> dict[str, Any]:
            recs = self.groups.get(g, {})
            failed = self.failed.get(g, {})
            return {
                "inputs": len(recs),
                "expected": sum(r["clips"] for r in recs.values()) - len(failed),
                "rejects": [r for r in recs.values() if r["reason"]] + list(failed.values()),
            }

        def summary(self) -> dict[str, Any]:
            recs = [r for g in self.groups.values() for r in g.values()]
            failed = [r for f in self.failed.values() for r in f.values()]
            return {
                "inputs": len(recs),
                "clips_decoded": sum(r["clips"] for r in recs),
                "rejects": [r for r in recs if r["reason"]] + failed,
                "encoded": self.encoded,
                "times": dict(self.times),
                "steady_clips_per_s": self._steady(),
            }

        def _steady(self) -> float:
            if self.window is None or self.window[1] <= self.window[0]:
                return float("nan")
            return (self.encoded - self.window[2]) / (self.window[1] - self.window[0])

        def _save_rejects(self, new: list[dict[str, Any]]) -> None:
            if not new or not self.rejects_file:
                return
            rows = [{"path": r["source"], "reason": r["reason"]} for r in self.summary()["rejects"]]
            fs, path = lt.filesystem(self.rejects_file)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            lt.write_table(fs, path, lt.rejects_table(rows))

    return Ledger


def _make_ledger(group_size: int, rejects_file: str = "") -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node, so that a local rejects path means this machine.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _ledger_class().options(scheduling_strategy=here).remote(group_size, rejects_file)


# ================================================================ decode (CPU tasks)
def _read_bytes(uri: str) -> bytes:
    fs, path = lt.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _decode_one(row: dict[str, Any], d: dict[str, Any]) -> tuple[list[np.ndarray], str]:
    """(clips, caption) of one source row, or SourceError with the reject reason."""
    if row["error"]:
        raise SourceError(row["error"])
    if row["caption_file"]:
        fs, cpath = lt.filesystem(row["caption_file"])
        if not lt.exists(fs, cpath):
            raise SourceError(f"missing caption file {Path(cpath).name}")
        caption = read_caption(_read_bytes(row["caption_file"]), "caption file")
    else:
        caption = check_caption(row["caption"])
    fs, path = lt.filesystem(row["source"])
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError("missing file")
    if info.type != pafs.FileType.File:
        raise SourceError("not a file")
    if info.size == 0:
        raise SourceError("empty file (0 bytes)")
    local = isinstance(fs, pafs.LocalFileSystem)
    fps = row["fps"] if math.isfinite(row["fps"] or math.nan) else d["target_fps"]

    def opt(v: float) -> float | None:
        return None if v is None or math.isnan(v) else float(v)

    decoded = decode_clips(
        path if local else _read_bytes(row["source"]),
        num_frames=d["num_frames"],
        height=d["height"],
        width=d["width"],
        target_fps=fps,
        clips=d["clips"],
        start=opt(row["start"]),
        end=opt(row["end"]),
    )
    return decoded.clips, caption


def decode_batch(
    batch: dict[str, np.ndarray], geometry: dict[str, Any], ledger: Any
) -> Iterator[dict[str, Any]]:
    """Ray Data UDF: source rows -> clip rows (frames uint8 (N, F, H, W, 3)); rejects go to
    the ledger. Frames stay uint8 until the encoder (4x less object-store traffic)."""
    import ray

    t0 = time.perf_counter()
    out: dict[str, list[Any]] = {k: [] for k in ("frames", "caption", "source", "clip", "index")}
    records = []
    keys = list(batch)
    for i in range(len(batch["index"])):
        row = {
            k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys
        }
        try:
            clips, caption = _decode_one(row, geometry)
            reason = ""
        except SourceError as err:
            clips, caption, reason = [], "", str(err)
        except Exception as err:  # noqa: BLE001 - any other failure of one file is its reject
            clips, caption, reason = [], "", f"decode failed: {type(err).__name__}: {err}"
        if reason:
            log.warning("ingest reject %s: %s", row["source"], reason)
        records.append(
            {
                "index": row["index"],
                "source": row["source"],
                "clips": len(clips),
                "reason": reason,
                "clip": -1,
            }
        )
        for c, frames in enumerate(clips):
            out["frames"].append(frames)
            out["caption"].append(caption)
            out["source"].append(row["source"])
            out["clip"].append(c)
            out["index"].append(row["index"])
    ray.get(ledger.decoded.remote(records, time.perf_counter() - t0))
    if out["frames"]:  # yield nothing for all-reject batches (no empty tensor blocks)
        yield {
            "frames": np.stack(out["frames"]),  # (N, F, H, W, 3) uint8
            "caption": np.asarray(out["caption"], dtype=object),
            "source": np.asarray(out["source"], dtype=object),
            "clip": np.asarray(out["clip"], dtype=np.int32),
            "index": np.asarray(out["index"], dtype=np.int64),
        }


# ================================================================ encode (actor pool)
class Encoder:
    """Ray Data actor: VAE + text encoder loaded once per actor; clip rows -> latent rows."""

    def __init__(self, model: dict[str, Any], ledger: Any, keep_index: bool) -> None:
        import torch

        from dcm.bundle import load_bundle

        self.torch = torch
        self.ledger, self.keep_index = ledger, keep_index
        use_gpu = model["gpus"] > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(model["dtype"])
        self.dtype = dtype or (torch.bfloat16 if use_gpu else torch.float32)
        self.posterior, self.seed = model["posterior"], model["seed"]
        self.bundle = load_bundle(
            model["path"],
            device=self.device,
            dtype=self.dtype,
            components=("vae", "text_encoder"),
            text_max_length=model["text_max_length"],
        )
        empty = self.bundle.null_cond(1)  # computed once; goes to empty_prompt.parquet
        import ray

        ray.get(
            ledger.set_encoder.remote(
                {
                    "backbone": self.bundle.backbone_kind,
                    "vae": type(self.bundle.vae).__name__,
                    "text_encoder": type(self.bundle.text_encoder).__name__,
                    "dtype": str(self.dtype).replace("torch.", ""),
                    "device": self.device.type,
                    "empty_text": empty.text[0].float().cpu().numpy(),  # (L, D)
                    "empty_mask": empty.mask[0].cpu().numpy().astype(np.int8),  # (L,)
                }
            )
        )

    def _encode(
        self, frames: np.ndarray, captions: list[str], index: np.ndarray, clip: np.ndarray
    ) -> dict[str, np.ndarray]:
        torch = self.torch
        # Posterior noise from train.seed and the batch's first clip (reproducible per batch).
        seed = zlib.crc32(f"{self.seed}:{int(index[0])}:{int(clip[0])}".encode())
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # Upload uint8 and convert on the device: 4x less host->device traffic, no CPU pass.
        arr = np.asarray(frames)  # (B, F, H, W, 3) uint8, read-only from the object store
        raw = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(self.device)
        pixels = to_pixels(raw).to(self.dtype)  # (B, 3, F, H, W) in [-1, 1]
        z = self.bundle.encode_video(pixels, self.posterior, gen)  # (B, C, T, h, w) RAW
        cond = self.bundle.encode_text(captions)  # text (B, L, D), mask (B, L)
        return {
            "latents": z.float().cpu().numpy(),
            "text": cond.text.float().cpu().numpy(),
            "text_mask": cond.mask.cpu().numpy().astype(np.int8),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        t0 = time.perf_counter()
        n = len(batch["index"])
        captions = [str(c) for c in batch["caption"]]
        keep = np.ones(n, dtype=bool)
        try:
            enc = self._encode(batch["frames"], captions, batch["index"], batch["clip"])
        except Exception:  # noqa: BLE001 - retry row by row so one bad clip costs only itself
            parts, failed = [], []
            for i in range(n):
                try:
                    parts.append(
                        self._encode(
                            batch["frames"][i : i + 1],
                            captions[i : i + 1],
                            batch["index"][i : i + 1],
                            batch["clip"][i : i + 1],
                        )
                    )
                except Exception as err:  # noqa: BLE001
                    keep[i] = False
                    reason = f"encode failed: {type(err).__name__}: {err}"
                    log.warning(
                        "ingest reject %s clip %d: %s", batch["source"][i], batch["clip"][i], reason
                    )
                    failed.append(
                        {
                            "index": int(batch["index"][i]),
                            "source": str(batch["source"][i]),
                            "clip": int(batch["clip"][i]),
                            "clips": 0,
                            "reason": reason,
                        }
                    )
            ray.get(self.ledger.encode_failed.remote(failed))
            enc = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        done = int(keep.sum())
        ray.get(self.ledger.encoded_batch.remote(done, time.perf_counter() - t0, time.time()))
        if enc is None:  # every clip failed: yield nothing (no empty tensor blocks)
            return
        out = dict(enc)
        out["caption"] = np.asarray(captions, dtype=object)[keep]
        out["source"] = np.asarray(batch["source"], dtype=object)[keep]
        out["clip"] = np.asarray(batch["clip"], dtype=np.int32)[keep]
        if self.keep_index:
            out["index"] = np.asarray(batch["index"], dtype=np.int64)[keep]
        yield out


# ================================================================ the pipeline
def _decode_memory(cfg: Config) -> int:
    d = cfg.data
    clip_bytes = d.num_frames * d.height * d.width * 3
    return int(3 * clip_bytes * d.clips_per_video + (256 << 20))  # + interpreter, decord, arrow


def _group_size(cfg: Config) -> int:
    return max(1, cfg.ingest.rows_per_shard // cfg.data.clips_per_video)


def _build(
    cfg: Config, ledger: Any, uri: str, kind: str, skip: frozenset[int], keep_index: bool
) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    d, ing = cfg.data, cfg.ingest
    geometry = {
        "num_frames": d.num_frames,
        "height": d.height,
        "width": d.width,
        "target_fps": d.target_fps,
        "clips": d.clips_per_video,
    }
    model = {
        "path": cfg.model.path,
        "dtype": cfg.model.dtype,
        "gpus": ing.actor_gpus,
        "posterior": d.posterior,
        "seed": cfg.train.seed,
        "text_max_length": cfg.model.text_max_length,
    }
    sources = ray.data.read_datasource(
        _source_datasource(uri, kind, _group_size(cfg), skip),
        num_cpus=min(0.1, ing.decode_cpus / 2),
    )
    clips = sources.map_batches(
        decode_batch,
        batch_size=1,
        num_cpus=ing.decode_cpus,
        fn_kwargs={"geometry": geometry, "ledger": ledger},
        # The reservation covers a task's clips (uint8) plus decoder buffers; declaring it also
        # keeps decode in its own CPU tasks instead of fused into the (scarcer) encoder actors.
        memory=_decode_memory(cfg),
    )
    return clips.map_batches(
        Encoder,
        batch_size=ing.encode_batch_size,
        compute=ActorPoolStrategy(size=ing.encode_actors),
        num_cpus=ing.actor_cpus,
        num_gpus=ing.actor_gpus,
        fn_constructor_kwargs={"model": model, "ledger": ledger, "keep_index": keep_index},
    )


def check_model(cfg: Config) -> Any:
    """The bundle's configs alone (no weights), so a bad --model fails before Ray starts."""
    from dcm.bundle import load_bundle

    geo = load_bundle(cfg.model.path, components=())
    if geo.backbone_kind != "wan":
        raise ConfigError(
            f"model.path '{cfg.model.path}' is a {geo.backbone_kind} bundle: ingest encodes "
            "captions with Bundle.encode_text, which supports Wan bundles only"
        )
    return geo


def latents_dir(cfg: Config) -> str:
    """``ingest.out`` or ``<train.out>/<run_name>/latents``."""
    if cfg.ingest.out:
        return _input_uri(cfg.ingest.out)
    return _input_uri(str(Path(cfg.train.out) / cfg.run_name / "latents"))


def _fingerprint(cfg: Config, uri: str) -> dict[str, Any]:
    """Settings that change what a shard holds; a resume must match them."""
    d = cfg.data
    return {
        "data.input": uri,
        "model.path": cfg.model.path,
        "model.text_max_length": cfg.model.text_max_length,
        "data.num_frames": d.num_frames,
        "data.height": d.height,
        "data.width": d.width,
        "data.target_fps": d.target_fps,
        "data.clips_per_video": d.clips_per_video,
        "data.posterior": d.posterior,
        "group_size": _group_size(cfg),
        "train.seed": cfg.train.seed,
    }


def _prepare_out(fs: pafs.FileSystem, base: str, fingerprint: dict[str, Any]) -> dict[int, dict]:
    """Create the folder, check a previous run's settings, load its done records."""
    state_dir = lt.join(base, STATE_DIR)
    fs.create_dir(state_dir, recursive=True)
    state = lt.join(state_dir, "state.json")
    if lt.exists(fs, state):
        with fs.open_input_stream(state) as f:
            old = json.loads(f.read().decode())
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"ingest.out '{base}' holds latents made with {k}={old.get(k)!r}, not "
                f"{fingerprint[k]!r}: use another --out or delete that folder"
            )
    else:
        lt.write_atomic(fs, state, json.dumps(fingerprint, indent=2).encode())
    done = {}
    for info in fs.get_file_info(pafs.FileSelector(state_dir)):
        if info.base_name.startswith("done-") and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                rec = json.loads(f.read().decode())
            done[int(rec["group"])] = rec
    return done


@dataclass
class IngestSummary:
    """What ``run_ingest`` did; counts cover the whole folder (resumed groups included)."""

    out: str
    inputs: int
    videos: int
    clips: int
    rejects: int
    shards: int
    resumed_groups: int
    seconds: float
    clips_per_s: float
    decode_s: float
    encode_s: float
    reconciled: bool

    def line(self) -> str:
        return (
            f"[dcm ingest] {self.videos} videos, {self.clips} clips, {self.rejects} rejects "
            f"({self.inputs} inputs{', reconciled' if self.reconciled else ', NOT reconciled'}) in "
            f"{self.seconds:.1f} s: {self.clips_per_s:.2f} clips/s (decode {self.decode_s:.1f} s, "
            f"encode {self.encode_s:.1f} s of task time); {self.shards} shards in {self.out}"
        )


def _flush(
    fs: pafs.FileSystem,
    base: str,
    g: int,
    rows: list[dict[str, np.ndarray]],
    status: dict[str, Any],
) -> dict[str, Any]:
    """Write group g's shard (if it has clips) and then its done record."""
    file = None
    videos: set[int] = set()
    n = 0
    if rows:
        cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        order = np.lexsort((cat["clip"], cat["index"]))  # deterministic row order
        cat = {k: v[order] for k, v in cat.items()}
        videos = {int(i) for i in cat["index"]}
        n = len(order)
        file = f"shard-{g:05d}.parquet"
        lt.write_table(fs, lt.join(base, file), lt.rows_to_table(cat))
    rejected = {r["index"] for r in status["rejects"]} - videos
    rec = {
        "group": g,
        "file": file,
        "rows": n,
        "inputs": status["inputs"],
        "videos": len(videos),
        "rejected_inputs": len(rejected),
        "rejects": [{"path": r["source"], "reason": r["reason"]} for r in status["rejects"]],
    }
    lt.write_atomic(fs, lt.join(base, STATE_DIR, f"done-{g:05d}.json"), json.dumps(rec).encode())
    return rec


def run_ingest(cfg: Config) -> IngestSummary:
    """Ingest ``data.input`` into parquet shards + manifest.json + rejects.parquet."""
    import ray

    from pipelines.cluster import init_ray, shutdown

    uri, kind = check_input(cfg.data.input)
    out = latents_dir(cfg)
    fs, base = lt.filesystem(out)
    gsize = _group_size(cfg)
    done = _prepare_out(fs, base, _fingerprint(cfg, uri))
    resumed = len(done)
    geo = check_model(cfg)
    latent_shape = geo.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    ctx = init_ray(cfg.ray)
    t0 = time.perf_counter()
    try:
        ledger = _make_ledger(gsize)
        ds = _build(cfg, ledger, uri, kind, frozenset(done), keep_index=True)
        buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        got: dict[int, int] = defaultdict(int)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            groups = batch["index"] // gsize
            for g in np.unique(groups):
                sel = groups == g
                buffers[int(g)].append({k: v[sel] for k, v in batch.items()})
                got[int(g)] += int(sel.sum())
            # A full group whose clips have all arrived is final: write it now (resumable).
            status = ray.get(ledger.status.remote(list(buffers)))
            for g, st in status.items():
                if st["inputs"] == gsize and got[g] == st["expected"]:
                    done[g] = _flush(
                        fs, base, g, buffers.pop(g), ray.get(ledger.pop_group.remote(g))
                    )
        for g in ray.get(ledger.open_groups.remote()):  # the rest (the last group, all-reject ones)
            done[g] = _flush(fs, base, g, buffers.pop(g, []), ray.get(ledger.pop_group.remote(g)))
        summary = ray.get(ledger.summary.remote())
        encoder = ray.get(ledger.get_encoder.remote())
    finally:
        shutdown(ctx)
    seconds = time.perf_counter() - t0
    recs = [done[g] for g in sorted(done)]
    rejects = [r for rec in recs for r in rec["rejects"]]
    lt.write_table(fs, lt.join(base, lt.REJECTS), lt.rejects_table(rejects))
    empty_path = lt.join(base, lt.EMPTY_PROMPT)
    text_shape = [cfg.model.text_max_length, 0]
    if encoder is not None:
        text_shape = list(encoder["empty_text"].shape)
        lt.write_table(
            fs, empty_path, lt.empty_prompt_table(encoder["empty_text"], encoder["empty_mask"])
        )
    elif lt.exists(fs, lt.join(base, lt.MANIFEST)):
        text_shape = list(lt.read_manifest(out).text_shape)
    counts = {
        "inputs": sum(r["inputs"] for r in recs),
        "videos": sum(r["videos"] for r in recs),
        "clips": sum(r["rows"] for r in recs),
        "rejects": len(rejects),
        "rejected_inputs": sum(r["rejected_inputs"] for r in recs),
        "shards": sum(1 for r in recs if r["file"]),
    }
    enc_info = {k: v for k, v in (encoder or {}).items() if not k.startswith("empty_")}
    manifest = lt.LatentManifest(
        encoder={
            "model": cfg.model.path,
            "posterior": cfg.data.posterior,
            "text_max_length": cfg.model.text_max_length,
            **enc_info,
        },
        normalisation=lt.describe_normalisation(geo.backbone_kind, geo.vae_config),
        latent_shape=tuple(latent_shape),
        text_shape=tuple(text_shape),
        video={
            "num_frames": cfg.data.num_frames,
            "height": cfg.data.height,
            "width": cfg.data.width,
            "target_fps": cfg.data.target_fps,
            "clips_per_video": cfg.data.clips_per_video,
        },
        counts=counts,
        shards=[{"file": r["file"], "rows": r["rows"]} for r in recs if r["file"]],
    )
    lt.write_manifest(out, manifest)
    clips_now = summary["encoded"]
    result = IngestSummary(
        out=out,
        inputs=counts["inputs"],
        videos=counts["videos"],
        clips=counts["clips"],
        rejects=counts["rejects"],
        shards=counts["shards"],
        resumed_groups=resumed,
        seconds=seconds,
        clips_per_s=clips_now / max(seconds, 1e-9),
        decode_s=summary["times"]["decode"],
        encode_s=summary["times"]["encode"],
        reconciled=counts["inputs"] == counts["videos"] + counts["rejected_inputs"],
    )
    print(result.line(), flush=True)
    return result


# ================================================================ online + reading
def stream_latents(cfg: Config) -> Any:
    """The online ingest stream: a ``ray.data.Dataset`` of latent rows (no files written).

    Rejects are logged by the decode tasks, counted by the ledger (``stream_summary(ds)``)
    and, when ``ingest.out`` is set, written to ``<ingest.out>/rejects.parquet``.
    """
    from pipelines.cluster import init_ray

    uri, kind = check_input(cfg.data.input)
    check_model(cfg)
    init_ray(cfg.ray)
    rejects_file = lt.join(_input_uri(cfg.ingest.out), lt.REJECTS) if cfg.ingest.out else ""
    ledger = _make_ledger(_group_size(cfg), rejects_file)
    ds = _build(cfg, ledger, uri, kind, frozenset(), keep_index=False)
    ds._dcm_ingest_ledger = ledger  # keeps the ledger alive as long as the dataset
    return ds


def stream_summary(ds: Any) -> dict[str, Any]:
    """Counts of an online stream so far: inputs, videos, clips, rejects (path, reason)."""
    import ray

    ledger = getattr(ds, "_dcm_ingest_ledger", None)
    if ledger is None:
        raise ValueError("this dataset does not come from stream_latents")
    s = ray.get(ledger.summary.remote())
    rejected = {r["index"] for r in s["rejects"]}
    return {
        "inputs": s["inputs"],
        "videos": s["inputs"] - len(rejected),
        "clips_decoded": s["clips_decoded"],
        "rejects": [{"path": r["source"], "reason": r["reason"]} for r in s["rejects"]],
        "times": s["times"],
        "steady_clips_per_s": s["steady_clips_per_s"],
    }


def _unflatten(
    table: pa.Table, latent_shape: list[int], text_shape: list[int]
) -> dict[str, np.ndarray]:
    return lt.table_to_rows(table, tuple(latent_shape), tuple(text_shape))


def read_latents(path: str | Path) -> Any:
    """A finished parquet latents folder as a ``ray.data.Dataset`` of latent rows."""
    import ray

    manifest = lt.read_manifest(path)
    files = lt.shard_paths(path, manifest)
    if not files:
        raise lt.LatentsError(
            f"'{path}' holds no clips (every input was rejected; see {lt.REJECTS})"
        )
    fs, _ = lt.filesystem(path)
    ds = ray.data.read_parquet(files, filesystem=fs, num_cpus=0.25)
    return ds.select_columns(list(lt.COLUMNS)).map_batches(
        _unflatten,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
        fn_kwargs={
            "latent_shape": list(manifest.latent_shape),
            "text_shape": list(manifest.text_shape),
        },
    )


# ================================================================ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcm ingest", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input", help="manifest (JSONL/CSV/parquet) or folder of videos (data.input)"
    )
    parser.add_argument("--model", help="bundle folder or 'bundled:shapes' (model.path)")
    parser.add_argument("--out", help="output folder or URI (ingest.out)")
    pipelines.args.add_common(parser)
    args = parser.parse_args(argv)
    cfg = pipelines.args.resolve(
        args, **{"data.input": args.input, "model.path": args.model, "ingest.out": args.out}
    )
    try:
        summary = run_ingest(cfg)
    except lt.LatentsError as err:
        raise ConfigError(str(err)) from None
    return 0 if summary.reconciled else 1


if __name__ == "__main__":
    sys.exit(pipelines.args.run_main(main))
