"""Teacher vs DCM on any prompts and fixed seeds: fidelity, quality and speed from pixels.

Methods (``method_names``), every one run on every prompt x seed with the same noise:

- ``teacher@N`` (N = teacher_steps, 50): the REFERENCE, the teacher on its own scheduler with
  guidance (``dcm.teacher_sampler``: the model folder's ``scheduler/``, as its diffusers
  pipeline samples it);
- ``teacher@n`` for each DCM step count n: the same sampler cut to n steps, i.e. what the
  steps alone give without distillation;
- ``dcm@n``: the experts, no guidance;
- ``untrained@n`` (when an ``untrained`` generator is given): the student's starting point,
  the teacher's own weights in the DCM sampler without guidance, so that a table shows what
  distillation added;
- ``<label>@n`` for each other student given in ``others`` (e.g. ``bundled@n``, the
  bundled distilled student beside a freshly distilled one), same noise.

Per video (``dcm.video_metrics``): fidelity to the reference video of the same prompt and seed
(PSNR, SSIM; LPIPS with user weights), temporal flicker, motion smoothness, edge sharpness,
optionally a CLIP text-video score; when every prompt belongs to the shapes grammar, also the
shapes metrics (``dcm.shapes.metrics``). Seconds and network evaluations come from
``VideoGenerator.last_timings``. The result is plain JSON-safe data:

    {"prompts", "seeds", "videos_per_method", "reference": "teacher@50", "shapes": bool,
     "metrics": [names scored], "methods": {"teacher@50": {"steps", "teacher", "sampler",
       "nfe", "encode_s", "denoise_s", "decode_s", "total_s", "seconds", "<metric>",
       "<metric>_std", ..., "samples"}, "dcm@4": {...}},
     "per_video": {"dcm@4": [{"prompt", "seed", "<metric>": value, ...}, ...], ...}}

nfe and the *_s timings are per video; ``seconds`` is the method's whole wall time. The
reference row has no fidelity values (it is what they are measured against).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcm import tables, video_metrics
from dcm.config import ConfigError

TIMINGS = ("nfe", "encode_s", "denoise_s", "decode_s", "total_s")
FIDELITY = ("psnr", "ssim", "lpips")
QUALITY = ("temporal_flicker", "motion_smoothness", "edge_sharpness")
SHAPES_TABLE = ("summary", "adherence", "colour", "shape", "direction", "quality")
LABELS = {
    "psnr": "PSNR dB", "ssim": "SSIM", "lpips": "LPIPS", "clip": "CLIP-T",
    "temporal_flicker": "flicker", "motion_smoothness": "smoothness",
    "edge_sharpness": "sharpness",
}  # fmt: skip


def method_names(
    steps_list: Sequence[int],
    teacher_steps: int,
    teacher: bool = True,
    teacher_at_steps: bool = True,
) -> list[str]:
    """Names of the compared methods: the reference teacher, the teacher at each DCM step
    count (skipping the reference's own), then DCM at each step count."""
    names = [f"teacher@{teacher_steps}"] if teacher else []
    if teacher and teacher_at_steps:
        names += [f"teacher@{n}" for n in steps_list if n != teacher_steps]
    return names + [f"dcm@{n}" for n in steps_list]


def is_shapes(prompts: Sequence[str]) -> bool:
    """True when every prompt is a caption of the shapes world's grammar."""
    from dcm.shapes.grammar import CaptionError, parse_caption

    try:
        for p in prompts:
            parse_caption(p)
    except CaptionError:
        return False
    return bool(prompts)


def _describe(generator: Any, name: str, steps: int) -> str:
    """The sampler of a method in words (every table names it); ``generator`` is the one
    that made the method's videos."""
    if name.startswith("teacher@"):
        describe = getattr(generator, "teacher_description", None)
        return describe(steps) if describe else f"teacher, {steps} steps + guidance"
    cfg = getattr(generator, "cfg", None)
    renoise = cfg.sample.renoise if cfg is not None else 0.0
    fresh = f", detail steps re-noised (renoise {renoise:g})" if renoise and steps > 2 else ""
    if name.startswith("untrained@"):
        who = "untrained student (the teacher's weights in the DCM sampler)"
        return f"{who}, {steps} steps{fresh}, no CFG"
    method = getattr(generator, "method", None)
    grid = f"Euler on the shift-{method.shift:g} grid, split {method.split}" if method else "Euler"
    source = getattr(generator, "source", "model")
    return f"DCM experts ({source}), {grid}, {steps} steps{fresh}, no CFG"


def evaluate(
    generator: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    steps_list: Sequence[int] = (2, 4, 8),
    teacher_steps: int = 50,
    teacher: bool = True,
    teacher_at_steps: bool = True,
    batch_size: int = 8,
    sample_dir: str | Path | None = None,
    samples_per_method: int = 8,
    clip: Callable[[np.ndarray, str], float] | None = None,
    lpips: Callable[[np.ndarray, np.ndarray], float] | None = None,
    video_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    untrained: Any | None = None,
    others: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every method on ``prompts`` x ``seeds``; see the module docstring for the result.

    ``generator`` is a ``dcm.generate.VideoGenerator``. ``clip(video, prompt)`` and
    ``lpips(video, reference)`` are optional scorers (``dcm.video_metrics.ClipScore`` /
    ``Lpips``). With ``sample_dir`` each method's first ``samples_per_method`` videos are
    written there as one animated GIF contact sheet; with ``video_dir`` every video is
    written as ``<video_dir>/<method>/<prompt>-<seed>.mp4`` (VBench's custom-input naming).
    ``untrained`` (the student's starting point) and ``others`` (label -> another student
    generator) add ``untrained@n`` / ``<label>@n`` rows.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts:
        raise ConfigError("evaluation needs at least one prompt")
    if not seeds:
        raise ConfigError("evaluation needs at least one seed")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if not teacher and lpips is not None:
        raise ConfigError("LPIPS compares with the teacher: drop --no-teacher or --lpips")
    shapes = is_shapes(prompts)
    names = method_names(steps_list, teacher_steps, teacher, teacher_at_steps)
    sources = {"untrained": untrained} if untrained is not None else {}
    sources.update(others or {})
    for label in sources:
        if label in ("teacher", "dcm"):
            raise ConfigError(f"another student cannot be labelled '{label}': pick another name")
        names += [f"{label}@{n}" for n in steps_list]
    reference = names[0] if teacher else None
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    totals = {n: dict.fromkeys(TIMINGS, 0.0) for n in names}
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for seed in seeds:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ref_videos = None
            for name in names:
                is_teacher = name.startswith("teacher@")
                steps = int(name.split("@")[1])
                # A batch shares one noise draw from the seed; every method sees the same one.
                source = sources.get(name.split("@")[0], generator)
                videos = source.generate(
                    chunk, steps=steps, seed=seed * 100_003 + start, teacher=is_teacher,
                    teacher_steps=steps if is_teacher else teacher_steps,
                )  # fmt: skip
                for key in TIMINGS:
                    # nfe is per video already; timings are per batch, spread over its videos
                    value = float(source.last_timings.get(key, 0.0))
                    totals[name][key] += value * (len(chunk) if key == "nfe" else 1.0)
                if name == reference:
                    ref_videos = videos
                for i, (video, prompt) in enumerate(zip(videos, chunk, strict=True)):
                    row = _score(video, prompt, shapes, clip)
                    if ref_videos is not None and name != reference:
                        row.update(video_metrics.fidelity(video, ref_videos[i]))
                        if lpips is not None:
                            row["lpips"] = float(lpips(video, ref_videos[i]))
                    rows[name].append({"prompt": prompt, "seed": seed, **row})
                    if len(kept[name]) < samples_per_method:
                        kept[name].append(video)
                    if video_dir is not None:
                        _write_mp4(Path(video_dir) / name, prompt, seed, video, generator)
    result: dict[str, Any] = {
        "prompts": prompts,
        "seeds": seeds,
        "videos_per_method": len(prompts) * len(seeds),
        "reference": reference,
        "shapes": shapes,
        "methods": {},
        "per_video": rows,
    }
    for name in names:
        steps = int(name.split("@")[1])
        n = len(rows[name])
        row: dict[str, Any] = {
            "steps": steps,
            "teacher": name.startswith("teacher@"),
            "sampler": _describe(sources.get(name.split("@")[0], generator), name, steps),
        }
        row.update({key: totals[name][key] / n for key in TIMINGS})
        row["seconds"] = totals[name]["total_s"]
        keys = [k for k in rows[name][0] if k not in ("prompt", "seed")]
        for key in keys:
            vals = np.asarray([r[key] for r in rows[name]], np.float64)
            row[key], row[f"{key}_std"] = float(vals.mean()), float(vals.std())
        if sample_dir is not None:
            from dcm.video import contact_sheet

            path = Path(sample_dir) / f"{name.replace('@', '_')}.gif"
            contact_sheet(kept[name], path, columns=4, fps=generator.fps)
            row["samples"] = str(path)
        result["methods"][name] = row
        if progress is not None:
            progress(f"{name}: {_brief(row)}, {row['total_s']:.2f} s/video ({row['sampler']})")
    result["metrics"] = [k for k in (*FIDELITY, "clip", *QUALITY) if any(
        k in m for m in result["methods"].values())]  # fmt: skip
    return result


def _score(
    video: np.ndarray, prompt: str, shapes: bool, clip: Callable[[np.ndarray, str], float] | None
) -> dict[str, float]:
    row = video_metrics.quality(video)
    if clip is not None:
        row["clip"] = float(clip(video, prompt))
    if shapes:
        from dcm.shapes.metrics import score_video

        row.update(score_video(video, prompt))
    return row


def _write_mp4(folder: Path, prompt: str, seed: int, video: np.ndarray, generator: Any) -> None:
    from dcm.video import write_video

    safe = "".join(c if c.isalnum() or c in " ,.'_-" else "_" for c in prompt)[:180].strip()
    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / f"{safe}-{seed}.mp4", video, fps=generator.fps)


def _brief(row: dict[str, Any]) -> str:
    parts = []
    if "summary" in row:
        parts.append(f"summary {row['summary']:.3f}")
    if "psnr" in row:
        parts.append(f"PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}")
    if "clip" in row:
        parts.append(f"CLIP-T {row['clip']:.2f}")
    return ", ".join(parts) or f"sharpness {row['edge_sharpness']:.1f}"


def _cell(m: dict[str, Any], key: str, digits: int = 3) -> str:
    if key not in m:
        return "ref" if key in FIDELITY and m.get("teacher") else ""
    return f"{m[key]:.{digits}f} ± {m[f'{key}_std']:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The result as markdown: fidelity + quality + speed per method, the shapes scores when
    scored, and a legend that names every method's sampler."""
    methods, ref = result["methods"], result.get("reference")
    base = methods.get(ref) if ref else None
    keys = [k for k in (*FIDELITY, "clip", *QUALITY) if k in result.get("metrics", [])]
    head = ["method", *[LABELS[k] for k in keys], "NFE", "s/video", "speed-up"]
    body = []
    for name, m in methods.items():
        speed = base["total_s"] / max(m["total_s"], 1e-9) if base else float("nan")
        cells = [name] + [_cell(m, k, 2 if k in ("psnr", "clip", "edge_sharpness") else 3)
                          for k in keys]  # fmt: skip
        body.append([*cells, f"{m['nfe']:.0f}", f"{m['total_s']:.2f}", f"{speed:.1f}x"])
    lines = [tables.markdown_table(head, body)]
    if result.get("shapes"):
        lines += [
            "",
            "Shapes-world scores (dcm/shapes/metrics.py, from pixels and the caption):",
            "",
        ]
        shapes_body = [[name] + [_cell(m, k) for k in SHAPES_TABLE] for name, m in methods.items()]
        lines.append(tables.markdown_table(["method", *SHAPES_TABLE], shapes_body))
    n = result["videos_per_method"]
    lines += ["", "Samplers:", ""]
    lines += [f"- `{name}`: {m['sampler']}" for name, m in methods.items()]
    lines += [
        "",
        f"{n} videos per method ({len(result['prompts'])} prompts x {len(result['seeds'])} "
        "seeds), mean ± std over videos, timings per video. "
        + (f"Fidelity (PSNR, SSIM{', LPIPS' if 'lpips' in keys else ''}) is measured against "
           f"`{ref}` at the same prompt and seed (same noise). " if ref else "")
        + "flicker = 1 - mean |frame change| / 255 (VBench formula); smoothness = 1 - mean "
        "|frame - mean of its neighbours| / 255; sharpness = RMS luminance gradient (grey "
        "levels)" + ("; CLIP-T = 100 x cos(text, frame)." if "clip" in keys else "."),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``<method>/<metric>`` -> value (MLflow-safe names: '@' becomes '_')."""
    out: dict[str, float] = {}
    for name, m in result["methods"].items():
        for key, val in m.items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                out[f"{name.replace('@', '_')}/{key}"] = float(val)
    return out
