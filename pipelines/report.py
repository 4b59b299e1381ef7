"""The demo's evaluation and report: quality and speed tables, curves, side-by-side GIFs.

`evaluate_models` compares the teacher on its own scheduler (50 steps + guidance, the
reference), the teacher cut to the DCM step counts, and the distilled experts at several
step counts on held-out prompts (`dcm.evaluation`), and renders teacher | DCM GIFs for the
same prompts and seeds. Every table is followed by the sampler of each method. `write_report` turns the demo's state into `report.md` and
`report.html` next to it (images referenced relatively, so the folder can be moved).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from dcm.config import Config
from dcm.tables import html_table, markdown_table
from pipelines.plots import save_png

LOSS_PREFIXES = ("loss", "train/loss", "semantic/", "detail/")


def evaluate_models(cfg: Config, artifact: str, prompts: list[str], out: Path) -> dict[str, Any]:
    """metrics.json + side-by-side GIFs for the distilled artifact against its teacher."""
    from dcm.evaluation import evaluate
    from dcm.generate import VideoGenerator
    from dcm.video import write_video

    out.mkdir(parents=True, exist_ok=True)
    gen = VideoGenerator.load(artifact, cfg=cfg)
    s = cfg.sample
    results = evaluate(
        gen, prompts, list(s.seeds), list(s.eval_steps), s.teacher_steps,
        untrained=gen.untrained(), others=shapes_students(cfg),
    )  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float))

    gifs = []
    for i, prompt in enumerate(prompts[:3]):
        seed = s.seeds[0]
        teacher = gen.generate([prompt], seed=seed, teacher=True, teacher_steps=s.teacher_steps)[0]
        student = gen.generate([prompt], steps=s.steps, seed=seed)[0]
        gap = np.full((teacher.shape[0], teacher.shape[1], 4, 3), 255, np.uint8)
        path = write_video(
            out / f"side_by_side_{i}.gif", np.concatenate([teacher, gap, student], 2), gen.fps
        )
        gifs.append({"prompt": prompt, "seed": seed, "path": str(path)})
    return {"metrics": str(out / "metrics.json"), "results": results, "gifs": gifs}


def shapes_students(cfg: Config) -> dict[str, Any]:
    """The bundled distilled student ('bundled') beside a fresh one distilled from the
    bundled teacher, when it is built; nothing for other teachers."""
    from dcm.bundle import DEFAULT_STUDENT, DEFAULT_TEACHER
    from dcm.experts import is_artifact
    from dcm.generate import VideoGenerator

    if cfg.model.path != DEFAULT_TEACHER or not is_artifact(DEFAULT_STUDENT):
        return {}
    return {"bundled": VideoGenerator.load(DEFAULT_STUDENT)}


# ---------------------------------------------------------------- tables
def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method from dcm.evaluation's result, teacher first."""
    methods = results.get("methods", results)
    rows = []
    for name, m in methods.items():
        if not isinstance(m, dict):
            continue
        rows.append({"method": name, **m})
    rows.sort(key=_order)
    return rows


def _order(row: dict[str, Any]) -> tuple[bool, str, int]:
    """Teacher rows first, then by label, and step counts as numbers (teacher@8 before @50)."""
    label, _, steps = str(row["method"]).partition("@")
    return (not label.startswith("teacher"), label, int(steps) if steps.isdigit() else 0)


def _fmt(val: Any) -> str:
    if isinstance(val, float):
        if val.is_integer():
            return str(int(val))
        return f"{val:.3f}" if abs(val) < 100 else f"{val:.0f}"
    return str(val)


