"""The `dcm ingest` command line: flags -> Config -> ``run_ingest`` (parquet mode)."""

from __future__ import annotations

import argparse

import pipelines.args
from dcm import latents as lt
from dcm.config import ConfigError
from pipelines.ingest.run import run_ingest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcm ingest", description="raw videos + captions -> latent parquet shards"
    )
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
    print(summary.out)  # the command's result: the latents folder (logged line has the counts)
    return 0 if summary.reconciled else 1
