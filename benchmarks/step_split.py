"""How should n sampling steps be shared between the two experts? A quality probe.

    python benchmarks/step_split.py [--model bundled:shapes-dcm] [--prompts 24]

``Schedule.sampling_sigmas`` gives the semantic expert ceil(n / 2) steps and the detail
expert the rest. This script samples a distilled shapes student with other shares (from
the same grid points) on held-out captions and fixed noise (two noise seeds per caption)
and scores the decoded videos with the shapes summary (``dcm/shapes/metrics.py``). Each
share is compared with the default one at the same n, paired over the same videos
(mean +- standard error, wins / losses). Detail steps take the model's own
``sample.renoise`` share of fresh noise, as ``dcm generate`` samples it.

It also moves the second detail step of the default 4-step list (2 + 2) to every other
grid point below sigma_b, and samples the guided teacher (Euler, the model's CFG scale) on
every list and on its own 50 steps: the baseline a list's student row has to beat
(docs/QUALITY.md section 17). The table comes last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    guided_teacher,
    load_probe,
    paired,
    probe_header,
    sampled_summaries,
)


def shares(sch) -> dict[str, list[float]]:
    """Name ('n: SemE + DetE') -> descending sigma list, every share of n = 2, 3, 4 steps
    and the default one at 8 (``Schedule.sampling_sigmas(n, semantic_steps=k)``)."""
    out = {}
    for n in (2, 3, 4, 8):
        for k in range(1, n) if n < 8 else [(n + 1) // 2]:
            out[f"{n}: {k} + {n - k}"] = sch.sampling_sigmas(n, semantic_steps=k)
    default4 = out["4: 2 + 2"]
    for i in range(sch.split - 1, -1, -1):
        sigma = float(sch.sigmas[i])
        if abs(sigma - default4[3]) > 1e-6:
            out[f"4: 2 + 2, DetE again at {sigma:.3f}"] = [*default4[:3], sigma, 0.0]
    return out


def main() -> None:
    args, gen, caps, cond, noises = load_probe(__doc__)
    sch = gen.schedule()
    scores: dict[str, np.ndarray] = {}
    lists = shares(sch)
    renoise = float(gen.cfg.sample.renoise)
    null = gen.bundle.encode_text([""] * len(caps))
    teacher = guided_teacher(gen.teacher, null, gen.method)
    guided: dict[str, np.ndarray] = {}
    with torch.no_grad():
        t50 = sampled_summaries(gen, teacher, noises, cond, caps, sch.teacher_sigmas(50))
        for name, sigmas in lists.items():
            scores[name] = sampled_summaries(gen, gen.student, noises, cond, caps, sigmas, renoise)
            guided[name] = sampled_summaries(gen, teacher, noises, cond, caps, sigmas)
            print(
                f"{name}: {scores[name].mean():.3f} (teacher {guided[name].mean():.3f})", flush=True
            )

    print(probe_header(args.model, sch, caps) + f"detail steps re-noised with share {renoise:g}")
    print(f"guided teacher (w = {gen.method.cfg_scale:g}) at 50 steps: {t50.mean():.3f}\n")
    print(
        "| steps: SemE + DetE | sigmas | summary (mean +- std) | paired vs the default "
        "| guided teacher, same list |"
    )
    print("|---|---|---|---|---|")
    for name, per in scores.items():
        n = int(name.split(":")[0])
        default = f"{n}: {(n + 1) // 2} + {n // 2}"  # also the base of the moved-step rows
        vs = "(default)" if name == default else paired(per - scores[default])
        sig = ", ".join(f"{s:.3f}" for s in lists[name])
        row = f"| {name} | {sig} | {per.mean():.3f} +- {per.std(ddof=1):.2f} | {vs} "
        print(row + f"| {guided[name].mean():.3f} |")


if __name__ == "__main__":
    main()
