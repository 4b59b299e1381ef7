"""Ingest's resumable parquet folder: settings check, shard groups, done records, manifest.

Inputs are cut, in listing order, into groups of ``group_size``. The writer tasks write a
group's rows as one or more ``shard-<g>-*.parquet`` files; when every input of the group is
accounted for, the driver writes the group's done record ``_ingest/done-<g>.json`` (its
files, counts and rejects), atomically and after its files. ``_ingest/state.json`` holds the
settings that change what a shard holds; a re-run must match them, skips the groups already
done and deletes the files of groups without a done record (an interrupted run's partial
groups, written again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from dcm import latents as lt
from dcm.config import Config, ConfigError
from dcm.files import write_atomic
from pipelines.ingest.ledger import reject_rows
from pipelines.ingest.writer import shard_group

STATE_DIR = "_ingest"


def group_size(cfg: Config) -> int:
    """Inputs per shard group: about ``ingest.rows_per_shard`` clips per shard."""
    return max(1, cfg.ingest.rows_per_shard // cfg.data.clips_per_video)


def storage_dtype(cfg: Config) -> str:
    """The float dtype of stored latents/text (``ingest.dtype``; docs/ARCHITECTURE.md)."""
    return cfg.ingest.dtype


def fingerprint(cfg: Config, uri: str) -> dict[str, Any]:
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
        "group_size": group_size(cfg),
        "train.seed": cfg.train.seed,
        "ingest.dtype": storage_dtype(cfg),
    }


def prepare_out(fs: pafs.FileSystem, base: str, fingerprint: dict[str, Any]) -> dict[int, dict]:
    """Create the folder, check a previous run's settings, load its done records and delete
    the shard files of groups that have none (written again by this run)."""
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
        write_atomic(state, json.dumps(fingerprint, indent=2), fs)
    done = {}
    for info in fs.get_file_info(pafs.FileSelector(state_dir)):
        if info.base_name.startswith("done-") and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                rec = json.loads(f.read().decode())
            done[int(rec["group"])] = rec
    for info in fs.get_file_info(pafs.FileSelector(base)):
        g = shard_group(info.base_name)
        if g is not None and (g not in done or ".tmp-" in info.base_name):
            fs.delete_file(info.path)
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


def close_group(
    fs: pafs.FileSystem,
    base: str,
    g: int,
    written: dict[str, np.ndarray],
    status: dict[str, Any],
) -> dict[str, Any]:
    """Write group g's done record from the writer records of its rows (index, clip, file,
    pid, node; possibly none) and the ledger's status of the group."""
    videos = {int(i) for i in written.get("index", [])}
    files: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(written.get("file", [])):
        rec = files.setdefault(
            str(name),
            {
                "file": str(name),
                "rows": 0,
                "pid": int(written["pid"][i]),
                "node": str(written["node"][i]),
            },
        )
        rec["rows"] += 1
    rejected = {r["index"] for r in status["rejects"]} - videos
    rec = {
        "group": g,
        "files": [files[k] for k in sorted(files)],
        "rows": sum(f["rows"] for f in files.values()),
        "inputs": status["inputs"],
        "videos": len(videos),
        "rejected_inputs": len(rejected),
        "rejects": reject_rows(status["rejects"]),
    }
    write_atomic(lt.join(base, STATE_DIR, f"done-{g:05d}.json"), json.dumps(rec), fs)
    return rec


def finish_folder(
    cfg: Config,
    out: str,
    geo: Any,
    latent_shape: Any,
    done: dict[int, dict[str, Any]],
    encoder: dict[str, Any] | None,
) -> dict[str, int]:
    """Write rejects.parquet, empty_prompt.parquet and manifest.json from every group's done
    record (this run's and resumed ones); return the folder's counts."""
    fs, base = lt.filesystem(out)
    dtype = storage_dtype(cfg)
    recs = [done[g] for g in sorted(done)]
    shards = [{"file": f["file"], "rows": f["rows"]} for rec in recs for f in rec["files"]]
    rejects = [r for rec in recs for r in rec["rejects"]]
    lt.write_table(fs, lt.join(base, lt.REJECTS), lt.rejects_table(rejects))
    empty_path = lt.join(base, lt.EMPTY_PROMPT)
    text_shape = [cfg.model.text_max_length, 0]
    pooled_dim = 0
    if encoder is not None:
        text_shape = list(encoder["empty_text"].shape)
        pooled = encoder.get("empty_pooled")
        pooled_dim = 0 if pooled is None else int(pooled.shape[0])
        lt.write_table(
            fs,
            empty_path,
            lt.empty_prompt_table(encoder["empty_text"], encoder["empty_mask"], pooled),
        )
    elif lt.exists(fs, lt.join(base, lt.MANIFEST)):
        old = lt.read_manifest(out)
        text_shape, pooled_dim = list(old.text_shape), old.pooled_dim
    counts = {
        "inputs": sum(r["inputs"] for r in recs),
        "videos": sum(r["videos"] for r in recs),
        "clips": sum(r["rows"] for r in recs),
        "rejects": len(rejects),
        "rejected_inputs": sum(r["rejected_inputs"] for r in recs),
        "shards": len(shards),
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
        shards=shards,
        pooled_dim=pooled_dim,
        dtype=dtype,
    )
    lt.write_manifest(out, manifest)
    return counts
