"""The ablation's finished students on the held-out captions: a quality probe.

    python benchmarks/ablation_heldout.py runs/ablation/ablation-shapes [--steps 2,4] [--out DIR]

The sweep's own curves score each trial on 8 validation captions x 2 seeds (16 videos, one
video is 0.06). This scores every trial's last checkpoint (the end of its curve, not the best
validation point) on the 24 held-out captions x 2 seeds, every trial on the same noise, with
the teacher at 50 steps on the same captions as the reference. Per variant: the mean over
its training seeds of each trial's 48-video mean, and the spread over those seeds. Between
variants: the paired difference (same training seed, caption and noise), mean ± std over the
training seeds of the per-seed mean difference, and the pooled count of videos each side
wins. The tables come last (README: the ablation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from pipelines.checkpoints import ARTIFACT  # noqa: E402

# the paper's rows in order, and the comparisons the ablation reads
ORDER = ("single-cm", "two-experts", "two-experts-tc", "dcm")
PAIRS = (
    ("two-experts", "single-cm"),
    ("two-experts-tc", "two-experts"),
    ("dcm", "two-experts-tc"),
    ("dcm", "two-experts"),
)


def last_artifact(trial_dir: Path) -> tuple[Path, int]:
    """The artifact of the trial's last checkpoint (highest step) of its last stage."""
    for stage in ("detail", "semantic"):
        snapshot = trial_dir / stage / "checkpoint_manager_snapshot.json"
        if snapshot.is_file():
            rows = json.loads(snapshot.read_text())["checkpoint_results"]
            last = max(rows, key=lambda r: float(r["metrics"]["step"]))
            return trial_dir / stage / last["checkpoint_dir_name"] / ARTIFACT, int(
                last["metrics"]["step"]
            )
    raise SystemExit(f"{trial_dir}: no checkpoint of either stage; is the trial finished?")


