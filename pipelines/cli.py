"""The `dcm` console script: one subcommand per stage, each delegating to its module.

`dcm <stage> ARGS` is exactly `python -m pipelines.<stage> ARGS`; the stage module owns its
flags (so `--help` shows the real ones). Modules are imported only when their subcommand
runs, so `dcm --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("pipelines.ingest", "stream raw videos + captions into latents (Ray Data)"),
    "distill": (
        "pipelines.distill",
        "distil the semantic / detail experts (Ray Train + DeepSpeed)",
    ),
    "sweep": (
        "pipelines.sweep",
        "sweep the expert split and loss weights (Ray Tune); 'sweep report DIR'",
    ),
    "evaluate": ("pipelines.evaluate", "compare the teacher with DCM at several step counts"),
    "generate": ("pipelines.generate", "write one video from a bundle or a distilled artifact"),
    "serve": ("pipelines.serve", "serve the model over HTTP (Ray Serve, autoscaling)"),
    "export": (
        "pipelines.export",
        "export a distilled artifact as a diffusers folder or a LoRA file",
    ),
    "demo": ("pipelines.demo", "the whole platform end to end on this machine"),
    "pretrain": ("pipelines.pretrain", "train the tiny shapes teacher bundle"),
    "tiny-model": (
        "pipelines.tiny_model",
        "write a random tiny Wan2.1 / HunyuanVideo folder + smoke config",
    ),
}


def _usage() -> str:
    lines = ["usage: dcm <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Every command takes --config FILE, --set key=value and --dry-run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from pipelines.args import run_main

    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
