"""An ablation's table at every sampling step count, from its trials' MLflow stage runs.

Tune keeps one metric per trial (``val/score``, at ``sample.steps``); the ablation also needs
the score at every count of ``sample.eval_steps``, the untrained start (the first
validation, at step 0) and whether each curve is flat at its end. Every stage run logs
``val/score_{n}steps`` at each validation, so the whole curve is read back from MLflow:
the semantic stage's steps first, the detail stage's after them.

``ablation_rows`` gives, per variant and step count: the untrained start, the final score
(mean and std over the trials, i.e. the training seeds) and the change over the curve's
last ``tail`` steps (mean and std): a change within its std is a flat end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipelines.plots import save_png

STAGE_ORDER = ("semantic", "detail")
# Curve: [(training step counted over both stages, value)], one per sampling step count.
Curves = dict[int, list[tuple[int, float]]]


def step_counts(sweep: dict[str, Any]) -> list[int]:
    """The sampling step counts each validation scored (sample.eval_steps + sample.steps)."""
    sample = sweep.get("config", {}).get("sample", {})
    return sorted({*sample.get("eval_steps", []), int(sample.get("steps", 4))})


def trial_curves(uri: str, run_id: str, counts: list[int]) -> Curves:
    """The trial's ``val/score_{n}steps`` curves over its stages, in training order."""
    client, stages = _stage_runs(uri, run_id)
    return {n: _stitched(client, stages, _key(n)) for n in counts}


def metric_curve(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """One metric of a trial's stage runs, in training order (see ``_stitched``)."""
    return _stitched(*_stage_runs(uri, run_id), key)


def _stage_runs(uri: str, run_id: str) -> tuple[Any, dict[str, Any]]:
    """An MLflow client and the trial's stage runs by stage name, looked up once."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")
    return client, {r.data.tags.get("dcm_stage"): r for r in runs}


def _stitched(client: Any, stages: dict[str, Any], key: str) -> list[tuple[int, float]]:
    """``key`` over the stages: the detail stage's steps follow the semantic stage's last
    one, and its step 0 (which scores the semantic stage's final model again) is dropped."""
    curve: list[tuple[int, float]] = []
    offset = 0
    for stage in STAGE_ORDER:
        if stage not in stages:
            continue
        # One value per step: a re-logged step (a resumed stage) keeps its last value.
        points = {
            m.step: m.value for m in client.get_metric_history(stages[stage].info.run_id, key)
        }
        start = 1 if curve and 0 in points else 0
        curve += [(offset + s, v) for s, v in sorted(points.items()) if s >= start]
        offset = max([offset, *(offset + s for s in points)])
    return curve


def _key(n: int) -> str:
    return f"val/score_{n}steps"


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and population std (the spread over training seeds)."""
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def _value_at(curve: list[tuple[int, float]], step: int) -> float:
    """The curve's value at its last validation at or before ``step``."""
    return [v for s, v in curve if s <= step][-1]


def tail_steps(curves: dict[str, Curves]) -> int:
    """Two validation intervals: the stretch whose change says whether a curve is flat."""
    for c in curves.values():
        for s in c.values():
            if len(s) >= 2:
                return 2 * (s[-1][0] - s[-2][0])
    return 0


def ablation_rows(trials: list[dict[str, Any]], curves: dict[str, Curves]) -> list[dict[str, Any]]:
    """Per variant and step count: start, final mean/std, change over the curve's last two
    validation intervals (mean/std)."""
    tail = tail_steps(curves)
    groups: dict[str, list[Curves]] = {}
    for t in trials:
        c = curves.get(t["trial_id"])
        if c and any(c.values()):
            groups.setdefault(str(t["params"].get("variant")), []).append(c)
    rows = []
    for variant, group in groups.items():
        for n in sorted(group[0]):
            series = [c[n] for c in group if c.get(n)]
            if not series:
                continue
            final, final_std = mean_std([s[-1][1] for s in series])
            changes = [s[-1][1] - _value_at(s, s[-1][0] - tail) for s in series]
            change, change_std = mean_std(changes)
            rows.append({
                "variant": variant, "steps": n, "start": mean_std([s[0][1] for s in series])[0],
                "final_mean": final, "final_std": final_std,
                f"change_last_{tail}": change, "change_std": change_std,
                "trained_steps": series[0][-1][0], "trials": len(series),
            })  # fmt: skip
    return rows


def curves_plot(
    plt: Any, trials: list[dict[str, Any]], curves: dict[str, Curves], out: Path,
    reference: tuple[str, float] | None = None,
) -> Path:  # fmt: skip
    """One panel per step count: each trial's curve (thin), each variant's mean (thick)."""
    counts = sorted({n for c in curves.values() for n in c})
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.2), squeeze=False)
    variants = list(dict.fromkeys(str(t["params"].get("variant")) for t in trials))
    colours = plt.get_cmap("tab10")
    for ax, n in zip(axes[0], counts, strict=True):
        for i, variant in enumerate(variants):
            series = [
                curves[t["trial_id"]][n] for t in trials
                if str(t["params"].get("variant")) == variant and curves.get(t["trial_id"], {}).get(n)
            ]  # fmt: skip
            for s in series:
                ax.plot(*zip(*s, strict=True), color=colours(i), alpha=0.25, lw=0.8)
            steps = sorted({x for s in series for x, _ in s})
            means = [sum(_value_at(s, x) for s in series) / len(series) for x in steps]
            ax.plot(steps, means, color=colours(i), lw=2, marker="o", ms=3, label=variant)
        if reference:  # (label, value): the teacher's score, dashed
            ax.axhline(reference[1], ls="--", color="0.3", lw=1, label=reference[0])
        ax.set_title(f"{n} sampling steps")
        ax.set_xlabel("training step (semantic stage, then detail)")
        ax.set_ylabel(_key(n))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(plt, fig, out / "curves.png")
