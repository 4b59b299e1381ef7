"""`dcm ingest`: raw videos + captions -> latent rows, as parquet shards or a live stream.

Ray Data pipeline (DESIGN.md, data flow):

    list sources (one streaming read task: manifest rows or a folder walk)   sources.py
      -> decode clips (CPU tasks, decord; dcm.decode)                        decode.py
      -> encode (actor pool: VAE + text encoder loaded once per actor)       encoder.py
      -> parquet mode: write shards (CPU tasks beside the encoders)          writer.py
         + done records, manifest.json, rejects.parquet (the driver)         shards.py, run.py
      or online mode: the same rows streamed into training                  stream.py

Bad inputs never stop the job: the decode and encode stages report every source's outcome
to a small ledger actor (ledger.py), which keeps the rejects (path + reason) and the counts
that must reconcile: inputs = sources with encoded clips + rejected sources.

Resumable parquet output (shards.py): inputs are cut, in listing order, into groups of
``max(1, ingest.rows_per_shard // data.clips_per_video)``. Writer tasks write each group's
rows as ``shard-<group>-<first input>-<first clip>.parquet`` files; once every source of a
group is accounted for, the driver writes the group's done record ``_ingest/done-<g>.json``
(its files, counts and rejects). A re-run with the same settings skips finished groups at
listing time (no decoding) and deletes the files of unfinished ones, which it writes again.
"""

from __future__ import annotations

from pipelines.ingest.cli import main
from pipelines.ingest.pipeline import check_model, latents_dir
from pipelines.ingest.run import run_ingest
from pipelines.ingest.shards import STATE_DIR, IngestSummary
from pipelines.ingest.sources import check_input, iter_sources
from pipelines.ingest.stream import read_latents, stream_latents, stream_summary

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
