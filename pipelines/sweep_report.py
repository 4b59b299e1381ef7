"""`dcm sweep report RUN_DIR`: compare a sweep's trials in a table and plots.

Reads ``sweep.json`` and ``trials.json`` (written by ``pipelines.sweep``) and writes
``RUN_DIR/report/``: ``trials.csv``, ``trials.md``, one PNG per searched dimension (the
metric against b = ``method.split``, against each weight, learning rate, rank or variant),
``overview.png`` (every trial's validation curve and its best value) and ``report.html``
(table and plots in one self-contained page). The folder is logged to the sweep's parent
MLflow run. Looked at, not read: the plots come first in the HTML.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from dcm.config import ConfigError
from dcm.tables import html_table, markdown_table
from pipelines.plots import save_png
from pipelines.sweep_curves import (
    ablation_rows,
    curves_plot,
    mean_std,
    step_counts,
    trial_curves,
)

REPORT_DIR = "report"
STATUS_COLOURS = {"finished": "#1f77b4", "stopped": "#ff7f0e", "error": "#d62728"}
LABELS = {"method.split": "b (method.split, expert boundary index)"}


def load(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sweep.json, trials.json) of a sweep run directory; ConfigError when it is not one."""
    root = Path(run_dir)
    files = (root / "sweep.json", root / "trials.json")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"'{run_dir}' is not a finished sweep run directory (no {' or '.join(missing)}): "
            "pass the folder `dcm sweep` printed as run_dir"
        )
    return json.loads(files[0].read_text()), json.loads(files[1].read_text())


