"""Flags shared by every stage: `--config FILE --preset NAME --set a.b=c --dry-run --explain`.

Stage-specific flags (`--input`, `--out`, ...) map onto dotted config keys through
`resolve(args, **{"data.input": args.input})`, so the Config stays the only thing threaded
through the code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dcm.config import Config, ConfigError, artifact_base, explain, load_config
from dcm.files import is_remote
from pipelines.tracking import SQLITE


def add_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the config flags every stage accepts."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help="experiment YAML (pipelines/configs/)")
    group.add_argument(
        "--preset", metavar="NAME", help="start from this preset instead of the file's"
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set method.split=30 (repeatable)",
    )
    group.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    group.add_argument(
        "--explain", action="store_true", help="with --dry-run: list every key with its doc"
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only (DCM_LOG=warning)"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", help="log debug lines too (DCM_LOG=debug)"
    )
    return parser


class _ShortFormatter(logging.Formatter):
    """``12:03:07 I distill: message``: time, level initial, module without the package."""

    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.removeprefix("pipelines.").removeprefix("dcm.")
        return super().format(record)


def setup_logging(argv: list[str] | None = None) -> None:
    """Configure logging once, for a command run from the terminal: one line per record on
    stderr (stdout carries the command's result). The level comes from ``-q``/``-v`` in
    ``argv`` or the DCM_LOG environment variable (debug, info, warning); debug applies to
    this project's modules only, not to every library."""
    argv = argv or []
    level = os.environ.get("DCM_LOG", "info").upper()
    if "-q" in argv or "--quiet" in argv:
        level = "WARNING"
    if "-v" in argv or "--verbose" in argv:
        level = "DEBUG"
    ours = getattr(logging, level, logging.INFO)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "dcm", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.dcm = True  # type: ignore[attr-defined]
    handler.setFormatter(
        _ShortFormatter("%(asctime)s %(levelname).1s %(short)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(max(ours, logging.INFO))
    for name in ("pipelines", "dcm", "serve"):
        logging.getLogger(name).setLevel(ours)


def data_keys(data: str | None) -> dict[str, Any]:
    """Dotted keys for ``--data``: an ingest folder (has manifest.json) -> parquet latents,
    anything else -> raw input streamed online."""
    if data is None:
        return {}
    if not is_remote(data) and (Path(data) / "manifest.json").is_file():
        return {"data.latents": data, "data.mode": "parquet"}
    return {"data.input": data, "data.mode": "online"}


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with relative local paths (data, model folder, output, init_from, a sqlite
    tracking store) made absolute.

    Ray Tune runs each trial, and Ray Train each worker, in a working directory of its own,
    where a path relative to the caller's directory names nothing. URIs, ``bundled:`` names
    and hub ids (no such local path) are kept as they are.
    """
    changes = {}
    for key in ("data.latents", "data.input", "model.path", "train.out", "train.init_from"):
        section, name = key.split(".")
        val = getattr(getattr(cfg, section), name)
        if not val or is_remote(val) or ":" in val.split("/")[0] or Path(val).is_absolute():
            continue
        if key == "train.out" or Path(val).exists():
            changes[key] = str(Path(val).resolve())
    # a sqlite store named relative to the caller (sqlite:///runs/x.db): a worker would open,
    # or create, another database and not find the driver's run
    db = Path(cfg.tracking.uri.removeprefix(SQLITE))
    if cfg.tracking.uri.startswith(SQLITE) and not db.is_absolute():
        changes["tracking.uri"] = f"{SQLITE}{db.resolve()}"
    return cfg.replace(**changes) if changes else cfg


def resolve(args: argparse.Namespace, **dotted: Any) -> Config:
    """Load the config from the common flags plus stage flags given as dotted keys.

    Stage flags that were not given (None) are ignored. When ``model.path`` is a distilled
    artifact and neither --config nor --preset is given, its training config (sizes, fps,
    text length, guidance, steps) is the starting point instead of a preset. With --dry-run
    the resolved config is printed and the process exits 0.
    """
    extra = [f"{key}={_yaml_scalar(val)}" for key, val in dotted.items() if val is not None]
    model = dotted.get("model.path")
    base = artifact_base(str(model) if model else None, args.config, args.preset)
    cfg = load_config(args.config, args.preset, [*args.overrides, *extra], base=base)
    if args.dry_run:
        print(explain() if args.explain else cfg.to_yaml(), end="")
        sys.exit(0)
    return cfg


def model_or_default(args: argparse.Namespace, model: str | None) -> str | None:
    """``--model`` as given. Without it (and without --config, --preset or --set model.path)
    the bundled distilled student when it is built, so that `dcm generate` and `dcm serve`
    show DCM out of the box; else None (the preset's model, the bundled teacher)."""
    from dcm.bundle import DEFAULT_STUDENT
    from dcm.experts import is_artifact

    if model or args.config or args.preset:
        return model
    if any(o.split("=", 1)[0].strip() == "model.path" for o in args.overrides):
        return None
    return DEFAULT_STUDENT if is_artifact(DEFAULT_STUDENT) else None


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        # quote so that e.g. a path like "yes" or "123" stays a string
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run_main(main_fn, argv: list[str] | None = None) -> int:
    """Run a stage's main, turning user errors into one clear line and exit code 2."""
    setup_logging(sys.argv[1:] if argv is None else argv)
    try:
        return int(main_fn(argv) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
