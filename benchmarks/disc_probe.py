"""Can the detail stage's discriminator tell the student's videos from real clips at all?

    python benchmarks/disc_probe.py [--model bundled:shapes-dcm] [--steps 300] [--lr 1e-3]

In every detail-stage run of docs/QUALITY.md the discriminator's hinge loss stays at 2.0,
chance: the GAN and feature-matching terms then only add noise to the student's update.
Either the discriminator trains too little inside the joint run, or the frozen teacher's
tapped features (its only input, METHOD.md section 6) do not separate what the student gets
wrong. This probe trains the discriminator ALONE, with the student frozen, on fixed pairs:
"real" = rendered training clips, "fake" = a video made from the same caption by

- the shipped student, 4 steps and 2 steps (what the GAN would have to correct);
- the guided teacher, 2 steps (a positive control: blurry blobs, scored 0.27);
- the same captions rendered again, other positions and paths (the null control: real
  against real, must stay near chance; a caption-conditioned discriminator would spot
  clips of OTHER captions at once).

Both sides are re-noised to sigma_a with one shared eps2, exactly as in training
(``DetailStep``, a ~ U{0..b}). After ``--steps`` discriminator steps it is scored on
held-out captions at three noise levels: the paired accuracy is the share of (real, fake)
pairs, same caption and same eps2, whose real video gets the higher mean logit (0.5 =
chance, 1 = always right). Table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import encode_clips, guided_teacher, machine  # noqa: E402

from dcm.config import DETAIL  # noqa: E402
from dcm.discriminator import Discriminator  # noqa: E402
from dcm.generate import VideoGenerator  # noqa: E402
from dcm.losses import HingeDiscriminatorLoss  # noqa: E402
from dcm.sampler import sample  # noqa: E402


def renoise(x: torch.Tensor, sigma: torch.Tensor, eps2: torch.Tensor) -> torch.Tensor:
    """Clean latents (B, C, T, h, w) to sigma (B,) with shared noise eps2 (METHOD.md
    section 6 with sigma_e = 0)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1.0 - s) * x + s * eps2


def video_logits(disc, teacher, x, sigma, cond, every, grid) -> torch.Tensor:
    """(B,) mean logit over heads and tokens of the discriminator on x at sigma."""
    _, taps = teacher.forward_with_taps(x, 1000.0 * sigma, cond, every=every)
    return torch.stack([h.mean(1) for h in disc(taps, grid)]).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:shapes-dcm", help="a distilled shapes student")
    ap.add_argument("--train", type=int, default=128, help="training clips (pairs)")
    ap.add_argument("--heldout", type=int, default=48, help="held-out clips (pairs)")
    ap.add_argument("--steps", type=int, default=300, help="discriminator steps per pair kind")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=64, help="head width (method.disc_hidden)")
    args = ap.parse_args()
    torch.manual_seed(0)

    gen = VideoGenerator.load(args.model, "cpu")
    gen.student.eval()
    bundle, student, teacher, sch = gen.bundle, gen.student, gen.teacher, gen.schedule()
    method, null = gen.cfg.method, bundle.null_cond(1)
    every = method.tap_every
    t0 = time.time()
    sets = {}
    for split, n, seed in (("train", args.train, 0), ("heldout", args.heldout, 123)):
        x0, cond, _ = encode_clips(bundle, n, seed, split)
        other = encode_clips(bundle, n, seed, split, rerender=1)[0]  # same captions, new renders
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 7))
        with torch.no_grad():
            fakes = {
                "student, 4 steps": sample(student, noise, cond, sch.sampling_sigmas(4), sch),
                "student, 2 steps": sample(student, noise, cond, sch.sampling_sigmas(2), sch),
                "teacher + CFG, 2 steps": sample(
                    guided_teacher(teacher, null, method),
                    noise,
                    cond,
                    sch.teacher_sigmas(2),
                    sch,
                ),  # fmt: skip
                "the same captions rendered again (null control)": other,
            }
        sets[split] = (x0, cond, fakes)
    print(f"clips and fakes: {time.time() - t0:.0f} s", flush=True)

    grid = teacher.token_grid(tuple(sets["train"][0].shape))
    hinge = HingeDiscriminatorLoss()
    levels = [0, sch.split // 2, sch.split]  # a: sigma_min, mid, sigma_b
    level_sigmas = [float(sch.sigma_prev(torch.tensor([a]))[0]) for a in levels]
    rows = []
    for kind in sets["train"][2]:
        disc = Discriminator(teacher.num_taps(every), teacher.dim, args.hidden)
        opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.0, 0.999))
        x0, cond, fakes = sets["train"]
        g = torch.Generator().manual_seed(1)
        tail = []
        for _ in range(args.steps):
            idx = torch.randint(0, x0.shape[0], (args.batch,), generator=g)
            a = sch.sample_indices(torch.full((args.batch,), DETAIL), g)
            sig = sch.sigma_prev(a)
            eps2 = torch.randn(x0[idx].shape, generator=g)
            with torch.no_grad():
                c = cond.index(idx)
                _, tr = teacher.forward_with_taps(renoise(x0[idx], sig, eps2), 1000 * sig, c, every)
                _, tf = teacher.forward_with_taps(
                    renoise(fakes[kind][idx], sig, eps2), 1000 * sig, c, every
                )
            loss, _, _ = hinge(disc(tf, grid), disc(tr, grid))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tail = (tail + [float(loss)])[-50:]
        hx0, hcond, hfakes = sets["heldout"]
        accs = []
        with torch.no_grad():
            for sigma in level_sigmas:
                sig = torch.full((hx0.shape[0],), sigma)
                eps2 = torch.randn(hx0.shape, generator=torch.Generator().manual_seed(5))
                lr_ = video_logits(disc, teacher, renoise(hx0, sig, eps2), sig, hcond, every, grid)
                lf = video_logits(
                    disc, teacher, renoise(hfakes[kind], sig, eps2), sig, hcond, every, grid
                )
                accs.append(float((lr_ > lf).float().mean()))
        rows.append((kind, sum(tail) / len(tail), accs))
        print(kind, f"loss_d (last 50) {rows[-1][1]:.3f}", accs, flush=True)

    n = sets["heldout"][0].shape[0]
    print(f"\n{args.model}, grid {sch.grid_points}, split {sch.split}; {machine()}")
    print(
        f"discriminator alone: {args.steps} steps, batch {args.batch}, lr {args.lr:g}, "
        f"head width {args.hidden}; {args.train} training pairs, {n} held-out pairs\n"
    )
    head = " | ".join(f"sigma_a {s:.3f}" for s in level_sigmas)
    print(f"| fake side | loss_d, last 50 steps (2 = chance) | paired accuracy: {head} |")
    print("|---|---|" + "---|" * len(level_sigmas))
    for kind, loss, accs in rows:
        print(f"| {kind} | {loss:.3f} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    print(f"\n(one pair moves an accuracy by {1 / n:.3f}; {time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
