"""`dcm evaluate`: DCM against the teacher's own sampler, on any prompts.

    dcm evaluate [--model PATH] [--steps 2,4,8] [--teacher-steps 50] [--prompts FILE]
                 [--clip PATH_OR_ID] [--lpips PATH] [--vbench DIMENSIONS] --out DIR

For every prompt and seed: the teacher at ``--teacher-steps`` (the reference), the teacher at
each DCM step count, and DCM at each step count (``dcm.evaluation``). Writes under ``--out``:
``metrics.json`` (the result, per-video values included), ``metrics.md`` (the tables, every
sampler named), ``samples/<method>.gif`` contact sheets, and an MLflow run (``tracking.uri``,
else ``<out>/mlflow.db``) with every ``<method>/<metric>`` value, the tables as artifacts and
the samplers as params.

Prompts: ``--prompts FILE`` (a text file with one prompt per line, or JSONL with a
``prompt`` (or ``caption``) field, or a CSV with such a column), else ``sample.prompts``, else
every held-out caption of the shapes world. Shapes-world prompts also get the shapes metrics.
Seeds come from ``sample.seeds``. It runs in this process on the best local device.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dcm.config import Config, ConfigError
from pipelines.args import add_common, resolve, run_main

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "caption")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), JSONL (a ``prompt`` or ``caption`` field per
    line) or CSV (a ``prompt`` or ``caption`` column)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file '{path}' does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
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
            key = next((k for k in PROMPT_FIELDS if isinstance(row, dict) and k in row), None)
            if key is None or not isinstance(row[key], str) or not row[key].strip():
                raise ConfigError(f"{path}:{i} needs a non-empty string field 'prompt'")
            prompts.append(row[key].strip())
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        key = next((k for k in PROMPT_FIELDS if rows and k in rows[0]), None)
        if rows and key is None:
            raise ConfigError(f"{path} needs a 'prompt' (or 'caption') column")
        prompts = [r[key].strip() for r in rows if (r[key] or "").strip()]
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


# ---------------------------------------------------------------- VBench hook
def vbench_ready(dimensions: list[str]) -> Path:
    """The VBench weights folder, or a ConfigError in one sentence when VBench cannot run."""
    if importlib.util.find_spec("vbench") is None:
        raise ConfigError(
            f"--vbench {','.join(dimensions)} needs the vbench package and its model weights: "
            "pip install vbench and place the weights under $VBENCH_CACHE_DIR (~/.cache/vbench)"
        )
    cache = Path(os.environ.get("VBENCH_CACHE_DIR", Path.home() / ".cache" / "vbench"))
    if not cache.is_dir() or not any(cache.iterdir()):
        raise ConfigError(
            f"--vbench needs VBench's model weights in '{cache}' (set VBENCH_CACHE_DIR); "
            "nothing downloads at run time"
        )
    return cache


def run_vbench(video_root: Path, methods: list[str], dimensions: list[str], device: str) -> dict:
    """VBench (custom-input mode) on each method's videos: {method: {dimension: score}}."""
    import vbench
    from vbench import VBench

    info = Path(vbench.__file__).parent / "VBench_full_info.json"
    scores: dict[str, dict[str, float]] = {}
    for method in methods:
        folder = video_root / method
        out = video_root.parent / "vbench_results" / method
        out.mkdir(parents=True, exist_ok=True)
        bench = VBench(device, str(info), str(out))
        bench.evaluate(videos_path=str(folder), name=method, dimension_list=dimensions,
                       mode="custom_input")  # fmt: skip
        raw = json.loads((out / f"{method}_eval_results.json").read_text())
        scores[method] = {d: float(v[0] if isinstance(v, list) else v) for d, v in raw.items()}
    return scores


# ---------------------------------------------------------------- the stage
def run_evaluate(
    cfg: Config,
    out: str | Path,
    prompts: list[str],
    teacher: bool = True,
    device: str = "",
    clip: str = "",
    lpips: str = "",
    vbench: list[str] | None = None,
    teacher_at_steps: bool = True,
    untrained: bool = False,
    compare: dict[str, str] | None = None,
) -> dict:
    """Evaluate cfg.model.path; write metrics.json, metrics.md, samples/ and an MLflow run.

    ``untrained`` adds the student's starting point (``untrained@n``) to the comparison;
    ``compare`` (label -> model path) other students as ``<label>@n``, on the same noise."""
    import torch

    from dcm.evaluation import evaluate, markdown_table
    from dcm.generate import VideoGenerator

    if vbench:
        vbench_ready(vbench)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorers: dict[str, Any] = {}
    if clip:
        from dcm.video_metrics import ClipScore

        scorers["clip"] = ClipScore(clip, device)
    if lpips:
        from dcm.video_metrics import Lpips

        scorers["lpips"] = Lpips(lpips, device)
    from pipelines.registry import with_local_model

    cfg = with_local_model(cfg)  # models:/NAME/VERSION -> its exported folder
    generator = VideoGenerator.load(cfg.model.path, device=device, cfg=cfg)
    s = cfg.sample
    result = evaluate(
        generator,
        prompts,
        seeds=list(s.seeds),
        steps_list=list(s.eval_steps),
        teacher_steps=s.teacher_steps,
        teacher=teacher,
        teacher_at_steps=teacher_at_steps,
        sample_dir=out / "samples",
        video_dir=out / "videos" if vbench else None,
        progress=log.info,
        untrained=generator.untrained() if untrained else None,
        others={k: VideoGenerator.load(v, device=device) for k, v in (compare or {}).items()},
        **scorers,
    )
    result.update(model=cfg.model.path, device=device, cfg_scale=cfg.method.cfg_scale,
                  clip_model=clip or None, lpips_weights=lpips or None)  # fmt: skip
    if vbench:
        result["vbench"] = run_vbench(out / "videos", list(result["methods"]), vbench, device)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    table = f"# Evaluation of {cfg.model.path}\n\n" + markdown_table(result)
    if vbench:
        table += "\nVBench:\n\n" + json.dumps(result["vbench"], indent=2) + "\n"
    (out / "metrics.md").write_text(table)
    result["mlflow_run_id"] = log_to_mlflow(cfg, out, result)
    if result["mlflow_run_id"]:  # the local copy names its MLflow run too
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    return result


