"""`dcm export`: a distilled artifact as a stock diffusers folder or a LoRA file.

    dcm export --model runs/x/artifact --format diffusers --out exported/
    dcm export --model runs/x/artifact --format lora --out exported-lora/
    dcm export --model models:/dcm-shapes/1 --format diffusers --out exported/

No Ray here. ``--model`` takes an artifact folder or a ``models:/NAME/VERSION`` /
``runs:/`` URI of a registered model (fetched with ``pipelines.registry``). Sampling
defaults the artifact does not record (frames, size, text length) come from the config
(``--preset``, ``--config``, ``--set``). The folder's README.md says how to sample it.
"""

from __future__ import annotations

import argparse
import json
import sys

from dcm.config import ConfigError
from pipelines.args import add_common, resolve, run_main

FORMATS = ("diffusers", "lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcm export",
        description="Export a distilled artifact as a diffusers pipeline folder or a LoRA file.",
    )
    p.add_argument("--model", required=True, help="distilled artifact folder or models:/NAME/VER")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="what to write")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="weights on disk for --format diffusers (default float32, the master weights)",
    )  # fmt: skip
    return add_common(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    from dcm.export import export_diffusers, export_lora
    from pipelines.registry import local_model

    source = local_model(args.model, cfg.tracking.uri, part="artifact")
    if args.format == "diffusers":
        out = export_diffusers(source, args.out, cfg, overwrite=args.overwrite, dtype=args.dtype)
    elif args.dtype != "float32":
        raise ConfigError("--dtype applies to --format diffusers; a LoRA is written in float32")
    else:
        out = export_lora(source, args.out, cfg, overwrite=args.overwrite)
    print(json.dumps({"format": args.format, "out": str(out), "source": str(source)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
