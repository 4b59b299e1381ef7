"""`make student`: distil the bundled shapes student ('bundled:shapes-dcm') and measure it.

    python -m pipelines.student [--work runs/student] [--out dcm/shapes/student]

Phases (each skipped when its output exists, so an interrupted build resumes):

1. render 128 training clips of the shapes world (mp4 + captions.jsonl);
2. `dcm ingest` them into parquet latents with the bundled teacher's VAE and text encoder;
3. `dcm distill --stage both` from the bundled teacher (the shapes-tiny preset, 1,000 steps
   per stage; the checkpoint with the best validation score is exported);
4. copy the artifact into ``--out`` (its base model recorded as 'bundled:shapes', machine
   paths dropped from the saved config);
5. evaluate it on the 24 held-out captions x 2 seeds against the teacher at 2/4/8/50 steps
   and the untrained student, and write ``--out``/README.md with the table.
"""

from __future__ import annotations

import argparse
import json
import logging
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
STEPS = 1000  # per stage
TRAIN = [
    f"train.steps_semantic={STEPS}",
    f"train.steps_detail={STEPS}",
    "train.val_every=250",
    "train.val_prompts=8",
    "train.checkpoint_every=250",
]
EVAL_STEPS = (2, 4, 8)
EVAL_SEEDS = (0, 1)
# config keys that name places on the building machine, reset in the shipped artifact
MACHINE_KEYS = {"data": ("input", "latents"), "ingest": ("out",), "tracking": ("uri",)}


def build_config(work: Path) -> Config:
    return load_config(
        preset="shapes-tiny",
        overrides=[
            *TRAIN,
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


def ship(artifact: Path, out: Path) -> None:
    """Copy the artifact's two files into ``out``, with no paths of this machine in it."""
    from dcm.experts import ARTIFACT_JSON, ARTIFACT_WEIGHTS
    from dcm.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact / ARTIFACT_WEIGHTS, out / ARTIFACT_WEIGHTS)
    meta = json.loads((artifact / ARTIFACT_JSON).read_text())
    meta["bundle_path"] = "bundled:shapes"
    for section, keys in MACHINE_KEYS.items():
        for key in keys:
            meta["config"][section][key] = ""
    meta["config"]["train"]["out"] = "runs"
    write_atomic(out / ARTIFACT_JSON, json.dumps(meta, indent=2))


def evaluate(out: Path, work: Path) -> dict[str, Any]:
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
    return run_evaluate(cfg, work / "eval", all_captions("heldout"), untrained=True)


def _artifact_base(out: Path) -> dict[str, Any]:
    from dcm.experts import artifact_config

    base = artifact_config(out)
    assert base is not None
    return base


def readme(result: dict[str, Any], seconds: dict[str, float]) -> str:
    """The student's README: what it is, the table, how it was made."""
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
        + " | ".join(f"{m[f'dcm@{n}']['summary'] / ref:.2f} x" for n in EVAL_STEPS)
        + " | |",
        "",
        "#17's floors are 0.95 x the teacher at 50 steps at 4 steps and 0.9 x at 2 steps.",
        "",
        "## Reproduce",
        "",
        "```",
        "make student   # python -m pipelines.student --work runs/student --out dcm/shapes/student",
        "```",
        "",
        f"{VIDEOS} rendered training clips, the `shapes-tiny` preset (w = 2 inside the target,",
        f"lr 1e-4, batch 8, LoRA rank 8), {STEPS} semantic + {STEPS} detail steps, validation",
        "every 250 steps on 8 training captions; the best checkpoint by `val/score` is shipped.",
        f"Built on {platform.machine()} with {_cores()} CPU cores: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def build(work: Path, out: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "seconds.json"
    seconds: dict[str, float] = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        value = fn(*args)
        took = time.perf_counter() - start
        if took > 5:  # a skipped phase keeps the time of the run that did it
            seconds[name] = took
            times_file.write_text(json.dumps(seconds))
        log.info("%s: %.0f s", name, took)
        return value

    manifest = timed("render", render, work)
    timed("ingest", ingest, work, manifest)
    artifact = timed("distill", distill, build_config(work))
    ship(artifact, out)
    result = timed("evaluate", evaluate, out, work)
    (out / "README.md").write_text(readme(result, seconds))
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build(Path(args.work).resolve(), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
