"""Which expert does a distilled shapes student owe its score to? A quality probe.

    python benchmarks/expert_mix.py [--model bundled:shapes-dcm] [--prompts 24]

Samples the student's own 2/4/8-step lists with the sigma > sigma_b steps taken by one
source and the detail steps by another. The sources are the student's experts (S), its
untrained start (U: the teacher's weights without guidance) and the guided teacher (T: CFG
at the model's scale). Every detail step takes the model's ``sample.renoise`` share of fresh
noise, whichever source makes it. Scored with the shapes summary on held-out captions and
fixed noise (two seeds per caption), paired against the student itself. The table comes last
(docs/QUALITY.md section 17).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from dcm.config import SEMANTIC  # noqa: E402

MIXES = ("S + S", "U + U", "S + U", "U + S", "T + S", "S + T", "T + U")  # SemE source + DetE source


def mixed(semantic, detail):
    """A sampler model taking the semantic steps from ``semantic`` and the rest from
    ``detail`` (every row of a sampling step has the same expert id)."""

    def model(x, t, cond, expert):
        return (semantic if bool((expert == SEMANTIC).all()) else detail)(x, t, cond, expert)

    return model


def main() -> None:
    args, gen, caps, cond, noises = common.load_probe(__doc__)
    sch = gen.schedule()
    null = gen.bundle.encode_text([""] * len(caps))
    source = {
        "S": gen.student,
        "U": gen.untrained().student,
        "T": common.guided_teacher(gen.teacher, null, gen.method),
    }
    renoise = float(gen.cfg.sample.renoise)
    scores: dict[tuple[int, str], np.ndarray] = {}
    with torch.no_grad():
        for n in (2, 4, 8):
            sigmas = sch.sampling_sigmas(n)
            for mix in MIXES:
                sem, det = (source[k] for k in mix.split(" + "))
                per = common.sampled_summaries(
                    gen, mixed(sem, det), noises, cond, caps, sigmas, renoise
                )
                scores[(n, mix)] = per
                print(f"{n} steps, {mix}: {per.mean():.3f}", flush=True)

    print(
        common.probe_header(args.model, sch, caps)
        + f"detail steps re-noised with share {renoise:g}"
    )
    print("S: the student's experts; U: its untrained start; T: the guided teacher\n")
    print("| SemE + DetE | " + " | ".join(f"{n} steps (paired vs S + S)" for n in (2, 4, 8)) + " |")
    print("|---|---|---|---|")
    for mix in MIXES:
        cells = []
        for n in (2, 4, 8):
            per = scores[(n, mix)]
            vs = "" if mix == "S + S" else f", {common.paired(per - scores[(n, 'S + S')])}"
            cells.append(f"{per.mean():.3f}{vs}")
        print(f"| {mix} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
