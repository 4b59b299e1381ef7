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

The stages live beside this file: ``ingest_sources`` (listing), ``ingest_decode``,
``ingest_encoder``, ``ingest_ledger`` and ``ingest_shards`` (the resumable parquet folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

import pipelines.args
from dcm import latents as lt
from dcm.config import Config, ConfigError
from pipelines.ingest_decode import _decode_one as _decode_one
from pipelines.ingest_decode import decode_batch
from pipelines.ingest_encoder import Encoder
from pipelines.ingest_ledger import make_ledger, reject_rows
from pipelines.ingest_shards import (
    STATE_DIR,
    IngestSummary,
    fingerprint,
    finish_folder,
    flush_group,
    group_size,
    prepare_out,
)
from pipelines.ingest_sources import check_input, input_uri, iter_sources, source_datasource

# What other code imports from here (tests, distill, benchmarks) stays importable from here.
__all__ = [
    "STATE_DIR",
    "IngestSummary",
    "check_input",
    "check_model",
    "iter_sources",
    "latents_dir",
    "main",
    "read_latents",
    "run_ingest",
    "stream_latents",
    "stream_summary",
]


# ================================================================ the pipeline
def _decode_memory(cfg: Config) -> int:
    d = cfg.data
    clip_bytes = d.num_frames * d.height * d.width * 3
    return int(3 * clip_bytes * d.clips_per_video + (256 << 20))  # + interpreter, decord, arrow


def _build(
    cfg: Config, ledger: Any, uri: str, kind: str, skip: frozenset[int], keep_index: bool
) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    d, ing = cfg.data, cfg.ingest
    gpus = ing.actor_gpus
    if gpus == "auto":  # one GPU per encoder actor when the cluster has GPUs
        from pipelines.cluster import cluster_gpus

        gpus = 1.0 if cluster_gpus() >= 1 else 0.0
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
        memory=_decode_memory(cfg),
    )
    return clips.map_batches(
        Encoder,
        batch_size=ing.encode_batch_size,
        compute=ActorPoolStrategy(size=ing.encode_actors),
        num_cpus=ing.actor_cpus,
        num_gpus=gpus,
        fn_constructor_kwargs={"model": model, "ledger": ledger, "keep_index": keep_index},
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


# ================================================================ parquet output
def run_ingest(cfg: Config) -> IngestSummary:
    """Ingest ``data.input`` into parquet shards + manifest.json + rejects.parquet."""
    import ray

    from pipelines.cluster import init_ray, shutdown

    uri, kind = check_input(cfg.data.input)
    out = latents_dir(cfg)
    fs, base = lt.filesystem(out)
    gsize = group_size(cfg)
    done = prepare_out(fs, base, fingerprint(cfg, uri))
    resumed = len(done)
    geo = check_model(cfg)
    latent_shape = geo.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    ctx = init_ray(cfg.ray, model=cfg.model.path)
    t0 = time.perf_counter()
    try:
        ledger = make_ledger(gsize)
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
                    done[g] = flush_group(
                        fs, base, g, buffers.pop(g), ray.get(ledger.pop_group.remote(g))
                    )
        for g in ray.get(ledger.open_groups.remote()):  # the rest (the last group, all-reject ones)
            done[g] = flush_group(
                fs, base, g, buffers.pop(g, []), ray.get(ledger.pop_group.remote(g))
            )
        summary = ray.get(ledger.summary.remote())
        encoder = ray.get(ledger.get_encoder.remote())
    finally:
        shutdown(ctx)
    seconds = time.perf_counter() - t0
    counts = finish_folder(cfg, out, geo, latent_shape, done, encoder)
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
    init_ray(cfg.ray, model=cfg.model.path)
    rejects_file = lt.join(input_uri(cfg.ingest.out), lt.REJECTS) if cfg.ingest.out else ""
    ledger = make_ledger(group_size(cfg), rejects_file)
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
        "rejects": reject_rows(s["rejects"]),
        "times": s["times"],
        "steady_clips_per_s": s["steady_clips_per_s"],
    }


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
    return ds.select_columns(lt.columns(manifest.pooled_dim)).map_batches(
        lt.table_to_rows,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
        fn_kwargs={
            "latent_shape": manifest.latent_shape,
            "text_shape": manifest.text_shape,
            "pooled_dim": manifest.pooled_dim,
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
