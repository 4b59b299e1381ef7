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


def averaged(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of the checkpoints' artifact weights (``experts.safetensors``), key by key."""
    from safetensors.torch import load_file

    from dcm.experts import ARTIFACT_WEIGHTS

    sds = [load_file(str(f / "artifact" / ARTIFACT_WEIGHTS)) for f in folders]
    return {k: (sum(sd[k].float() for sd in sds) / len(sds)).to(v.dtype) for k, v in sds[0].items()}


def scores(
    folder: Path, prompts: int, renoise: float, weights: dict[str, torch.Tensor] | None = None
) -> tuple[int, dict, np.ndarray]:
    """(step, the run's val metrics, per-video summaries (len(STEPS), videos)) of a checkpoint;
    ``weights`` replace its student's (same architecture)."""
    from dcm.generate import VideoGenerator
    from dcm.shapes.grammar import all_captions

    state = json.loads((folder / "state.json").read_text())
    gen = VideoGenerator.load(str(folder / "artifact"), "cpu")
    if weights is not None:
        gen.student.load_state_dict(weights)
    gen.student.eval()
    caps = all_captions("train")[::4][:prompts]
    shape = gen.bundle.latent_shape(
        gen.cfg.data.num_frames, gen.cfg.data.height, gen.cfg.data.width
    )
    noises = [
        torch.randn((len(caps), *shape), generator=torch.Generator().manual_seed(s))
        for s in common.NOISE_SEEDS
    ]
    cond, sch = gen.bundle.encode_text(caps), gen.schedule()
    with torch.no_grad():
        per = [
            common.sampled_summaries(
                gen, gen.student, noises, cond, caps, sch.sampling_sigmas(n), renoise
            )
            for n in STEPS
        ]
    return int(state["step"]), state.get("metrics", {}), np.stack(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders of one run")
    ap.add_argument("--prompts", type=int, default=24, help="training captions")
    ap.add_argument("--renoise", type=float, default=1.0, help="sample.renoise of the sampler")
    ap.add_argument("--average", action="store_true", help="also the mean of their weights")
    args = ap.parse_args()
    rows = [scores(c, args.prompts, args.renoise) for c in args.checkpoints]
    if args.average:
        _, _, per = scores(
            args.checkpoints[0], args.prompts, args.renoise, averaged(args.checkpoints)
        )
        rows.append((-1, {}, per))  # step -1: the average

    videos = rows[0][2].shape[1]
    print(
        f"\n{common.machine()}\n{args.prompts} training captions x 2 noise seeds = {videos} videos"
    )
    head = " | ".join(f"{n} steps: this set, paired vs the first" for n in STEPS)
    print(f"\n| step | val/score (2 / 4 steps) | {head} |")
    print("|---|---|" + "---|" * len(STEPS))
    for step, metrics, per in rows:
        val = (
            " / ".join(f"{metrics.get(f'val/score_{n}steps', float('nan')):.3f}" for n in STEPS)
            if metrics
            else "-"
        )
        cells = []
        for i in range(len(STEPS)):
            vs = "" if per is rows[0][2] else f", {common.paired(per[i] - rows[0][2][i])}"
            cells.append(f"{per[i].mean():.3f}{vs}")
        name = "mean of their weights" if step < 0 else str(step)
        print(f"| {name} | {val} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
