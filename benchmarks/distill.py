"""Distillation throughput per stage: samples/s, peak memory and model FLOPs utilisation.

    python benchmarks/distill.py            # CPU: shapes-tiny preset, tiny random bundle
    python benchmarks/distill.py --gpu      # GPU: Wan2.1-1.3B config, random weights,
                                            # 33 and 81 frames at 480x832, ZeRO-2, bf16
    python benchmarks/distill.py --bf16     # CPU, shapes, under the GPU precision policy

Each (stage, frame count) case runs in its own process (so peak memory is that case's)
with one DeepSpeed rank and the same code as a Ray Train worker: the student engine of
``pipelines.train_loop.deepspeed_config`` and ``optimizer_step`` with dcm's step functions
(activation checkpointing on). No Ray is needed, so it runs on a bare GPU machine.

Model FLOPs (MFU's numerator) are the useful work of one step, without the activation
recomputation: F = FLOPs of one transformer forward on one sample (counted with
torch.utils.flop_counter) times batch times forward-equivalents per sample:
semantic 6 = student forward + backward (3) + target (1) + teacher with CFG (2);
detail 8 = student forward + input-gradient backward (2; only LoRA and the copies train)
+ target (1) + teacher with CFG (2) + fake taps forward + input-gradient backward (2)
+ real taps (1). The discriminator heads and feature-matching projections are left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import WAN_1_3B

FORWARDS = {"semantic": 6, "detail": 8}
# Dense bf16 peak of the GPUs this project is lent (vendor figures, TFLOP/s).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def _init_single_rank(backend: str) -> None:
    """A one-process torch.distributed group (DeepSpeed needs one), on a free port."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _model_and_config(args: argparse.Namespace, frames: int) -> tuple[Any, Any, tuple, tuple]:
    """(transformer, Config, latent shape (C, T, h, w), text shape (L, D)) of a case."""
    from dcm.config import load_config

    if args.gpu:
        from diffusers import WanTransformer3DModel

        cfg = load_config(None, "wan2.1-t2v-1.3b", [
            f"data.num_frames={frames}", f"data.height={args.height}", f"data.width={args.width}",
            f"train.zero_stage={args.zero}", f"train.offload={str(args.offload).lower()}",
            "train.activation_checkpointing=true",
            f"train.global_batch={args.batch}", "train.num_workers=1",
        ])  # fmt: skip
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": args.layers})
        shape = (16, cfg.latent_frames, args.height // 8, args.width // 8)
        return transformer, cfg, shape, (cfg.model.text_max_length, 4096)

    from dcm.bundle import load_bundle
    from dcm.tiny import build_tiny_bundle

    folder = build_tiny_bundle(Path(tempfile.mkdtemp(prefix="dcm-bench-")) / "bundle")
    cfg = load_config(None, "shapes-tiny", [
        f"data.num_frames={frames}", "train.activation_checkpointing=true",
        f"train.zero_stage={args.zero}", f"train.offload={str(args.offload).lower()}",
        f"train.global_batch={args.batch}", "train.num_workers=1",
    ])  # fmt: skip
    bundle = load_bundle(folder, components=("transformer",))
    shape = bundle.latent_shape(frames, cfg.data.height, cfg.data.width)
    text_dim = int(bundle.transformer_config["text_dim"])
    return bundle.transformer, cfg, shape, (cfg.model.text_max_length, text_dim)


def _forward_flops(
    teacher: Any, x: torch.Tensor, cond: Any, device: torch.device, bf16: bool
) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.train_loop import _autocast

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, _autocast(device, bf16):
        teacher(x[:1], torch.full((1,), 500.0, device=device), cond.index(slice(0, 1)))
    return float(counter.get_total_flops())


def run_case(args: argparse.Namespace, stage: str, frames: int) -> dict[str, Any]:
    """One (stage, frames) case in this process: warm-up, then timed optimiser steps."""
    import deepspeed

    from dcm.backbones.base import Cond, make_backbone
    from dcm.discriminator import Discriminator
    from dcm.experts import DualExpert
    from dcm.schedule import Schedule
    from dcm.steps import DetailStep, SemanticStep
    from pipelines.train_loop import deepspeed_config, optimizer_step

    gpu = args.gpu and not args.cpu_check  # --cpu-check: the Wan path, shrunk, on the CPU
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    _init_single_rank("nccl" if gpu else "gloo")
    mixed = gpu or args.bf16  # the GPU precision policy: fp32 weights, bf16 autocast
    dtype = torch.bfloat16 if mixed else torch.float32
    transformer, cfg, shape, text_shape = _model_and_config(args, frames)
    t = cfg.train

    student = DualExpert(copy.deepcopy(transformer))
    if stage == "detail":  # random weights: the semantic stage's artifact is not needed
        student.enable_detail_expert(cfg.lora)
    student.set_checkpointing(True)
    teacher = make_backbone(transformer).to(device=device, dtype=dtype)
    teacher.eval().requires_grad_(False)
    teacher.set_checkpointing(True)
    disc = disc_opt = None
    if stage == "detail":
        disc = Discriminator(
            teacher.num_taps(cfg.method.tap_every), teacher.dim, cfg.method.disc_hidden
        ).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=t.lr_disc, betas=t.disc_betas)
    lr = t.lr_semantic if stage == "semantic" else t.lr_detail
    opt = torch.optim.AdamW(student.trainable_parameters(), lr=lr, betas=t.betas)
    engine, _, _, _ = deepspeed.initialize(
        model=student, optimizer=opt, config=deepspeed_config(cfg, args.batch, mixed)
    )
    step_fn = (SemanticStep if stage == "semantic" else DetailStep)(
        Schedule.from_config(cfg.method), cfg.method, cfg.data.empty_prompt_prob
    )
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn((args.batch, *shape), device=device)  # (B, C, T, h, w) normalised
    text = torch.randn((args.batch, *text_shape), device=device) * 0.1  # (B, L, D)
    mask = torch.ones(args.batch, text_shape[0], dtype=torch.long, device=device)
    batch = {
        "x0": x0, "cond": Cond(text=text, mask=mask),
        "null_cond": Cond(text=torch.zeros_like(text[:1]), mask=mask[:1]),
    }  # fmt: skip

    def one() -> dict[str, float]:
        out = optimizer_step(
            stage, step_fn, engine, teacher, disc, disc_opt, [batch], g, 1.0, 1, bf16=mixed
        )
        if gpu:
            torch.cuda.synchronize(device)
        return out

    for _ in range(args.warmup):
        one()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        losses = one()
    seconds = (time.perf_counter() - start) / args.steps
    flops = _forward_flops(teacher, x0, batch["cond"], device, mixed) * args.batch * FORWARDS[stage]
    peak = args.peak_tflops or (_gpu_peak_tflops() if gpu else 0.0)
    if gpu:
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "stage": stage,
        "frames": frames,
        "latent": list(shape),
        "tokens": int(
            teacher.token_grid(shape)[0]
            * teacher.token_grid(shape)[1]
            * teacher.token_grid(shape)[2]
        ),  # fmt: skip
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "s_per_step": seconds,
        "samples_per_s": args.batch / seconds,
        "peak_memory_gib": memory,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak * 1e12) if peak else None,
        "trainable_params_m": sum(p.numel() for p in student.trainable_parameters()) / 1e6,
        "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "bf16": mixed,
        "last_losses": losses,
    }


