"""The Ray Data graph of ingest: listing -> decode tasks -> encoder actors [-> writer tasks].

``build`` is shared by both modes: online mode stops at the encoders (latent rows go to
training), parquet mode adds the writer tasks (only small records of what was written go
on to the driver).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcm.config import Config, ConfigError
from pipelines.ingest.decode import decode_batch
from pipelines.ingest.encoder import Encoder
from pipelines.ingest.shards import group_size, storage_dtype
from pipelines.ingest.sources import input_uri, source_datasource
from pipelines.ingest.writer import WRITE_CPUS, write_batch


def decode_memory(cfg: Config) -> int:
    """Bytes a decode task reserves: its clips (uint8) plus decoder buffers."""
    d = cfg.data
    clip_bytes = d.num_frames * d.height * d.width * 3
    return int(3 * clip_bytes * d.clips_per_video + (256 << 20))  # + interpreter, decord, arrow


def encoder_gpus(cfg: Config) -> float:
    """``ingest.actor_gpus``, with 'auto' = one GPU per encoder actor when the cluster has one."""
    from pipelines.cluster import actor_gpus

    return actor_gpus(cfg.ingest.actor_gpus)


def build(
    cfg: Config,
    ledger: Any,
    uri: str,
    kind: str,
    skip: frozenset[int],
    out: str | None = None,
) -> Any:
    """The dataset of ``data.input``'s latent rows (online), or with ``out`` (parquet mode) of
    one small record per clip written there: index, clip, file, pid, node."""
    import ray
    from ray.data import ActorPoolStrategy

    d, ing = cfg.data, cfg.ingest
    gpus = encoder_gpus(cfg)
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
        "gpus": gpus,
        "posterior": d.posterior,
        "seed": cfg.train.seed,
        "text_max_length": cfg.model.text_max_length,
    }
    sources = ray.data.read_datasource(
        source_datasource(uri, kind, group_size(cfg), skip),
        num_cpus=min(0.1, ing.decode_cpus / 2),
    )
    clips = sources.map_batches(
        decode_batch,
        batch_size=1,
        num_cpus=ing.decode_cpus,
        fn_kwargs={"geometry": geometry, "ledger": ledger},
        # The reservation covers a task's clips (uint8) plus decoder buffers; declaring it also
        # keeps decode in its own CPU tasks instead of fused into the (scarcer) encoder actors.
        memory=decode_memory(cfg),
    )
    rows = clips.map_batches(
        Encoder,
        batch_size=ing.encode_batch_size,
        compute=ActorPoolStrategy(size=ing.encode_actors),
        num_cpus=ing.actor_cpus,
        num_gpus=gpus,
        fn_constructor_kwargs={"model": model, "ledger": ledger, "keep_index": out is not None},
    )
    if out is None:
        return rows
    # Writer tasks take about rows_per_shard rows each and write them where they run (the
    # encoders' node when it has room), so latents never travel to the driver.
    return rows.map_batches(
        write_batch,
        batch_size=ing.rows_per_shard,
        num_cpus=WRITE_CPUS,
        fn_kwargs={"out": out, "group_size": group_size(cfg), "dtype": storage_dtype(cfg)},
    )


def check_model(cfg: Config) -> Any:
    """The bundle's configs alone (no weights), so a bad --model fails before Ray starts."""
    from dcm.bundle import load_bundle

    geo = load_bundle(cfg.model.path, components=())
    if geo.backbone_kind != cfg.model.backbone:
        raise ConfigError(
            f"model.path '{cfg.model.path}' is a {geo.backbone_kind} bundle but "
            f"model.backbone is '{cfg.model.backbone}': use the {geo.backbone_kind} preset"
        )
    return geo


def latents_dir(cfg: Config) -> str:
    """``ingest.out`` or ``<train.out>/<run_name>/latents``."""
    if cfg.ingest.out:
        return input_uri(cfg.ingest.out)
    return input_uri(str(Path(cfg.train.out) / cfg.run_name / "latents"))