def table_rows(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial, best first (by the sweep's metric and mode)."""
    sign = 1 if sweep["mode"] == "max" else -1
    dims = sweep["dimensions"]
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t["trial_id"], "status": t["status"]}
        row.update({d: t["params"].get(d) for d in dims})
        row.update({"best": t["best"], "last": t["last"], "validations": t["iterations"]})
        rows.append(row)
    return sorted(rows, key=lambda r: -sign * r["best"] if r["best"] is not None else math.inf)


def variant_rows(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant (the ablation's rows): mean and std over its trials (seeds) of the best
    metric and of the final one (the finished model: the best favours trials that validate
    more often), plus the teacher baseline when the sweep scored one."""
    if "variant" not in sweep["dimensions"]:
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        if t["best"] is not None:
            groups.setdefault(str(t["params"].get("variant")), []).append(t)
    rows = []
    for name, group in groups.items():
        mean, std = mean_std([float(t["best"]) for t in group])
        final, final_std = mean_std([float(t.get("last", t["best"])) for t in group])
        rows.append({"variant": name, "mean": mean, "std": std, "final_mean": final,
                     "final_std": final_std, "trials": len(group)})  # fmt: skip
    baseline = sweep.get("baseline")
    if baseline:
        rows.append({"variant": teacher_label(baseline),
                     "mean": baseline["value"], "std": None, "final_mean": baseline["value"],
                     "final_std": None, "trials": None})  # fmt: skip
    return rows


def teacher_label(baseline: dict[str, Any], lead: str = "teacher ({} steps)") -> str:
    """The teacher baseline named with its sampler (older sweeps: its step count only)."""
    base = lead.format(baseline["teacher_steps"])
    return f"{base}: {baseline['sampler']}" if baseline.get("sampler") else base


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = list(rows[0])
    return keys, [[_fmt(r[k]) for k in keys] for r in rows]


def _markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(*_cells(rows)) + "\n" if rows else "(no trials)\n"


def _html_table(rows: list[dict[str, Any]]) -> str:
    return html_table(*_cells(rows)) if rows else "<p>(no trials)</p>"


# ---------------------------------------------------------------- plots
def _baseline_line(ax: Any, baseline: dict[str, Any] | None) -> None:
    if baseline:
        label = teacher_label(baseline)
        ax.axhline(baseline["value"], ls="--", color="#2ca02c", lw=1.2, label=label)
        ax.legend(fontsize=8)


def _dimension_plot(
    plt: Any, key: str, trials: list[dict[str, Any]], metric: str, out: Path,
    baseline: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """The metric (each trial's best) against one searched key; categories as a strip plot."""
    points = [
        (t["params"].get(key), t["best"], t["status"]) for t in trials if t["best"] is not None
    ]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
    if numeric:
        xs = sorted({x for x, _, _ in points})
        means = [
            sum(y for x2, y, _ in points if x2 == x) / sum(1 for x2, *_ in points if x2 == x)
            for x in xs
        ]
        ax.plot(xs, means, color="0.6", lw=1, zorder=1, label="mean")
        if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
    else:
        cats = list(dict.fromkeys(str(x) for x, _, _ in points))
        ax.set_xticks(range(len(cats)), cats, rotation=20)
    for x, y, status in points:
        pos = x if numeric else cats.index(str(x))
        ax.scatter(pos, y, color=STATUS_COLOURS.get(status, "k"), zorder=2, s=30)
    _baseline_line(ax, baseline)
    ax.set_xlabel(LABELS.get(key, key))
    ax.set_ylabel(f"{metric} (best per trial)")
    ax.set_title(f"{metric} against {key}")
    ax.grid(alpha=0.3)
    return save_png(plt, fig, out / f"metric_vs_{key.replace('.', '_').replace('/', '_')}.png")


def _label(trial: dict[str, Any]) -> str:
    """Short trial label from its searched values, e.g. 'b=30 variant=dcm'."""
    parts = []
    for key, val in trial["params"].items():
        name = "b" if key == "method.split" else key.rsplit(".", 1)[-1]
        parts.append(f"{name}={_fmt(val)}")
    return " ".join(parts) or trial["trial_id"]


def _overview_plot(
    plt: Any, trials: list[dict[str, Any]], metric: str, mode: str, out: Path,
    baseline: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Left: every trial's validation curve (ASHA's stops are the short ones); right: each
    trial's best value, best first, as dots (a bar of height 0 would be invisible)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for t in trials:
        if t["history"]:
            it, val = zip(*t["history"], strict=True)
            colour = STATUS_COLOURS.get(t["status"], "k")
            left.plot(it, val, marker="o", ms=3, color=colour, alpha=0.7, label=_label(t))
    if 0 < len(trials) <= 12:
        left.legend(fontsize=7, loc="best")
    _baseline_line(left, baseline)
    left.set_xlabel("validation report (training_iteration)")
    left.set_ylabel(metric)
    left.set_title("validation curves (blue finished, orange stopped by ASHA, red error)")
    left.grid(alpha=0.3)
    sign = 1 if mode == "max" else -1
    scored = sorted((t for t in trials if t["best"] is not None), key=lambda t: -sign * t["best"])
    ys = list(range(len(scored)))[::-1]  # best at the top
    right.scatter([t["best"] for t in scored], ys, s=40, zorder=2,
                  color=[STATUS_COLOURS.get(t["status"], "k") for t in scored])  # fmt: skip
    right.set_yticks(ys, [_label(t) for t in scored], fontsize=8)
    if baseline:
        label = teacher_label(baseline)
        right.axvline(baseline["value"], ls="--", color="#2ca02c", lw=1.2, label=label)
        right.legend(fontsize=8)
    right.set_xlabel(f"best {metric}")
    right.set_title(f"trials, best at the top ({mode})")
    right.grid(alpha=0.3, axis="x")
    return save_png(plt, fig, out / "overview.png")


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{path.name}"><figcaption>{path.name}</figcaption></figure>'


# ---------------------------------------------------------------- the report
def ablation_table(
    sweep: dict[str, Any], trials: list[dict[str, Any]], out: Path, plt: Any
) -> list[dict[str, Any]]:
    """A variant sweep's table at every sampling step count (``ablation.csv`` / ``.md``) and
    its curves (``curves.png``), read from the trials' MLflow stage runs; [] without them."""
    uri = sweep.get("tracking_uri")
    runs = {t["trial_id"]: t["mlflow_run_id"] for t in trials if t.get("mlflow_run_id")}
    if "variant" not in sweep["dimensions"] or not uri or not runs:
        return []
    counts = step_counts(sweep)
    curves = {tid: trial_curves(uri, run, counts) for tid, run in runs.items()}
    rows = ablation_rows(trials, curves)
    if not rows:
        return []
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "ablation.md").write_text(_markdown(rows))
    baseline = sweep.get("baseline")
    reference = (teacher_label(baseline), baseline["value"]) if baseline else None
    curves_plot(plt, trials, curves, out, reference)
    return rows


def write_report(run_dir: str | Path, log_to_mlflow: bool = True) -> Path:
    """Write RUN_DIR/report/ (csv, md, PNGs, report.html); log it to the parent MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, trials = load(run_dir)
    out = Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    metric = sweep["metric"]
    rows = table_rows(sweep, trials)
    with open(out / "trials.csv", "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / "trials.md").write_text(_markdown(rows))
    baseline = sweep.get("baseline")
    variants = variant_rows(sweep, trials)
    if variants:
        with open(out / "variants.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(variants[0]))
            writer.writeheader()
            writer.writerows(variants)
    plots = [_overview_plot(plt, trials, metric, sweep["mode"], out, baseline)]
    plots += [_dimension_plot(plt, k, trials, metric, out, baseline) for k in sweep["dimensions"]]
    ablation = ablation_table(sweep, trials, out, plt)
    if ablation:
        plots.insert(0, out / "curves.png")
    if baseline:
        (out / "trials.md").write_text(
            _markdown(rows)
            + f"\n{teacher_label(baseline, 'teacher at {} steps')} -> {metric} = "
            + f"{_fmt(baseline['value'])}\n"
        )
    best = rows[0] if rows and rows[0]["best"] is not None else None
    summary = (
        f"best: trial {best['trial']} with {metric} = {_fmt(best['best'])}; its configuration "
        f"is <code>{html.escape(str(Path(run_dir) / 'best.yaml'))}</code>"
        if best else "no trial reported the metric"
    )  # fmt: skip
    if baseline:
        label = teacher_label(baseline, "Teacher at {} steps")
        summary += f". {html.escape(label)} -> {metric} = {_fmt(baseline['value'])}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sweep {html.escape(sweep["name"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:100%}}</style></head>
<body><h1>Sweep {html.escape(sweep["name"])}</h1>
<p>{len(trials)} trials, searcher {html.escape(sweep["searcher"])}, metric
{html.escape(metric)} ({html.escape(sweep["mode"])}). {summary}.</p>
{"".join(_embed(p) for p in plots)}
{"<h2>Variants (mean over seeds)</h2>" + _html_table(variants) if variants else ""}
{"<h2>Every step count: start, end, change at the end</h2>" + _html_table(ablation) if ablation else ""}
<h2>Trials</h2>{_html_table(rows)}
</body></html>
"""
    (out / "report.html").write_text(page)
    if log_to_mlflow and sweep.get("parent_run_id") and sweep.get("tracking_uri"):
        from pipelines.tracking import RunLogger

        RunLogger(sweep["tracking_uri"], sweep["parent_run_id"]).log_artifacts(out, REPORT_DIR)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcm sweep report", description="Compare a finished sweep's trials (table + plots)."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the sweep's run directory")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    args = parser.parse_args(argv)
    out = write_report(args.run_dir, log_to_mlflow=not args.no_mlflow)
    sweep, trials = load(args.run_dir)
    print(_markdown(table_rows(sweep, trials)), end="")
    variants = variant_rows(sweep, trials)
    if variants:
        print("\n" + _markdown(variants), end="")
    if (out / "ablation.md").is_file():
        print("\n" + (out / "ablation.md").read_text(), end="")
    print(f"report: {out / 'report.html'}")
    return 0
