"""How should n sampling steps be shared between the two experts? A quality probe.

    python benchmarks/step_split.py [--model bundled:shapes-dcm] [--prompts 24]

``Schedule.sampling_sigmas`` gives the semantic expert ceil(n / 2) steps and the detail
expert the rest. This script samples a distilled shapes student with other shares (from
the same grid points) on held-out captions and fixed noise (two noise seeds per caption)
and scores the decoded videos with the shapes summary (``dcm/shapes/metrics.py``). Each
share is compared with the default one at the same n, paired over the same videos
(mean +- standard error, wins / losses). Detail steps take the model's own
``sample.renoise`` share of fresh noise, as ``dcm generate`` samples it. The table comes last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import load_probe, paired, probe_header, sampled_summaries  # noqa: E402


def shares(sch) -> dict[str, list[float]]:
    """Name ('n: SemE + DetE') -> descending sigma list, every share of n = 2, 3, 4 steps
    and the default one at 8 (``Schedule.sampling_sigmas(n, semantic_steps=k)``)."""
    out = {}
    for n in (2, 3, 4, 8):
        for k in range(1, n) if n < 8 else [(n + 1) // 2]:
            out[f"{n}: {k} + {n - k}"] = sch.sampling_sigmas(n, semantic_steps=k)
    return out


def main() -> None:
    args, gen, caps, cond, noises = load_probe(__doc__)
    sch = gen.schedule()
    scores: dict[str, np.ndarray] = {}
    lists = shares(sch)
    renoise = float(gen.cfg.sample.renoise)
    with torch.no_grad():
        for name, sigmas in lists.items():
            scores[name] = sampled_summaries(gen, gen.student, noises, cond, caps, sigmas, renoise)
            print(f"{name}: {scores[name].mean():.3f}", flush=True)

    print(probe_header(args.model, sch, caps) + f"detail steps re-noised with share {renoise:g}\n")
    print("| steps: SemE + DetE | sigmas | summary (mean +- std) | paired vs the default |")
    print("|---|---|---|---|")
    for name, per in scores.items():
        n = int(name.split(":")[0])
        default = f"{n}: {(n + 1) // 2} + {n // 2}"
        vs = "(default)" if name == default else paired(per - scores[default])
        sig = ", ".join(f"{s:.3f}" for s in lists[name])
        print(f"| {name} | {sig} | {per.mean():.3f} +- {per.std(ddof=1):.2f} | {vs} |")


if __name__ == "__main__":
    main()
