"""How much fresh noise should the detail expert's steps take? A quality probe.

    python benchmarks/renoise.py [--model bundled:shapes-dcm] [--prompts 24]

``sample.renoise`` (METHOD.md section 7) re-noises the detail expert's clean estimate at each
step that does not end at 0, with a ``renoise`` share of fresh noise (0: the plain Euler
step). This script samples a distilled shapes student and its untrained start (the teacher's
weights in the DCM sampler) at 4 and 8 steps with several shares, on held-out captions and
fixed noise (two noise seeds per caption; step k's fresh noise from ``fresh_seed(seed, k)``,
as ``VideoGenerator`` draws it), scores the decoded videos with the shapes summary and
compares every share with 0 at the same n, paired over the same videos
(mean +- standard error, wins / losses). The table comes last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import load_probe, paired, probe_header, sampled_summaries  # noqa: E402

SHARES = (0.0, 0.25, 0.5, 1.0)
STEPS = (4, 8)


def main() -> None:
    args, gen, caps, cond, noises = load_probe(__doc__)
    sch = gen.schedule()
    models = {"student": gen.student, "untrained": gen.untrained().student}
    scores: dict[tuple[str, int, float], np.ndarray] = {}
    with torch.no_grad():
        for (who, model), n, share in (
            (m, n, r) for m in models.items() for n in STEPS for r in SHARES
        ):
            per = sampled_summaries(gen, model, noises, cond, caps, sch.sampling_sigmas(n), share)
            scores[(who, n, share)] = per
            print(f"{who}, {n} steps, renoise {share:g}: {per.mean():.3f}", flush=True)

    print(probe_header(args.model, sch, caps))
    print("| model | steps | renoise | summary (mean +- std) | paired vs renoise 0 |")
    print("|---|---|---|---|---|")
    for (who, n, share), per in scores.items():
        vs = "(plain Euler)" if share == 0 else paired(per - scores[(who, n, 0.0)])
        print(f"| {who} | {n} | {share:g} | {per.mean():.3f} +- {per.std(ddof=1):.2f} | {vs} |")


if __name__ == "__main__":
    main()
