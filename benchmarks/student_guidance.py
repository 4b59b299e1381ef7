"""Does guidance on the distilled student's own velocity help? A quality probe.

    python benchmarks/student_guidance.py [--model bundled:shapes-dcm] [--prompts 24]

DCM samples without CFG: the teacher's guidance is distilled into the student. This probe
extrapolates the student's velocity anyway, v = v(c) + g (v(c) - v(null)), on the semantic
steps, the detail steps or both, at 2 and 4 steps. Scored with the shapes summary on
held-out captions and fixed noise (two seeds per caption), paired against g = 0 (the
student as shipped). The table comes last (docs/QUALITY.md section 18).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from dcm.config import SEMANTIC  # noqa: E402

SCALES = ((0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (0.0, 0.5), (0.0, 1.0), (1.0, 1.0))


def guided(student, null, g_semantic: float, g_detail: float):
    """The student with guidance ``g_semantic`` on its semantic steps and ``g_detail`` on
    the rest, as a sampler model (every row of a sampling step has the same expert id)."""

    def model(x, t, cond, expert):
        g = g_semantic if bool((expert == SEMANTIC).all()) else g_detail
        v = student(x, t, cond, expert)
        return v if g == 0 else v + g * (v - student(x, t, null, expert))

    return model


def main() -> None:
    args, gen, caps, cond, noises = common.load_probe(__doc__)
    sch = gen.schedule()
    null = gen.bundle.encode_text([""] * len(caps))
    renoise = float(gen.cfg.sample.renoise)
    lines = ["| g semantic, g detail | 2 steps | 4 steps |", "|---|---|---|"]
    with torch.no_grad():
        cells: dict[tuple[float, float], list[str]] = {s: [] for s in SCALES}
        for n in (2, 4):
            sigmas = sch.sampling_sigmas(n)
            base = None
            for scales in SCALES:
                model = guided(gen.student, null, *scales)
                per = common.sampled_summaries(gen, model, noises, cond, caps, sigmas, renoise)
                base = per if base is None else base
                cell = f"{per.mean():.3f}"
                if per is not base:
                    cell += f", {common.paired(per - base)}"
                cells[scales].append(cell)
                print(f"{n} steps, g = {scales}: {cell}", flush=True)
    lines += [f"| {gs:g}, {gd:g} | {' | '.join(c)} |" for (gs, gd), c in cells.items()]
    print(common.probe_header(args.model, sch, caps) + "\n".join(lines))


if __name__ == "__main__":
    main()