def _gpu_peak_tflops() -> float:
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="Wan2.1-1.3B on the GPU (else shapes on CPU)")
    p.add_argument("--frames", default=None, help="comma list (GPU default 33,81; CPU 17)")
    p.add_argument("--stages", default="semantic,detail")
    p.add_argument("--batch", type=int, default=None, help="per-step batch (GPU 1, CPU 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (GPU 5, CPU 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--offload", action="store_true", help="DeepSpeed CPU offload")
    p.add_argument("--layers", type=int, default=30, help="Wan blocks (30 = the real 1.3B)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the MFU denominator")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--cpu-check", action="store_true", help="run the --gpu path on the CPU")
    p.add_argument("--bf16", action="store_true", help="the GPU precision policy on any device")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: 'stage:frames' in a child
    args = p.parse_args(argv)
    args.bf16 = args.bf16 or args.cpu_check
    args.frames = args.frames or ("33,81" if args.gpu else "17")
    args.batch = args.batch or (1 if args.gpu else 4)
    args.steps = args.steps or (5 if args.gpu else 10)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.case:
        stage, frames = args.case.split(":")
        print("RESULT " + json.dumps(run_case(args, stage, int(frames))), flush=True)
        return 0
    if args.gpu and not args.cpu_check and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device", file=sys.stderr)
        return 2
    results = []
    for frames in (int(f) for f in args.frames.split(",")):
        for stage in args.stages.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, *argv, "--case", f"{stage}:{frames}"],
                capture_output=True, text=True,
            )  # fmt: skip
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{stage} {frames} frames failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                results.append({"stage": stage, "frames": frames, "error": proc.stderr[-500:]})
                continue
            res = json.loads(line[len("RESULT ") :])
            results.append(res)
            mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
            print(
                f"{stage:<8} {frames:>3} frames ({res['tokens']} tokens) on {res['device']}: "
                f"{res['samples_per_s']:.3f} samples/s, {res['s_per_step']:.2f} s/step, "
                f"peak {res['peak_memory_gib']:.2f} GiB, {res['achieved_tflops']:.3g} TFLOP/s, "
                f"MFU {mfu}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