def quality_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Fidelity to the reference teacher (PSNR, SSIM), then the shapes scores if present."""
    rows = _rows(results)
    keys = ["psnr", "ssim", "lpips", "clip", "summary", "adherence", "quality"]
    keys += ["smoothness", "flicker", "sharpness"]
    keys = [k for k in keys if any(k in r for r in rows)]
    head = ["method", *keys]
    body = []
    for r in rows:
        cells = [str(r["method"])]
        for k in keys:
            std = r.get(f"{k}_std")
            val = r.get(k, "")
            if k in ("psnr", "ssim", "lpips") and k not in r and r.get("teacher"):
                val = "reference" if r["method"] == results.get("reference") else ""
            cells.append(
                (f"{val:.3f}" if isinstance(val, float) else str(val))
                + (f" ± {std:.3f}" if isinstance(std, float) else "")
            )
        body.append(cells)
    return head, body


def samplers(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, its sampler in words) for every method, teacher first."""
    return [(str(r["method"]), str(r.get("sampler", ""))) for r in _rows(results)]


def speed_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = _rows(results)
    keys = [k for k in ("nfe", "denoise_s", "decode_s", "total_s") if any(k in r for r in rows)]
    head = ["method", *keys]
    # speed-up against the reference (teacher@50) when the result names one
    ref = results.get("reference")
    teacher = next((r for r in rows if r["method"] == ref), None) or next(
        (r for r in rows if str(r["method"]).startswith("teacher")), None
    )
    if teacher and "total_s" in teacher:
        head.append("speed-up")
    body = []
    for r in rows:
        cells = [str(r["method"])] + [_fmt(r.get(k, "")) for k in keys]
        if teacher and "total_s" in teacher:
            cells.append(f"{teacher['total_s'] / max(r.get('total_s', 0) or 1e-9, 1e-9):.1f}x")
        body.append(cells)
    return head, body


# ---------------------------------------------------------------- curves
def loss_curves(tracking_uri: str, run_ids: dict[str, str], out: Path) -> Path | None:
    """Plot every loss metric of the stage runs from MLflow into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    series = {}
    for stage, run_id in run_ids.items():
        if not run_id:
            continue
        for key in client.get_run(run_id).data.metrics:
            if "loss" in key:
                hist = client.get_metric_history(run_id, key)
                series[f"{stage}: {key}"] = sorted((m.step, m.value) for m in hist)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(run_ids), figsize=(6 * len(run_ids), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], run_ids, strict=False):
        for name, pts in series.items():
            if name.startswith(f"{stage}:") and pts:
                steps, vals = zip(*pts, strict=True)
                ax.plot(steps, vals, label=name.split(": ", 1)[1])
        ax.set_title(f"{stage} stage")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return save_png(plt, fig, out / "loss_curves.png")


def quality_curves(tracking_uri: str, run_ids: dict[str, str], out: Path) -> Path | None:
    """Plot each stage's validation score (val/score, from step 0) from MLflow into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    series = {}
    for stage, run_id in run_ids.items():
        if run_id:
            hist = client.get_metric_history(run_id, "val/score")
            series[stage] = sorted((m.step, m.value) for m in hist)
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for stage, pts in series.items():
        if pts:
            steps, vals = zip(*pts, strict=True)
            ax.plot(steps, vals, marker="o", label=f"{stage} stage")
    ax.set_xlabel("step (0 = untrained student)")
    ax.set_ylabel("val/score")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(plt, fig, out / "quality_curves.png")


