"""`dcm evaluate`: the teacher (N steps + guidance) against DCM at several step counts.

    dcm evaluate [--model PATH] [--steps 2,4,8] [--teacher-steps 50] [--prompts FILE] --out DIR

Writes ``metrics.json`` (``dcm.evaluation.evaluate``'s result), ``metrics.md`` (a table)
and ``samples/<method>.gif`` contact sheets under ``--out``. Prompts: ``--prompts FILE``
(one per line, or a captions.jsonl / .csv manifest with a ``caption`` column), else
``sample.prompts`` of the config, else every held-out caption of the shapes world. Seeds
come from ``sample.seeds``. It runs in this process on the best local device: a few
hundred short videos do not need a cluster.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from dcm.config import Config, ConfigError
from pipelines.args import add_common, resolve, run_main


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a JSONL manifest or a CSV with `caption`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file '{path}' does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"{path}:{i} is not valid JSON: write one object per line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
                raise ConfigError(f"{path}:{i} needs a string field 'caption'")
            prompts.append(row["caption"])
    elif path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "caption" not in rows[0]:
            raise ConfigError(f"{path} needs a 'caption' column")
        prompts = [r["caption"] for r in rows]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts file '{path}' holds no prompts")
    return prompts


def default_prompts(cfg: Config) -> list[str]:
    from dcm.shapes.grammar import all_captions

    return list(cfg.sample.prompts) or all_captions("heldout")


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--steps '{text}' must be comma-separated integers, e.g. 2,4,8"
        ) from None
    if not steps or min(steps) < 2:
        raise ConfigError(f"--steps '{text}' must list step counts of at least 2")
    return steps


def run_evaluate(
    cfg: Config, out: str | Path, prompts: list[str], teacher: bool = True, device: str = ""
) -> dict:
    """Evaluate cfg.model.path; write metrics.json, metrics.md and samples/ under ``out``."""
    import torch

    from dcm.evaluation import evaluate, markdown_table
    from dcm.generate import VideoGenerator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    generator = VideoGenerator.load(cfg.model.path, device=device, cfg=cfg)
    s = cfg.sample
    result = evaluate(
        generator,
        prompts,
        seeds=list(s.seeds),
        steps_list=list(s.eval_steps),
        teacher_steps=s.teacher_steps,
        teacher=teacher,
        sample_dir=out / "samples",
        progress=lambda line: print(f"[evaluate] {line}", file=sys.stderr, flush=True),
    )
    result["model"] = cfg.model.path
    result["device"] = device
    result["cfg_scale"] = cfg.method.cfg_scale
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    table = f"# Evaluation of {cfg.model.path}\n\n" + markdown_table(result)
    (out / "metrics.md").write_text(table)
    print(table)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcm evaluate", description="Compare the teacher with DCM at several step counts."
    )
    parser.add_argument("--model", help="bundle folder, distilled artifact or bundled:shapes")
    parser.add_argument("--steps", help="student step counts, e.g. 2,4,8 (sample.eval_steps)")
    parser.add_argument(
        "--teacher-steps", type=int, help="teacher Euler steps (sample.teacher_steps)"
    )
    parser.add_argument("--prompts", help="prompts file: lines, captions.jsonl or CSV")
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher run")
    parser.add_argument("--device", default="", help="torch device (default: cuda if present)")
    parser.add_argument("--out", required=True, help="output folder")
    return add_common(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = parse_steps(args.steps) if args.steps else None
    cfg = resolve(
        args,
        **{
            "model.path": args.model,
            "sample.eval_steps": steps,
            "sample.teacher_steps": args.teacher_steps,
        },
    )
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(cfg)
    run_evaluate(cfg, args.out, prompts, teacher=not args.no_teacher, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
