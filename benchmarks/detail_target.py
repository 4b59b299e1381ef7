"""Is the detail expert's training target good enough? A quality probe of a shapes student.

    python benchmarks/detail_target.py [--model bundled:shapes-dcm] [--prompts 24]

The detail expert is trained (METHOD.md section 4) towards the teacher's guided Euler steps
between the training grid's points below sigma_b: its consistency fixed point is the
teacher's own coarse tail from sigma_b. If that tail lost the shape class, a better solver
inside the target (sub-steps between grid points) would be the fix; if it keeps it, the
student falls short of its own target. Each n-step sample shares the student's semantic
part (its steps down to sigma_b) and is finished four ways:

- the student's own detail steps (what it ships);
- the detail expert on every training-grid point below sigma_b (is it self-consistent?);
- the guided teacher on the training grid's points below sigma_b (the target's fixed point);
- the guided teacher on its 50-step list below sigma_b (an accurate tail).

Scored with the shapes summary on held-out captions x 2 noise seeds, each row paired with
the teacher's grid tail over the same videos. The table comes last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import load_probe, paired, probe_header, shapes_summaries, to_split  # noqa: E402

from dcm.sampler import sample, teacher_sample  # noqa: E402

TARGET = "teacher, training-grid tail"


def main() -> None:
    args, gen, caps, cond, noises = load_probe(__doc__)
    bundle, student, sch, teacher = gen.bundle, gen.student, gen.schedule(), gen.teacher
    method, null = gen.cfg.method, bundle.null_cond(1)
    below = [float(s) for s in sch.sigmas.flip(0) if s < sch.sigma_split]
    tails = {  # name -> descending sigmas from sigma_b to 0
        "student's own detail steps": None,
        "detail expert, every grid point": [sch.sigma_split, *below, 0.0],
        TARGET: [sch.sigma_split, *below, sch.sigma_min, 0.0],
        "teacher, 50-step tail": [sch.sigma_split]
        + [s for s in sch.teacher_sigmas(50) if s < sch.sigma_split],
    }
    rows: dict[tuple[int, str], np.ndarray] = {}
    with torch.no_grad():
        for n in (2, 4):
            own = sch.sampling_sigmas(n)
            head = sch.semantic_head(own)
            x_bs = [to_split(student, noise.float(), cond, head, sch) for noise in noises]
            for name, tail in tails.items():
                per: list[float] = []
                for noise, x_b in zip(noises, x_bs, strict=True):
                    if tail is None:
                        z = sample(student, noise, cond, own, sch)
                    else:
                        z = (
                            teacher_sample(teacher, x_b, cond, null, tail, method)
                            if name.startswith("teacher")
                            else sample(student, x_b, cond, tail, sch)
                        )
                    per += shapes_summaries(bundle, z, caps)
                rows[n, name] = np.asarray(per)
                print(f"{n} steps, {name}: {rows[n, name].mean():.3f}", flush=True)

    print(probe_header(args.model, sch, caps))
    print(
        "| n | finish from sigma_b | steps below sigma_b | summary (mean +- std) | paired vs the target |"
    )
    print("|---|---|---|---|---|")
    for (n, name), per in rows.items():
        tail = tails[name]
        count = (len(tail) - 1) if tail else n - (n + 1) // 2
        vs = "(target)" if name == TARGET else paired(per - rows[n, TARGET])
        print(f"| {n} | {name} | {count} | {per.mean():.3f} +- {per.std(ddof=1):.2f} | {vs} |")


if __name__ == "__main__":
    main()
