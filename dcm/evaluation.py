"""Teacher vs DCM on fixed prompts and seeds: quality from pixels (shapes metrics) and speed.

Methods: ``teacher@N`` (N Euler steps with guidance, METHOD.md section 7) and ``dcm@n`` for
each n of ``steps_list`` (the experts, no guidance). For each method every prompt is
generated once per seed with the same noise, scored with ``dcm.shapes.metrics`` and timed
from ``VideoGenerator.last_timings``. The result is plain JSON-safe data:

    {"prompts": [...], "seeds": [...], "videos_per_method": P * S,
     "methods": {"teacher@50": {"steps", "nfe", "encode_s", "denoise_s", "decode_s",
                                "total_s", "seconds", "summary", "summary_std", ...,
                                "samples": "path.gif" (with sample_dir)}, "dcm@4": {...}}}

where nfe and the *_s timings are per video, and ``seconds`` is the method's whole wall time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dcm.config import ConfigError
from dcm.shapes.grammar import parse_caption
from dcm.shapes.metrics import KEYS, score_batch

TIMINGS = ("nfe", "encode_s", "denoise_s", "decode_s", "total_s")


def method_names(steps_list: Sequence[int], teacher_steps: int, teacher: bool = True) -> list[str]:
    """Names of the compared methods, teacher first."""
    return ([f"teacher@{teacher_steps}"] if teacher else []) + [f"dcm@{n}" for n in steps_list]


def evaluate(
    generator: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    steps_list: Sequence[int] = (2, 4, 8),
    teacher_steps: int = 50,
    teacher: bool = True,
    batch_size: int = 8,
    sample_dir: str | Path | None = None,
    samples_per_method: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every method on ``prompts`` x ``seeds``; see the module docstring for the result.

    ``generator`` is a ``dcm.generate.VideoGenerator``; with ``sample_dir`` each method's
    first ``samples_per_method`` videos are written there as one animated GIF contact sheet.
    """
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise ConfigError("evaluation needs at least one prompt")
    if not seeds:
        raise ConfigError("evaluation needs at least one seed")
    for prompt in prompts:
        parse_caption(prompt)  # CaptionError (a ConfigError) names a prompt outside the grammar
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    result: dict[str, Any] = {
        "prompts": prompts,
        "seeds": seeds,
        "videos_per_method": len(prompts) * len(seeds),
        "methods": {},
    }
    for name in method_names(steps_list, teacher_steps, teacher):
        is_teacher = name.startswith("teacher@")
        steps = teacher_steps if is_teacher else int(name.split("@")[1])
        videos, captions = [], []
        totals = dict.fromkeys(TIMINGS, 0.0)
        for seed in seeds:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                # A batch shares one noise draw from the seed; fix it per prompt chunk.
                frames = generator.generate(
                    chunk,
                    steps=steps,
                    seed=seed * 100_003 + start,
                    teacher=is_teacher,
                    teacher_steps=teacher_steps,
                )
                videos += list(frames)
                captions += chunk
                for key in TIMINGS:
                    # nfe is per video already; timings are per batch, spread over its videos
                    value = float(generator.last_timings.get(key, 0.0))
                    totals[key] += value * (len(chunk) if key == "nfe" else 1.0)
        n = len(videos)
        scores = score_batch(videos, captions)
        row: dict[str, Any] = {"steps": steps, "teacher": is_teacher}
        row.update({key: totals[key] / n for key in TIMINGS})
        row["seconds"] = totals["total_s"]
        for key in KEYS:
            row[key] = scores[key]
            row[f"{key}_std"] = scores[f"{key}_std"]
        if sample_dir is not None:
            from dcm.video import contact_sheet

            path = Path(sample_dir) / f"{name.replace('@', '_')}.gif"
            contact_sheet(videos[:samples_per_method], path, columns=4, fps=generator.fps)
            row["samples"] = str(path)
        result["methods"][name] = row
        if progress is not None:
            progress(f"{name}: summary {row['summary']:.3f}, {row['total_s']:.2f} s/video")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The result as a markdown table: quality (mean ± std) and speed per method."""
    methods = result["methods"]
    teacher = next((m for m in methods.values() if m.get("teacher")), None)
    head = ["method", "summary", "adherence", "colour", "shape", "direction", "quality"]
    head += ["NFE", "s/video", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        speed = teacher["total_s"] / max(m["total_s"], 1e-9) if teacher else float("nan")
        cells = [name, f"{m['summary']:.3f} ± {m['summary_std']:.3f}"]
        cells += [f"{m[k]:.3f}" for k in ("adherence", "colour", "shape", "direction", "quality")]
        cells += [f"{m['nfe']:.0f}", f"{m['total_s']:.2f}", f"{speed:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    n = result["videos_per_method"]
    lines.append("")
    lines.append(
        f"{n} videos per method ({len(result['prompts'])} prompts x {len(result['seeds'])} "
        "seeds), scored from decoded pixels by dcm/shapes/metrics.py; timings per video."
    )
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any]) -> str:
    """One line per method for logs."""
    return "; ".join(
        f"{name} {m['summary']:.3f} ({m['nfe']:.0f} NFE)" for name, m in result["methods"].items()
    )