def finished_trials(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(trial id, params) of the finished trials: from trials.json once the sweep is done;
    before that (a sweep still running, or interrupted) from Tune's trial folders, a trial
    counting as finished when its last stage has recorded its result."""
    file = run_dir / "trials.json"
    if file.is_file():
        rows = json.loads(file.read_text())
        return [(t["trial_id"], t["params"]) for t in rows if t["status"] == "finished"]
    info = json.loads((run_dir / "sweep.json").read_text())
    default_stage = info["config"]["train"]["stage"]
    variants = info["config"]["sweep"]["variants"]
    out = []
    for params_file in sorted(run_dir.glob("tune-*/run_trial_*/params.json")):
        trial_id = "_".join(params_file.parent.name.split("_")[2:4])
        params = json.loads(params_file.read_text())
        stage = variants.get(params.get("variant"), {}).get("train.stage", default_stage)
        last = "detail" if stage == "both" else stage
        if (run_dir / "trials" / f"{run_dir.name}-{trial_id}" / last / "result.json").is_file():
            out.append((trial_id, params))
    return out


def trials(run_dir: Path) -> dict[str, tuple[str, int, Path]]:
    """label -> (variant, training seed, last artifact) for every finished trial."""
    if not (run_dir / "sweep.json").is_file():
        raise SystemExit(f"{run_dir / 'sweep.json'} is missing: is {run_dir} a sweep's folder?")
    out = {}
    for trial_id, params in finished_trials(run_dir):
        variant, seed = str(params.get("variant")), int(params.get("train.seed", 0))
        artifact, step = last_artifact(run_dir / "trials" / f"{run_dir.name}-{trial_id}")
        print(f"{variant} seed {seed}: step {step}, {artifact}", flush=True)
        out[f"{variant}-s{seed}"] = (variant, seed, artifact)
    return out


def evaluate(
    found: dict[str, tuple[str, int, Path]], steps: list[int], out: Path, teacher: bool = True
) -> dict:
    """Per-video scores of every trial in ``found`` (and the teacher at 50 steps)."""
    from dcm.config import load_config
    from dcm.experts import artifact_config
    from dcm.shapes.grammar import all_captions
    from pipelines.evaluate import run_evaluate

    labels = list(found)
    first = found[labels[0]][2]
    base = artifact_config(first)
    assert base is not None, f"{first} keeps no config"
    cfg = load_config(
        base=base,
        overrides=[f"sample.eval_steps={steps}", "sample.seeds=[0,1]", "tracking.enabled=false"],
    )
    compare = {label: str(found[label][2]) for label in labels[1:]}
    result = run_evaluate(
        cfg, out, all_captions("heldout"), teacher=teacher, teacher_at_steps=False, compare=compare
    )
    # the first trial is evaluated as the main model ("dcm@n"): give it its label back
    per = result["per_video"]
    for n in steps:
        per[f"{labels[0]}@{n}"] = per.pop(f"dcm@{n}")
    return per


def summaries(rows: list[Any]) -> np.ndarray:
    return np.array([r["summary"] if isinstance(r, dict) else r for r in rows], float)


def tables(found: dict[str, tuple[str, int, Path]], per: dict, steps: list[int]) -> str:
    teacher = summaries(per["teacher@50"]).mean()
    by_variant: dict[str, dict[int, str]] = {}
    for label, (variant, seed, _) in found.items():
        by_variant.setdefault(variant, {})[seed] = label
    variants = [v for v in ORDER if v in by_variant] + sorted(set(by_variant) - set(ORDER))
    lines = [
        f"teacher, 50 steps + CFG: {teacher:.3f} on the same 48 videos",
        "",
        "| variant | seeds | "
        + " | ".join(f"{n} steps: mean ± std over seeds" for n in steps)
        + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for v in variants:
        cells = []
        for n in steps:
            means = [summaries(per[f"{label}@{n}"]).mean() for label in by_variant[v].values()]
            cells.append(
                f"{np.mean(means):.3f} ± {np.std(means, ddof=1) if len(means) > 1 else 0:.3f}"
            )
        lines.append(f"| {v} | {len(by_variant[v])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison (same seed, caption, noise) | "
        + " | ".join(f"{n} steps: mean ± std over seeds (wins / losses)" for n in steps)
        + " |",
        "|---|" + "---|" * len(steps),
    ]
    for a, b in PAIRS:
        if a not in by_variant or b not in by_variant:
            continue
        seeds = sorted(set(by_variant[a]) & set(by_variant[b]))
        cells = []
        for n in steps:
            diffs = [
                summaries(per[f"{by_variant[a][s]}@{n}"])
                - summaries(per[f"{by_variant[b][s]}@{n}"])
                for s in seeds
            ]
            means = [d.mean() for d in diffs]
            pooled = np.concatenate(diffs)
            spread = np.std(means, ddof=1) if len(means) > 1 else 0.0
            cells.append(
                f"{np.mean(means):+.3f} ± {spread:.3f} ({(pooled > 0).sum()} / {(pooled < 0).sum()})"
            )
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the sweep's run folder (holds trials.json)")
    parser.add_argument("--steps", default="2,4", help="sampling step counts")
    parser.add_argument("--out", type=Path, help="evaluation folder (default RUN_DIR/heldout)")
    parser.add_argument(
        "--reuse", type=Path,
        help="an earlier --out of this script: its trials (same noise) are not scored again",
    )  # fmt: skip
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    found = trials(args.run_dir)
    if not found:
        raise SystemExit(f"{args.run_dir}: no finished trial to score")
    per: dict[str, Any] = {}
    if args.reuse:
        per = json.loads((args.reuse / "scores.json").read_text())
    todo = {k: v for k, v in found.items() if f"{k}@{steps[0]}" not in per}
    out = args.out or args.run_dir / "heldout"
    if todo:
        per.update(evaluate(todo, steps, out, teacher="teacher@50" not in per))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(per))
    print(f"\n{common.machine()}")
    print(f"{args.run_dir}: each trial's last checkpoint, 24 held-out captions x 2 seeds\n")
    print(tables(found, per, steps))


if __name__ == "__main__":
    main()
