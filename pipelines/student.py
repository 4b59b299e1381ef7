"""`make student`: distil the bundled shapes student ('bundled:shapes-dcm') and measure it.

    python -m pipelines.student [--work runs/student] [--out dcm/shapes/student]

Phases (each skipped when its output exists, so an interrupted build resumes):

1. render 128 training clips of the shapes world (mp4 + captions.jsonl);
2. `dcm ingest` them into parquet latents with the bundled teacher's VAE and text encoder;
3. `dcm distill --stage both` from the bundled teacher (the shapes-tiny preset on a
   10-point grid, 1,500 semantic + 500 detail steps; the checkpoint with the best
   validation score is exported);
4. copy the artifact into ``--out`` (its base model recorded as 'bundled:shapes', machine
   paths dropped from the saved config);
5. evaluate it on the 24 held-out captions x 2 seeds against the teacher at 2/4/8/50 steps
   and the untrained student, and write ``--out``/README.md with the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from dcm.config import Config, load_config
from pipelines.args import run_main

log = logging.getLogger(__name__)

VIDEOS = 128
# 1,500 semantic steps, validated every 250: two builds (seeds 0 and 1) both beat the
# 500-step build at 2 and 4 steps on the held-out captions (+0.062 / +0.023 and
# +0.021 / +0.017); the best of six semantic checkpoints starts the detail stage, which
# peaks within 500 steps (docs/QUALITY.md sections 14 and 17).
SEMANTIC_STEPS, DETAIL_STEPS = 1500, 500
TRAIN = [
    # A 10-point grid split at b = 6 keeps sigma_b = 0.875 (the 50-point grid's b = 34) and
    # propagates the consistency target five times faster: after 500 + 500 steps the
    # student is as good on the shapes summary as the 50-point one after 1,000 + 1,000 and
    # 1.4 dB closer to teacher@50 in PSNR (docs/QUALITY.md section 5).
    "method.grid_points=10",
    "method.split=6",
    f"train.steps_semantic={SEMANTIC_STEPS}",
    f"train.steps_detail={DETAIL_STEPS}",
    "train.val_every=250",
    "train.val_prompts=8",
    "train.checkpoint_every=250",
    # Fresh noise in each detail step that does not end at 0 (the multistep consistency
    # sampler): +0.045 at 8 steps on held-out captions, level at 4, and 2 steps are
    # unchanged (docs/QUALITY.md section 15). Saved in the artifact's config, so generate,
    # evaluate and Serve sample it this way by default.
    "sample.renoise=1.0",
]
EVAL_STEPS = (2, 4, 8)
EVAL_SEEDS = (0, 1)
# config keys that name places on the building machine, reset in the shipped artifact
MACHINE_KEYS = {"data": ("input", "latents"), "ingest": ("out",), "tracking": ("uri",)}


def build_config(work: Path, extra: list[str] | None = None) -> Config:
    """The shapes-tiny preset with the build's TRAIN settings, then ``extra`` overrides."""
    return load_config(
        preset="shapes-tiny",
        overrides=[
            *TRAIN,
            *(extra or []),
            f"data.latents={work / 'latents'}",
            "data.mode=parquet",
            f"train.out={work / 'train'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        ],
    )


def render(work: Path) -> Path:
    from dcm.shapes.dataset import write_dataset

    manifest = work / "videos" / "captions.jsonl"
    if not manifest.is_file():
        write_dataset(work / "videos", n=VIDEOS, seed=0, split="train")
    return manifest


def ingest(work: Path, manifest: Path) -> None:
    from pipelines.cli import main as cli

    if not (work / "latents" / "manifest.json").is_file():
        code = cli(["ingest", "--preset", "shapes-tiny", "--input", str(manifest),
                    "--out", str(work / "latents")])  # fmt: skip
        if code:
            raise SystemExit(f"ingest failed (exit {code}); see the log above")


def distill(cfg: Config) -> Path:
    from pipelines.distill import run_distill

    result = run_distill(cfg, "both")  # finished stages are skipped
    return Path(result.artifact_dir)


def ship(artifact: Path, out: Path) -> bool:
    """Copy the artifact's two files into ``out``, with no paths of this machine in it;
    True when the weights changed (a new student to evaluate)."""
    from dcm.experts import ARTIFACT_JSON, ARTIFACT_WEIGHTS
    from dcm.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    src, dst = artifact / ARTIFACT_WEIGHTS, out / ARTIFACT_WEIGHTS
    fresh = not dst.is_file() or dst.read_bytes() != src.read_bytes()
    if fresh:
        shutil.copyfile(src, dst)
    meta = json.loads((artifact / ARTIFACT_JSON).read_text())
    meta["bundle_path"] = "bundled:shapes"
    for section, keys in MACHINE_KEYS.items():
        for key in keys:
            meta["config"][section][key] = ""
    meta["config"]["train"]["out"] = "runs"
    write_atomic(out / ARTIFACT_JSON, json.dumps(meta, indent=2))
    return fresh


def evaluate(out: Path, work: Path, fresh: bool = True) -> dict[str, Any]:
    from dcm.shapes.grammar import all_captions
    from pipelines.evaluate import run_evaluate

    cfg = load_config(
        base=_artifact_base(out),
        overrides=[
            f"sample.eval_steps={list(EVAL_STEPS)}",
            f"sample.seeds={list(EVAL_SEEDS)}",
            "tracking.enabled=false",
        ],
    )
    done = work / "eval" / "metrics.json"
    if done.is_file() and not fresh:
        return json.loads(done.read_text())  # this student was already evaluated
    return run_evaluate(cfg, work / "eval", all_captions("heldout"), untrained=True)


def _artifact_base(out: Path) -> dict[str, Any]:
    from dcm.experts import artifact_config

    base = artifact_config(out)
    assert base is not None
    return base


def readme(
    result: dict[str, Any], seconds: dict[str, float], cfg: Config, extra: list[str] | None = None
) -> str:
    """The student's README: what it is, the table, how it was made (from ``cfg``; ``extra``:
    the build's ``--set`` overrides, part of the reproduce command)."""
    meth, tr = cfg.method, cfg.train
    command = (
        "make student   # python -m pipelines.student --work runs/student --out dcm/shapes/student"
    )
    if extra:
        sets = " ".join(f"--set {item}" for item in extra)
        command = f"python -m pipelines.student --work runs/student --out dcm/shapes/student {sets}"
    m = result["methods"]
    ref = m["teacher@50"]["summary"]

    def cell(name: str) -> str:
        row = m.get(name)
        if row is None:
            return ""
        return f"{row['summary']:.3f} ± {row['summary_std']:.2f}"

    lines = [
        "# `bundled:shapes-dcm`: the distilled shapes student",
        "",
        "The dual-expert student distilled by `dcm distill --stage both` from the bundled shapes",
        "teacher (`bundled:shapes`). `dcm generate` and `dcm serve` use it when no model is",
        "given. It is an artifact (`dcm_artifact.json` + `experts.safetensors`); the VAE and",
        "text encoder come from `bundled:shapes`.",
        "",
        f"Held-out shapes summary (`dcm/shapes/metrics.py`) on the 24 held-out captions x "
        f"{len(result['seeds'])} seeds = {result['videos_per_method']} videos per row, mean ± "
        "per-video std (the standard error of a mean is std / sqrt(48)); every row uses the "
        "same noise:",
        "",
        "| model | " + " | ".join(f"{n} steps" for n in EVAL_STEPS) + " | 50 steps |",
        "|---|" + "---|" * (len(EVAL_STEPS) + 1),
        "| teacher + CFG (its own scheduler) | "
        + " | ".join(cell(f"teacher@{n}") for n in EVAL_STEPS)
        + f" | {cell('teacher@50')} |",
        "| untrained student (teacher weights, DCM sampler) | "
        + " | ".join(cell(f"untrained@{n}") for n in EVAL_STEPS)
        + " | |",
        "| **this student** | "
        + " | ".join(f"**{cell(f'dcm@{n}')}**" for n in EVAL_STEPS)
        + " | |",
        "| student / teacher@50 | "
        # three decimals: a ratio of 0.945 must not print as a floor of 0.95 met
        + " | ".join(f"{m[f'dcm@{n}']['summary'] / ref:.3f} x" for n in EVAL_STEPS)
        + " | |",
        "",
        "Paired differences of the shapes summary (same prompt, seed and noise; mean ± "
        "standard error over the videos; wins / losses count the videos that differ):",
        "",
        "| comparison | difference | wins / losses |",
        "|---|---|---|",
        *[paired_row(result, a, b) for a, b in PAIRS],
        "",
        "#17's floors are 0.95 x the teacher at 50 steps at 4 steps and 0.9 x at 2 steps.",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"{VIDEOS} rendered training clips, the `shapes-tiny` preset (w = {meth.cfg_scale:g} "
        f"inside the target, grid N = {meth.grid_points} split at b = {meth.split}, lr "
        f"{tr.lr_semantic:g} / {tr.lr_detail:g}, batch {tr.global_batch}, LoRA rank "
        f"{cfg.lora.rank}), {tr.steps_semantic} semantic + {tr.steps_detail} detail steps, "
        f"validation every {tr.val_every} steps on {tr.val_prompts} training captions; the best",
        "checkpoint by `val/score` is shipped. The student and its untrained start sample "
        + (
            f"with `sample.renoise={cfg.sample.renoise:g}` (fresh noise in the detail steps that "
            "do not end at 0; METHOD.md section 7)."
            if cfg.sample.renoise
            else "with plain Euler steps."
        ),
        f"Built on {platform.machine()} with {os.cpu_count()} CPU cores: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


PAIRS = (
    ("dcm@2", "untrained@2"),
    ("dcm@4", "untrained@4"),
    ("dcm@2", "teacher@2"),
    ("dcm@4", "teacher@4"),
    ("dcm@4", "teacher@50"),
)


def paired_row(result: dict[str, Any], a: str, b: str) -> str:
    """One markdown row: mean ± standard error of the per-video differences a - b."""
    import numpy as np

    va = np.array([r["summary"] for r in result["per_video"][a]])
    vb = np.array([r["summary"] for r in result["per_video"][b]])
    d = va - vb
    se = d.std(ddof=1) / np.sqrt(len(d))
    return f"| {a} - {b} | {d.mean():+.3f} ± {se:.3f} | {(d > 0).sum()} / {(d < 0).sum()} |"


def build(work: Path, out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    from pipelines.distill import RESULT, run_dir

    work.mkdir(parents=True, exist_ok=True)
    cfg = build_config(work, extra)
    times_file = work / "seconds.json"
    seconds: dict[str, float] = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def timed(name: str, done: bool, fn: Any, *args: Any) -> Any:
        """Run a phase; record its wall time unless its output was already there."""
        start = time.perf_counter()
        value = fn(*args)
        if not done:
            seconds[name] = time.perf_counter() - start
            times_file.write_text(json.dumps(seconds))
            log.info("%s: %.0f s", name, seconds[name])
        return value

    evaluated = work / "eval" / "metrics.json"
    manifest = timed("render", (work / "videos" / "captions.jsonl").is_file(), render, work)
    timed("ingest", (work / "latents" / "manifest.json").is_file(), ingest, work, manifest)
    finished = (Path(run_dir(cfg)) / "detail" / RESULT).is_file()
    artifact = timed("distill", finished, distill, cfg)
    fresh = ship(artifact, out)
    result = timed("evaluate", evaluated.is_file() and not fresh, evaluate, out, work, fresh)
    (out / "README.md").write_text(readme(result, seconds, cfg, extra))
    kept = ("steps", "sampler", "summary", "summary_std", "adherence", "nfe", "total_s")
    methods = {n: {k: r[k] for k in kept if k in r} for n, r in result["methods"].items()}
    record = {"prompts": result["prompts"], "seeds": result["seeds"], "methods": methods}
    (out / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    log.info("shipped %s (README.md has the table)", out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.student", description=__doc__)
    parser.add_argument("--work", default="runs/student", help="working folder (resumable)")
    parser.add_argument("--out", default="dcm/shapes/student", help="where the student goes")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override after the build's own (repeatable), e.g. method.grid_points=10",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build(Path(args.work).resolve(), Path(args.out), args.set)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
