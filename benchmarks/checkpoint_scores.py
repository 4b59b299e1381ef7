"""Are a run's checkpoints really different, or is its validation curve noise? A quality probe.

    python benchmarks/checkpoint_scores.py CKPT [CKPT ...] [--prompts 24] [--renoise 1] [--average]

Each CKPT is a checkpoint folder of a shapes run (``<run>/<stage>/checkpoint_*``, holding
``artifact/`` and ``state.json``). Every checkpoint samples the same training captions (every
fourth of the training split, as docs/QUALITY.md section 11) from the same noise (two seeds
per caption) at 2 and 4 steps; the decoded videos are scored with the shapes summary and
paired against the first CKPT. Beside each row stands the run's own ``val/score`` reading at
that step (8 captions x 2 seeds), so the two can be compared (docs/QUALITY.md section 17).
``--average`` adds a row for the mean of all the checkpoints' weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

STEPS = (2, 4)


def main() -> None:
    from safetensors.torch import load_file

    from dcm.experts import ARTIFACT_WEIGHTS
    from dcm.generate import VideoGenerator
    from dcm.shapes.grammar import all_captions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders of one run")
    ap.add_argument("--prompts", type=int, default=24, help="training captions")
    ap.add_argument("--renoise", type=float, default=1.0, help="sample.renoise of the sampler")
    ap.add_argument("--average", action="store_true", help="also the mean of their weights")
    args = ap.parse_args()

    # one generator (VAE, text encoder, inputs); each checkpoint only swaps the student weights
    gen = VideoGenerator.load(str(args.checkpoints[0] / "artifact"), "cpu")
    gen.student.eval()
    caps = all_captions("train")[::4][: args.prompts]
    cond, noises, sch = (
        gen.bundle.encode_text(caps),
        common.probe_noises(gen, len(caps)),
        gen.schedule(),
    )
    weights = [load_file(str(c / "artifact" / ARTIFACT_WEIGHTS)) for c in args.checkpoints]
    states = [json.loads((c / "state.json").read_text()) for c in args.checkpoints]
    rows = [
        (str(st["step"]), st.get("metrics", {}), w) for st, w in zip(states, weights, strict=True)
    ]
    if args.average:
        mean = {
            k: (sum(w[k].float() for w in weights) / len(weights)).to(v.dtype)
            for k, v in weights[0].items()
        }
        rows.append(("mean of their weights", {}, mean))

    scored = []
    for name, metrics, state_dict in rows:
        gen.student.load_state_dict(state_dict)
        with torch.no_grad():
            per = np.stack([
                common.sampled_summaries(
                    gen, gen.student, noises, cond, caps, sch.sampling_sigmas(n), args.renoise
                )
                for n in STEPS
            ])  # fmt: skip
        scored.append((name, metrics, per))

    first = scored[0][2]
    print(
        f"\n{common.machine()}\n{len(caps)} training captions x 2 noise seeds = {first.shape[1]} videos"
    )
    head = " | ".join(f"{n} steps: this set, paired vs the first" for n in STEPS)
    print(f"\n| step | val/score (2 / 4 steps) | {head} |")
    print("|---|---|" + "---|" * len(STEPS))
    for i, (name, metrics, per) in enumerate(scored):
        val = (
            " / ".join(f"{metrics.get(f'val/score_{n}steps', float('nan')):.3f}" for n in STEPS)
            if metrics
            else "-"
        )
        cells = [
            f"{per[j].mean():.3f}" + (f", {common.paired(per[j] - first[j])}" if i else "")
            for j in range(len(STEPS))
        ]
        print(f"| {name} | {val} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
