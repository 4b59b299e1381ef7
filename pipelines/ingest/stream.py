"""Online mode and reading: latent rows as a ``ray.data.Dataset``, live or from parquet.

``stream_latents``: the dataset carries only clip rows, so rejects are logged as warnings by
the decode tasks, kept by the ledger (``stream_summary(ds)``), and written to
``<ingest.out>/rejects.parquet`` when ``ingest.out`` is set. Each epoch re-decodes and
re-encodes (fresh posterior samples); the ledger counts every input once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcm import latents as lt
from dcm.config import Config
from pipelines.ingest.ledger import make_ledger, reject_rows
from pipelines.ingest.pipeline import build, check_model
from pipelines.ingest.shards import group_size
from pipelines.ingest.sources import check_input, input_uri


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
    ds = build(cfg, ledger, uri, kind, frozenset())
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
    """A finished parquet latents folder as a ``ray.data.Dataset`` of float32 latent rows."""
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
