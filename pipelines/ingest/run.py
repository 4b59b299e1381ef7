"""Parquet mode: ``run_ingest`` drives the pipeline into a resumable latents folder.

The writer tasks write the shards (writer.py); this driver only sees one small record per
clip written, asks the ledger whether each group is complete and writes the group's done
record, then the folder's manifest.json, rejects.parquet and empty_prompt.parquet.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import closing

import numpy as np

from dcm import latents as lt
from dcm.config import Config
from pipelines.ingest.ledger import make_ledger
from pipelines.ingest.pipeline import build, check_model, latents_dir
from pipelines.ingest.shards import (
    IngestSummary,
    close_group,
    fingerprint,
    finish_folder,
    group_size,
    prepare_out,
)
from pipelines.ingest.sources import check_input

log = logging.getLogger(__name__)


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
        ds = build(cfg, ledger, uri, kind, frozenset(done), out=out)
        # writer records (index, clip, file, pid, node) of the groups not yet closed
        written: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        got: dict[int, int] = defaultdict(int)
        # closed on any exit: an interrupted driver stops its pipeline (no late writes)
        with closing(iter(ds.iter_batches(batch_size=None, batch_format="numpy"))) as batches:
            for batch in batches:
                groups = batch["index"] // gsize
                for g in np.unique(groups):
                    sel = groups == g
                    written[int(g)].append({k: v[sel] for k, v in batch.items()})
                    got[int(g)] += int(sel.sum())
                # A full group whose clips are all written is final: close it now (resumable).
                status = ray.get(ledger.status.remote(list(written)))
                for g, st in status.items():
                    if st["inputs"] == gsize and got[g] == st["expected"]:
                        recs = _concat(written.pop(g))
                        done[g] = close_group(
                            fs, base, g, recs, ray.get(ledger.pop_group.remote(g))
                        )
        for g in ray.get(ledger.open_groups.remote()):  # the rest (the last group, all-reject ones)
            recs = _concat(written.pop(g, []))
            done[g] = close_group(fs, base, g, recs, ray.get(ledger.pop_group.remote(g)))
        summary = ray.get(ledger.summary.remote())
        encoder = ray.get(ledger.get_encoder.remote())
    finally:
        shutdown(ctx)
    seconds = time.perf_counter() - t0
    counts = finish_folder(cfg, out, geo, latent_shape, done, encoder)
    result = IngestSummary(
        out=out,
        inputs=counts["inputs"],
        videos=counts["videos"],
        clips=counts["clips"],
        rejects=counts["rejects"],
        shards=counts["shards"],
        resumed_groups=resumed,
        seconds=seconds,
        clips_per_s=summary["encoded"] / max(seconds, 1e-9),
        decode_s=summary["times"]["decode"],
        encode_s=summary["times"]["encode"],
        reconciled=counts["inputs"] == counts["videos"] + counts["rejected_inputs"],
    )
    log.info("%s", result.line())
    return result


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
