"""Seconds, peak memory and network passes of one semantic and one detail training step.

    python benchmarks/train_step.py            # CPU, tiny random Wan (shapes-tiny sizes)
    python benchmarks/train_step.py --gpu      # CUDA, full-size Wan2.1-1.3B config, random
                                               # weights, 81x480x832 and 33x480x832

A step here is what the stage runner does once per micro-batch: ``SemanticStep`` or
``DetailStep`` forward, backward (G then D for the detail step) and an AdamW step, under
the runner's precision policy (GPU: fp32 master weights, bf16 autocast, bf16 frozen
teacher, activation checkpointing on every block; CPU: float32). Network passes are
counted at each transformer's patch embedding, which runs once per pass.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import WAN_1_3B, machine  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

from dcm.backbones import Cond, make_backbone  # noqa: E402
from dcm.config import LoraConfig, MethodConfig, load_config  # noqa: E402
from dcm.discriminator import Discriminator  # noqa: E402
from dcm.experts import DualExpert  # noqa: E402
from dcm.schedule import Schedule  # noqa: E402
from dcm.steps import DetailStep, SemanticStep  # noqa: E402

# shapes-tiny sizes (dcm/tiny.py defaults, 4 blocks so the discriminator has 2 taps)
WAN_TINY = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 8,
    "out_channels": 8,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 4,
    "rope_max_seq_len": 64,
}


class PassCounter:
    """Counts network passes: forward hooks on each model's patch embedding."""

    def __init__(self, **models: torch.nn.Module) -> None:
        self.counts = dict.fromkeys(models, 0)
        for name, model in models.items():
            model.patch_embedding.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(*_):
            self.counts[name] += 1

        return hook

    def take(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), dict.fromkeys(self.counts, 0)
        return out


class Meter:
    """Wall time (synchronised on CUDA) and peak memory of a block of work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        self.sync()
        sec = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # process peak RSS so far (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return sec, peak


def make_batch(cfg: dict, latent: tuple[int, ...], text_len: int, device, gen) -> dict:
    text = torch.randn(latent[0], text_len, cfg["text_dim"], generator=gen)
    return {
        "x0": torch.randn(latent, generator=gen).to(device),
        "cond": Cond(text=text).to(device),
        "null_cond": Cond(text=torch.zeros(1, text_len, cfg["text_dim"])).to(device),
    }


def bench(args: argparse.Namespace, frames: int, method: MethodConfig, lora: LoraConfig) -> list:
    gpu = args.gpu
    device = torch.device("cuda" if gpu else "cpu")
    cfg = WAN_1_3B if gpu else WAN_TINY
    t_lat = (frames - 1) // 4 + 1
    if gpu:
        latent = (args.batch, 16, t_lat, args.height // 8, args.width // 8)
        text_len = 512
    else:
        latent = (args.batch, 8, t_lat, 16, 16)  # 17 frames of 64x64 in shapes-tiny (VAE x4)
        text_len = 24
    torch.manual_seed(0)
    tr = WanTransformer3DModel(**cfg)
    teacher = make_backbone(copy.deepcopy(tr)).requires_grad_(False).eval()
    student = DualExpert(tr).train()
    if gpu:
        teacher.to(device, torch.bfloat16)
        student.to(device)  # fp32 master weights
    teacher.set_checkpointing(gpu)  # the detail step backpropagates through its taps
    student.set_checkpointing(gpu)
    counter = PassCounter(student=student.base.transformer, teacher=teacher.transformer)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    meter, sch = Meter(device), Schedule.from_config(method)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = make_batch(cfg, latent, text_len, device, torch.Generator().manual_seed(1))
    tokens = t_lat * (latent[3] // cfg["patch_size"][1]) * (latent[4] // cfg["patch_size"][2])
    rows = []

    # Stage 1: semantic expert, every transformer parameter trains.
    opt = torch.optim.AdamW(student.trainable_parameters(), lr=1e-6, weight_decay=1e-3)
    step = SemanticStep(sch, method)
    for i in range(args.warmup + args.repeat):
        counter.take()
        meter.start()
        with autocast:
            out = step(student, teacher, batch, gen)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sec, peak = meter.stop()
        if i >= args.warmup:
            rows.append(("semantic", frames, tokens, sec, peak, counter.take(), out["loss"].item()))
    del opt, out

    # Stage 2: detail expert (LoRA + copies) and the discriminator.
    student.enable_detail_expert(lora)
    student.to(device)
    n_taps = teacher.num_taps(method.tap_every)
    disc = Discriminator(n_taps, teacher.dim, method.disc_hidden).to(device)
    opt_g = torch.optim.AdamW(student.trainable_parameters(), lr=5e-6, weight_decay=1e-3)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-5, betas=(0.0, 0.999), weight_decay=1e-3)
    step = DetailStep(sch, method)
    for i in range(args.warmup + args.repeat):
        counter.take()
        meter.start()
        with autocast:
            out = step(student, teacher, disc, batch, gen)
        out["loss_g"].backward()  # G first; loss_d's graph is separate
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        out["loss_d"].backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        sec, peak = meter.stop()
        if i >= args.warmup:
            rows.append(("detail", frames, tokens, sec, peak, counter.take(), out["loss_g"].item()))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA, full-size Wan2.1-1.3B config")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="pixel frame counts (default: 17 on CPU, 81 and 33 on GPU)")  # fmt: skip
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--batch", type=int, default=None, help="per-step batch (CPU 2, GPU 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device; run without it for the CPU benchmark")
    args.frames = args.frames or ([81, 33] if args.gpu else [17])
    args.batch = args.batch or (1 if args.gpu else 2)
    preset = load_config(preset="wan2.1-t2v-1.3b" if args.gpu else "shapes-tiny")
    method, lora = preset.method, preset.lora

    rows = []
    for frames in args.frames:
        rows += bench(args, frames, method, lora)

    card = machine(torch.device("cuda" if args.gpu else "cpu"))
    print(f"machine: {platform.node()}  device: {card}")
    model = "Wan2.1-1.3B config, random weights" if args.gpu else "tiny Wan (shapes-tiny sizes)"
    prec = "bf16 autocast, checkpointing" if args.gpu else "float32"
    print(f"model: {model}; batch {args.batch}; {prec}; "
          f"{args.repeat} timed steps after {args.warmup} warm-up")  # fmt: skip
    mem = "peak GiB (CUDA alloc)" if args.gpu else "peak RSS GiB"
    print(f"\n| step | frames | tokens | s/step | {mem} | student passes | teacher passes |")
    print("|---|---|---|---|---|---|---|")
    for stage in ("semantic", "detail"):
        for frames in args.frames:
            sel = [r for r in rows if r[0] == stage and r[1] == frames]
            sec = sorted(r[3] for r in sel)[len(sel) // 2]  # median
            peak = max(r[4] for r in sel)
            passes = sel[-1][5]
            print(f"| {stage} | {frames} | {sel[0][2]} | {sec:.3f} | {peak:.2f} | "
                  f"{passes['student']} | {passes['teacher']} |")  # fmt: skip


if __name__ == "__main__":
    main()