# ---------------------------------------------------------------- report
def write_report(out: Path, state: dict[str, Any]) -> dict[str, Path]:
    """report.md + report.html from the demo's state."""
    ev = state["evaluate"]["result"]
    dist = state["distill"]["result"]
    serve = state.get("serve", {}).get("result", {})
    results = ev["results"]
    q_head, q_body = quality_table(results)
    s_head, s_body = speed_table(results)
    run_ids = {k: v.get("run_id") for k, v in dist.get("stages", {}).items()}
    curves = loss_curves(dist["tracking_uri"], run_ids, out) if dist.get("tracking_uri") else None
    quality = (
        quality_curves(dist["tracking_uri"], run_ids, out) if dist.get("tracking_uri") else None
    )
    used = samplers(results)
    ref = results.get("reference") or "teacher"
    ref_sampler = dict(used).get(ref, "the teacher with guidance")
    rel = lambda p: str(Path(p).resolve().relative_to(out.resolve()))  # noqa: E731
    timings = {name: s.get("seconds", 0.0) for name, s in state.items() if isinstance(s, dict)}

    md = ["# DCM demo report", ""]
    md += [
        f"Reference `{ref}`: {ref_sampler} (the model folder's own scheduler).",
        "`dcm@n`: the experts this demo distilled, no guidance; `bundled@n`: the shipped",
        "student `bundled:shapes-dcm` (dcm/shapes/student/README.md); `untrained@n`: the",
        "teacher's weights in the DCM sampler, where distillation starts. Prompts are held-out",
        "compositions of the shapes world, scored from decoded pixels (dcm/shapes/metrics.py);",
        f"PSNR and SSIM compare each video with `{ref}`'s video of the same prompt and seed.",
        "",
    ]
    md += ["## Quality", "", markdown_table(q_head, q_body), ""]
    md += ["Samplers:", ""] + [f"- `{m}`: {text}" for m, text in used] + [""]
    md += [
        "## Speed (network evaluations and wall time per video, this machine)",
        "",
        markdown_table(s_head, s_body),
        "",
    ]
    if quality:
        md += ["## Validation score (from the untrained student at step 0)", ""]
        md += [f"![quality curves]({rel(quality)})", ""]
    if curves:
        md += ["## Loss curves", "", f"![loss curves]({rel(curves)})", ""]
    md += ["## Teacher (left) vs DCM (right), same prompt and seed", ""]
    for g in ev.get("gifs", []):
        md += [
            f"**{g['prompt']}** (seed {g['seed']})",
            "",
            f"![{g['prompt']}]({rel(g['path'])})",
            "",
        ]
    if serve:
        md += [
            "## Serve",
            "",
            f"One HTTP request to {serve.get('url')}/v1/generate answered in "
            f"{serve.get('seconds', 0):.2f} s: [{Path(serve['video']).name}]({rel(serve['video'])})",
            "",
        ]
    md += [
        "## Stage times",
        "",
        markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()]),
        "",
    ]
    md += [f"MLflow: `mlflow ui --backend-store-uri {dist.get('tracking_uri')}`", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    css = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}"
        "th{background:#f3f3f3}figure{display:inline-block;margin:8px}img.gif{image-rendering:pixelated;width:264px}"
    )
    h = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>DCM demo report</title><style>{css}</style></head><body>",
        "<h1>DCM demo report</h1>",
        f"<p>Reference {html.escape(ref)}: {html.escape(ref_sampler)}. DCM: distilled experts, "
        "no guidance. Held-out prompts, scored from pixels; PSNR and SSIM against the "
        "reference's video of the same prompt and seed.</p>",
        "<h2>Quality</h2>",
        html_table(q_head, q_body),
        html_table(["method", "sampler"], [[m, text] for m, text in used]),
        "<h2>Speed</h2>",
        html_table(s_head, s_body),
    ]
    if quality:
        h += [
            "<h2>Validation score (step 0 = untrained student)</h2>",
            f"<img src='{html.escape(rel(quality))}' alt='quality curves' width='600'>",
        ]
    if curves:
        h += [
            "<h2>Loss curves</h2>",
            f"<img src='{html.escape(rel(curves))}' alt='loss curves' width='900'>",
        ]
    h += ["<h2>Teacher (left) vs DCM (right)</h2>"]
    for g in ev.get("gifs", []):
        h.append(
            f"<figure><img class='gif' src='{html.escape(rel(g['path']))}' alt='side by side'>"
            f"<figcaption>{html.escape(g['prompt'])} (seed {g['seed']})</figcaption></figure>"
        )
    if serve:
        h += [
            "<h2>Serve</h2>",
            f"<p>One HTTP request answered in {serve.get('seconds', 0):.2f} s: "
            f"<a href='{html.escape(rel(serve['video']))}'>{html.escape(Path(serve['video']).name)}</a></p>",
        ]
    h += [
        "<h2>Stage times</h2>",
        html_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()]),
        "</body></html>",
    ]
    html_path = out / "report.html"
    html_path.write_text("\n".join(h))
    extra = {"curves": curves, "quality_curves": quality}
    return {"md": md_path, "html": html_path, **{k: v for k, v in extra.items() if v}}