def log_to_mlflow(cfg: Config, out: Path, result: dict[str, Any]) -> str | None:
    """One MLflow run per evaluation: metrics, samplers as params, tables as artifacts."""
    if not cfg.tracking.enabled:
        return None
    from mlflow import MlflowClient

    from dcm.evaluation import flat_metrics
    from pipelines.tracking import RunLogger, Tracker

    tracker = Tracker(cfg, out)
    client = MlflowClient(tracking_uri=tracker.uri)
    tags = {"dcm_run": cfg.run_name, "dcm_stage": "evaluate"}
    run = client.create_run(tracker.experiment_id(), run_name=f"evaluate-{cfg.run_name}", tags=tags)
    logger = RunLogger(tracker.uri, run.info.run_id)
    params = {"model": cfg.model.path, "prompts": len(result["prompts"]),
              "seeds": ",".join(map(str, result["seeds"])), "reference": result["reference"]}  # fmt: skip
    params.update(
        {f"sampler/{n.replace('@', '_')}": m["sampler"] for n, m in result["methods"].items()}
    )
    for key, val in params.items():
        client.log_param(run.info.run_id, key, str(val)[:6000])
    metrics = flat_metrics(result)
    for method, dims in (result.get("vbench") or {}).items():
        metrics.update({f"{method.replace('@', '_')}/vbench_{d}": v for d, v in dims.items()})
    logger.log_metrics(metrics, step=0)
    for name in ("metrics.json", "metrics.md"):
        logger.log_artifact(out / name)
    if (out / "samples").is_dir():
        logger.log_artifacts(out / "samples", "samples")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def parse_compare(items: list[str]) -> dict[str, str]:
    """['bundled=bundled:shapes-dcm', ...] -> {'bundled': 'bundled:shapes-dcm'}."""
    out = {}
    for item in items:
        label, sep, model = item.partition("=")
        if not sep or not label.strip().isidentifier() or not model.strip():
            raise ConfigError(
                f"--compare {item!r}: write LABEL=MODEL, e.g. bundled=bundled:shapes-dcm"
            )
        out[label.strip()] = model.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcm evaluate",
        description="Compare DCM with the teacher's own sampler on any prompts.",
    )
    parser.add_argument("--model", help="bundle folder, distilled artifact or bundled:shapes")
    parser.add_argument("--steps", help="student step counts, e.g. 2,4,8 (sample.eval_steps)")
    parser.add_argument(
        "--teacher-steps", type=int, help="reference teacher steps (sample.teacher_steps)"
    )
    parser.add_argument("--prompts", help="prompts file: lines, JSONL with 'prompt', or CSV")
    parser.add_argument("--no-teacher", action="store_true", help="skip every teacher run")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="also score the untrained student (the teacher's weights in the DCM sampler)",
    )
    parser.add_argument(
        "--compare", action="append", default=[], metavar="LABEL=MODEL",
        help="also score another student (artifact, bundled:shapes-dcm) as LABEL@n; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--no-teacher-at-steps", action="store_true",
        help="skip the teacher at the DCM step counts (keep the reference)",
    )  # fmt: skip
    parser.add_argument("--clip", default="", help="CLIP model folder or cached hub id: CLIP-T")
    parser.add_argument("--lpips", default="", help="LPIPS-Alex weights (file or folder)")
    parser.add_argument("--vbench", default="", help="VBench dimensions, comma-separated")
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
    vbench = [d.strip() for d in args.vbench.split(",") if d.strip()]
    if vbench:
        vbench_ready(vbench)  # before any generation
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(cfg)
    run_evaluate(
        cfg, args.out, prompts, teacher=not args.no_teacher, device=args.device, clip=args.clip,
        lpips=args.lpips, vbench=vbench, teacher_at_steps=not args.no_teacher_at_steps,
        untrained=args.untrained, compare=parse_compare(args.compare),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
