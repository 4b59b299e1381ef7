"""Does the detail expert fail on the states it is given at sampling time, or everywhere?

    python benchmarks/detail_shift.py [--model bundled:shapes-dcm] [--prompts 24]

The detail expert trains on noised dataset clips, x_k = (1 - sigma_k) x0 + sigma_k eps
(METHOD.md section 4), but at sampling time it starts from whatever the semantic expert
hands it at sigma_b. docs/QUALITY.md section 8 found it 0.09 below the teacher's tail from
the semantic expert's states. If it were close to the teacher's tail from noised *clips* (its
training distribution) and far only from the semantic expert's states, the cause would be a
train / sample mismatch of its inputs; if it is just as far from both, it is the fit itself.

Three kinds of state at sigma_b, for the same held-out captions x 2 noise seeds:

- clip: the caption's own rendered clip, encoded and noised to sigma_b (training's inputs);
- student: the student's semantic steps of its 4-step list (what sampling hands over; the
  1-jump finish below starts from this state too);
- teacher: the guided teacher's 50-step list down to sigma_b (the teacher's own path).

Each is finished by the student's own detail steps (1 jump: the 2-step list; 2 steps: the
4-step list) and by the guided teacher's training-grid tail (the detail target's fixed
point). Reported: shapes summaries, paired differences against the teacher's tail from the
same state, and the latent MSE between the student's finish and that tail. Table last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    NOISE_SEEDS,
    encode_clips,
    guided_teacher,
    load_probe,
    paired,
    probe_header,
    shapes_summaries,
    to_split,
)

from dcm.sampler import sample, teacher_sample  # noqa: E402


def main() -> None:
    args, gen, caps, cond, noises = load_probe(__doc__)
    bundle, student, sch, teacher = gen.bundle, gen.student, gen.schedule(), gen.teacher
    method, null = gen.cfg.method, bundle.null_cond(1)
    sb = sch.sigma_split
    below = [float(s) for s in sch.sigmas.flip(0) if s < sb]
    grid_tail = [sb, *below, sch.sigma_min, 0.0]
    head50, head4 = (
        sch.semantic_head(sch.teacher_sigmas(50)),
        sch.semantic_head(sch.sampling_sigmas(4)),
    )
    finishes = {  # name -> descending sigmas from sigma_b to 0, sampled by the student
        "1 jump": [s for s in sch.sampling_sigmas(2) if s <= sb],
        "2 steps": [s for s in sch.sampling_sigmas(4) if s <= sb],
    }
    guided = guided_teacher(teacher, null, method)
    x0 = encode_clips(bundle, len(caps), 123, "heldout")[0]  # heldout_inputs' captions
    states = {  # name -> one state batch per noise seed
        "clip": [(1.0 - sb) * x0 + sb * nz for nz in noises],
        "student": [to_split(student, nz.float(), cond, head4, sch) for nz in noises],
        "teacher": [to_split(guided, nz.float(), cond, head50, sch) for nz in noises],
    }
    with torch.no_grad():
        data_scores = np.asarray(
            [s for _ in noises for s in shapes_summaries(bundle, x0, caps)], dtype=float
        )
        print(f"the clips themselves, decoded: {data_scores.mean():.3f}", flush=True)
        rows = []
        for st, xs in states.items():
            ref = [teacher_sample(teacher, x, cond, null, grid_tail, method) for x in xs]
            ref_s = np.asarray([s for z in ref for s in shapes_summaries(bundle, z, caps)])
            rows.append((st, "teacher, grid tail", ref_s, None, ""))
            for name, tail in finishes.items():
                zs = [sample(student, x, cond, tail, sch) for x in xs]
                per = np.asarray([s for z in zs for s in shapes_summaries(bundle, z, caps)])
                mse = float(
                    np.mean([((z - r) ** 2).mean().item() for z, r in zip(zs, ref, strict=True)])
                )
                rows.append((st, f"student, {name}", per, mse, paired(per - ref_s)))
                print(f"{st} / {name}: {per.mean():.3f} (tail {ref_s.mean():.3f})", flush=True)

    print(probe_header(args.model, sch, caps))
    print(f"sigma_b = {sb:.3f}; noise seeds {NOISE_SEEDS}; decoded clips {data_scores.mean():.3f}")
    print(
        "| state at sigma_b | finish | summary (mean +- std) | MSE to the tail | paired vs tail |"
    )
    print("|---|---|---|---|---|")
    for st, name, per, mse, vs in rows:
        m = "" if mse is None else f"{mse:.4f}"
        print(f"| {st} | {name} | {per.mean():.3f} +- {per.std(ddof=1):.2f} | {m} | {vs} |")


if __name__ == "__main__":
    main()
