"""Why does (or doesn't) distillation improve the shapes student? A single-process study.

Runs the library's own training steps (``dcm.steps``) with a plain torch AdamW, no Ray and
no DeepSpeed, so that one knob at a time can be varied quickly on a CPU, and measures the
student as it trains against two baselines on fixed held-out prompts and noise:

- fid: mean squared distance (normalised latents) of the student's n-step sample to the
  teacher's own 50-step guided sample from the SAME noise: what a consistency model is
  trained to reproduce, with far less noise than a pixel metric;
- score: the shapes summary score of the decoded n-step sample (dcm/shapes/metrics.py).

Step 0 is the untrained student (the teacher's weights, no CFG). Example:

    python benchmarks/distill_study.py --steps 300 --lr 1e-4 --cfg 5 --split 34
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import get_args, get_type_hints

import torch
from common import encode_clips, guided_teacher, to_split

from dcm.backbones.base import make_backbone
from dcm.bundle import load_bundle
from dcm.config import DETAIL, LoraConfig, MethodConfig, load_config
from dcm.ema import ema_update
from dcm.experts import DualExpert
from dcm.generate import to_uint8
from dcm.sampler import sample, teacher_sample
from dcm.schedule import Schedule
from dcm.shapes.metrics import score_batch
from dcm.steps import DetailStep, SemanticStep


class _Routed(torch.nn.Module):
    """Two models as one sampler model: expert 0 rows to ``sem``, expert 1 rows to ``det``
    (the study's samplers give every row of a call the same expert)."""

    def __init__(self, sem: torch.nn.Module, det: torch.nn.Module) -> None:
        super().__init__()
        self.sem, self.det = sem, det

    def forward(self, x, t, cond, expert):
        model = self.det if bool((expert == DETAIL).all()) else self.sem
        return model(x, t, cond, expert)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per stage")
    ap.add_argument("--stage", default="semantic", choices=["semantic", "detail", "both"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-detail", type=float, default=None)
    ap.add_argument(
        "--detail-decay",
        default="none",
        choices=["none", "cosine"],
        help="diagnostic: the detail stage's rate decays to 0 over its steps (cosine); tests "
        "whether its loss floor is gradient noise",
    )
    ap.add_argument(
        "--semantic-decay",
        default="none",
        choices=["none", "cosine"],
        help="the same for the semantic stage: does a decaying rate settle its weights higher "
        "than a constant one (docs/QUALITY.md section 18)?",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0, help="teacher CFG w inside the target")
    ap.add_argument("--split", type=int, default=34)
    ap.add_argument("--grid", type=int, default=50, help="grid points N of the training grid")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--lora-ffn",
        action="store_true",
        help="diagnostic: the detail LoRA also on the feed-forward layers (Wan backbone)",
    )
    ap.add_argument("--ema", type=float, default=0.0, help="EMA target decay (0 = off)")
    ap.add_argument("--loss", default="huber", choices=["huber", "l2"])
    hints = get_type_hints(MethodConfig)  # the Literal choices of the fields below
    for field, what in (
        ("detail_target", "the DetE regresses on its bootstrap or the teacher's own tail"),
        ("detail_inputs", "the DetE trains on noised clips or on sampled states"),
        ("adv_real", "the discriminator's real sample is the target or the clip"),
    ):  # choices and default from the config's Literal, so the flags follow MethodConfig
        ap.add_argument(
            f"--{field.replace('_', '-')}",
            default=getattr(MethodConfig(), field),
            choices=get_args(hints[field]),
            help=f"method.{field}: {what}",
        )
    ap.add_argument("--adv", type=float, default=0.1, help="detail stage adv weight")
    ap.add_argument(
        "--lr-disc", type=float, default=None, help="discriminator rate (default: the stage's)"
    )
    ap.add_argument("--disc-hidden", type=int, default=64, help="discriminator head width")
    ap.add_argument("--train-clips", type=int, default=256)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--eval-steps", default="2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--detail-on-teacher",
        action="store_true",
        help="diagnostic: train the detail expert on a fresh copy of the teacher instead of "
        "on the trained semantic expert; sampling routes sigma > sigma_b to the latter",
    )
    ap.add_argument(
        "--detail-full",
        action="store_true",
        help="with --detail-on-teacher: every parameter of that copy trains (no LoRA)",
    )
    ap.add_argument("--cache", default="", help="folder caching encoded data + reference")
    ap.add_argument(
        "--semantic-ckpt",
        default="",
        help="file holding the student after the semantic stage: loaded when it exists "
        "(the stage is skipped), written after the stage otherwise",
    )
    args = ap.parse_args()
    if args.detail_full and not args.detail_on_teacher:
        ap.error("--detail-full needs --detail-on-teacher (else it would retrain the SemE)")
    torch.manual_seed(args.seed)

    over = {
        "method.cfg_scale": args.cfg,
        "method.split": args.split,
        "method.grid_points": args.grid,
        "method.ema_decay": args.ema,
        "method.adv_weight": args.adv,
        "method.disc_hidden": args.disc_hidden,
        "method.consistency_loss": "pseudo_huber" if args.loss == "huber" else "l2",
        "method.detail_target": args.detail_target,
        "method.detail_inputs": args.detail_inputs,
        "method.adv_real": args.adv_real,
    }
    cfg = load_config(None, "shapes-tiny", [f"{k}={v}" for k, v in over.items()])
    bundle = load_bundle(cfg.model.path, text_max_length=cfg.model.text_max_length)
    teacher = make_backbone(bundle.transformer).eval().requires_grad_(False)
    sch = Schedule.from_config(cfg.method)
    null = bundle.null_cond(1)
    steps_list = [int(s) for s in args.eval_steps.split(",")]

    t0 = time.time()
    key = f"{args.train_clips}-{args.seed}-{args.val}-{args.cfg}"
    cache = Path(args.cache) / f"study-{key}.pt" if args.cache else None
    if cache is not None and cache.exists():
        x0_all, cond_all, vcond, vcaps, vnoise, ref = torch.load(cache, weights_only=False)
    else:
        x0_all, cond_all, _ = encode_clips(bundle, args.train_clips, args.seed, "train")
        # validation: held-out captions, fixed noise, the teacher's 50-step guided sample
        _, vcond, vcaps = encode_clips(bundle, args.val, 123, "heldout")
        shape = (args.val, *x0_all.shape[1:])
        vnoise = torch.randn(shape, generator=torch.Generator().manual_seed(777))
        ref = teacher_sample(teacher, vnoise, vcond, null, sch.teacher_sigmas(50), cfg.method)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((x0_all, cond_all, vcond, vcaps, vnoise, ref), cache)
    print(f"data + teacher reference: {time.time() - t0:.0f} s", flush=True)

    def decode_scores(z: torch.Tensor) -> list[float]:
        """Per-prompt shapes summaries (kept in the curves for paired comparisons)."""
        frames = to_uint8(bundle.decode(z))
        return [
            round(float(r["summary"]), 3) for r in score_batch(list(frames), vcaps)["per_video"]
        ]

    def decode_score(z: torch.Tensor) -> float:
        return sum(decode_scores(z)) / z.shape[0]

    curves: list[dict] = []
    ref_score = decode_score(ref)
    for n in steps_list:
        zt = teacher_sample(teacher, vnoise, vcond, null, sch.teacher_sigmas(n), cfg.method)
        print(f"teacher@{n} score {decode_score(zt):.3f}  teacher@50 {ref_score:.3f}", flush=True)

    def head_to_split(x: torch.Tensor, sigmas: list[float], model) -> torch.Tensor:
        """``model``'s Euler steps along the part of ``sigmas`` above sigma_b, to sigma_b."""
        return to_split(model, x, vcond, sch.semantic_head(sigmas), sch)

    def finish_with_teacher(x: torch.Tensor, sigmas: list[float], model) -> torch.Tensor:
        """The SemE part of ``sigmas`` by ``model`` (down to sigma_b), then the teacher's
        own guided grid from sigma_b to 0: isolates what the semantic expert gets right."""
        x = head_to_split(x, sigmas, model)
        tail = [s for s in sch.teacher_sigmas(50) if s <= sch.sigma_split]
        return teacher_sample(teacher, x, vcond, null, tail, cfg.method)

    def evaluate(model, step: int, stage: str, score: bool = True) -> dict:
        row: dict = {"stage": stage, "step": step}
        with torch.no_grad():
            for n in steps_list:
                sig = sch.sampling_sigmas(n)
                xb = head_to_split(vnoise.clone(), sig, model)
                row[f"bfid{n}"] = round(float(((xb - ref_b) ** 2).mean()), 5)
                zs = finish_with_teacher(vnoise.clone(), sig, model)
                row[f"semfid{n}"] = round(float(((zs - ref) ** 2).mean()), 5)
                z = sample(model, vnoise, vcond, sig, sch)
                row[f"fid{n}"] = round(float(((z - ref) ** 2).mean()), 5)
                if score:
                    per = decode_scores(z)
                    row[f"score{n}"] = round(sum(per) / len(per), 3)
                    row[f"per{n}"] = per
                    # the semantic part with the teacher's tail: is the layout already lost?
                    row[f"semscore{n}"] = round(decode_score(zs), 3)
        curves.append(row)
        print(json.dumps(row), flush=True)
        return row

    # the teacher + CFG along its 50-step list down to sigma_b (the grid itself when N = 50)
    guided = guided_teacher(teacher, null, cfg.method)
    ref_b = head_to_split(vnoise.clone(), sch.teacher_sigmas(50), guided)

    evaluate(guided, 0, "teacher-cfg-same-sigmas")
    student = DualExpert(copy.deepcopy(bundle.transformer))
    stages = ["semantic", "detail"] if args.stage == "both" else [args.stage]
    gen = torch.Generator().manual_seed(args.seed + 1)
    student.eval()  # no dropout anywhere; eval() only matters for the study's sampling
    evaluate(student, 0, "init")
    ckpt = Path(args.semantic_ckpt) if args.semantic_ckpt else None
    semantic_model = None  # with --detail-on-teacher: the trained SemE, sampled above sigma_b

    def view() -> torch.nn.Module:
        return student if semantic_model is None else _Routed(semantic_model, student)

    for stage in stages:
        if stage == "semantic" and ckpt is not None and ckpt.exists():
            student.load_state_dict(torch.load(ckpt, weights_only=True))
            evaluate(student, args.steps, "semantic (loaded)")
            continue
        if stage == "detail" and args.detail_on_teacher:
            semantic_model = student
            student = DualExpert(copy.deepcopy(bundle.transformer)).eval()
        # --detail-full: no LoRA; a DualExpert without a detail expert trains all its weights
        if stage == "detail" and not args.detail_full:
            if args.lora_ffn:  # METHOD.md section 6 scopes LoRA to attention; this widens it
                student.base.lora_scope = (
                    r"blocks\.\d+\.(?:attn[12]\.{targets}|ffn\.net\.(?:0\.proj|2))"
                )
            student.enable_detail_expert(LoraConfig(rank=args.rank, alpha=2.0 * args.rank))
        params = student.trainable_parameters()
        print(f"{stage}: {sum(p.numel() for p in params)} trainable parameters", flush=True)
        lr = args.lr_detail if (stage == "detail" and args.lr_detail) else args.lr
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-3)
        decay = None
        if (args.detail_decay if stage == "detail" else args.semantic_decay) == "cosine":
            decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
        step_fn = (SemanticStep if stage == "semantic" else DetailStep)(sch, cfg.method)
        disc, dopt = None, None
        if stage == "detail":
            from dcm.discriminator import Discriminator

            disc = Discriminator(
                teacher.num_taps(cfg.method.tap_every), teacher.dim, cfg.method.disc_hidden
            )
            lr_d = args.lr_disc or lr
            dopt = torch.optim.AdamW(disc.parameters(), lr=lr_d, betas=(0.0, 0.999))
        ema = copy.deepcopy(student).requires_grad_(False) if args.ema > 0 else None
        t1, d_sum, d_n = time.time(), 0.0, 0
        for it in range(1, args.steps + 1):
            idx = torch.randint(0, x0_all.shape[0], (args.batch,), generator=gen)
            batch = {"x0": x0_all[idx], "cond": cond_all.index(idx), "null_cond": null}
            if stage == "semantic":
                out = step_fn(student, teacher, batch, gen, target=ema)
                loss = out["loss"]
            else:
                out = step_fn(student, teacher, disc, batch, gen, target=ema)
                loss = out["loss_g"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if decay is not None:
                decay.step()
            if disc is not None:
                dopt.zero_grad(set_to_none=True)
                out["loss_d"].backward()
                dopt.step()
                d_sum, d_n = d_sum + float(out["loss_d"]), d_n + 1
            if ema is not None:
                ema_update(ema.parameters(), student.parameters(), args.ema)
            if it % args.every == 0 or it == args.steps:
                parts = " ".join(f"{k} {float(v):.4f}" for k, v in out.items())
                if disc is not None:  # 2.0 = a discriminator at chance; 0 = it separates all
                    parts += f" loss_d_mean {d_sum / d_n:.4f}"
                print(f"{stage} {it} {parts} {time.time() - t1:.0f}s", flush=True)
                d_sum, d_n = 0.0, 0
                evaluate(view(), it, stage, score=it == args.steps)
        if stage == "semantic" and ckpt is not None:
            torch.save(student.state_dict(), ckpt)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "curves": curves}, f, indent=1)


if __name__ == "__main__":
    main()
