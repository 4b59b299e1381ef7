"""Teacher (50 Euler steps + CFG) vs DCM (n steps) on the same model: where the time goes.

    python benchmarks/sampler.py                 # CPU, tiny random Wan bundle, 17x64x64
    python benchmarks/sampler.py --gpu           # CUDA, bf16: full-size Wan2.1-1.3B transformer
                                                 # config + full Wan VAE config, random weights,
                                                 # 81x480x832
    python benchmarks/sampler.py --model DIR     # any bundle or distilled artifact

Every run goes through ``dcm.generate.VideoGenerator`` (the path the CLI, evaluation and
Serve use): text encoding, sampling, de-normalisation and VAE decoding. Network
evaluations are counted at the transformer's patch embedding (it runs once per pass) and
checked against the generator's own count. Random weights make the pictures noise; the
timings are those of the real architecture. The table comes last.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import WAN_1_3B, machine  # noqa: E402

from dcm.backbones import make_backbone  # noqa: E402
from dcm.bundle import load_bundle  # noqa: E402
from dcm.config import Config, load_config  # noqa: E402
from dcm.experts import DualExpert  # noqa: E402
from dcm.generate import VideoGenerator  # noqa: E402
from dcm.tiny import build_tiny_bundle  # noqa: E402

PROMPT = "a red circle moves left across a dark background"


def half(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to ``dtype`` but keep the model's ``_keep_in_fp32_modules`` (rope, time embedder,
    adaLN tables, norms) in float32, as ``from_pretrained(torch_dtype=...)`` does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if p.is_floating_point() and not keep & set(name.split(".")):
            p.data = p.data.to(dtype)
    for name, b in model.named_buffers():
        if b.is_floating_point() and not keep & set(name.split(".")):
            b.data = b.data.to(dtype)
    return model


def full_size_generator(
    workdir: Path,
    cfg: Config,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    transformer_config: dict | None = None,
) -> VideoGenerator:
    """Wan2.1-1.3B transformer + Wan VAE (diffusers defaults = the released config) with
    random weights on CUDA in bf16; the text encoder is a 1-layer UMT5 with the real
    width (4096) so the conditioning has the real shape (B, 512, 4096)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    device = torch.device(device)
    small = build_tiny_bundle(
        workdir / "text", text_dim=4096, text_heads=32, text_ff=256, text_layers=1, z_dim=16
    )
    text = load_bundle(small, device, dtype, ["text_encoder"], cfg.model.text_max_length)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = half(WanTransformer3DModel(**(transformer_config or WAN_1_3B)), dtype)
        transformer.eval().requires_grad_(False)
        vae = half(AutoencoderKLWan(), dtype).eval().requires_grad_(False)
    vae.enable_tiling()
    bundle = dataclasses.replace(
        text,
        transformer=transformer,
        vae=vae,
        vae_config=dict(vae.config),
        transformer_config=dict(transformer.config),
    )
    teacher = make_backbone(transformer)
    from dcm.attention import set_attention_backend

    set_attention_backend(teacher, cfg.model.attention)
    return VideoGenerator(bundle, DualExpert(teacher).eval(), cfg, cfg.method, teacher=teacher)


def count_passes(gen: VideoGenerator) -> dict[str, int]:
    """Forward hooks on the patch embedding of the student's and the teacher's transformer."""
    counts = {"n": 0}
    seen = set()
    for tr in (gen.student.base.transformer, gen.teacher.transformer):
        if id(tr) in seen:
            continue
        seen.add(id(tr))
        tr.patch_embedding.register_forward_hook(
            lambda *_: counts.__setitem__("n", counts["n"] + 1)
        )
    return counts


def run(
    gen: VideoGenerator, counts: dict[str, int], label: str, sizes: dict, repeat: int, **kw
) -> dict:
    """``repeat`` runs; each timing is the median over them (shared machines are noisy)."""
    runs = []
    for _ in range(repeat):
        counts["n"] = 0
        gen.generate([PROMPT], seed=0, **sizes, **kw)
        runs.append(dict(gen.last_timings))
        if counts["n"] != int(runs[-1]["nfe"]):
            raise RuntimeError(
                f"{label}: counted {counts['n']} passes, generator says {runs[-1]['nfe']}"
            )
    t = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    steps = kw.get("teacher_steps") if kw.get("teacher") else kw["steps"]
    row = {"run": label, "steps": steps, **t, "s_per_step": t["denoise_s"] / steps}
    row["s_per_nfe"] = t["denoise_s"] / t["nfe"]
    print(
        f"{label:<14} steps {steps:>3}  NFE {int(t['nfe']):>3}  encode {t['encode_s']:.3f} s  "
        f"denoise {t['denoise_s']:.3f} s  decode {t['decode_s']:.3f} s  total {t['total_s']:.3f} s",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    teacher = rows[0]["total_s"]
    head = "| run | steps | NFE | s/step | s/NFE | denoise s | decode s | end-to-end s | speed-up |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['steps']} | {int(r['nfe'])} | {r['s_per_step']:.3f} | "
            f"{r['s_per_nfe']:.3f} | {r['denoise_s']:.2f} | {r['decode_s']:.2f} | "
            f"{r['total_s']:.2f} | {teacher / r['total_s']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA bf16, full-size Wan2.1-1.3B + Wan VAE")
    p.add_argument("--model", help="a bundle or distilled artifact instead of random weights")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8], help="DCM step counts")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="runs per row; medians are reported")
    p.add_argument("--frames", type=int, help="default 17 (CPU) / 81 (GPU)")
    p.add_argument("--height", type=int, help="default 64 (CPU) / 480 (GPU)")
    p.add_argument("--width", type=int, help="default 64 (CPU) / 832 (GPU)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; run without it for the CPU mode")
    preset = "wan2.1-t2v-1.3b" if args.gpu else "shapes-tiny"
    cfg = load_config(preset=preset)
    sizes = {
        "num_frames": args.frames or (81 if args.gpu else 17),
        "height": args.height or (480 if args.gpu else 64),
        "width": args.width or (832 if args.gpu else 64),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            gen = VideoGenerator.load(args.model, device, cfg)
            what = args.model
        elif args.gpu:
            gen = full_size_generator(Path(tmp), cfg)
            what = "Wan2.1-1.3B transformer + Wan VAE (full-size configs, random weights, bf16)"
        else:
            gen = VideoGenerator.load(build_tiny_bundle(Path(tmp) / "tiny"), device, cfg)
            what = "tiny random Wan bundle (dcm.tiny defaults, float32)"
        print(f"machine: {machine(device)}")
        print(f"model:   {what}")
        print(
            f"video:   {sizes['num_frames']}x{sizes['height']}x{sizes['width']}, guidance "
            f"{cfg.method.guidance} w={cfg.method.cfg_scale}, shift {cfg.method.shift}, "
            f"split b={gen.method.split}, attention {cfg.model.attention}"
        )
        print(f"teacher: {gen.teacher_description(args.teacher_steps)}")
        counts, rep = count_passes(gen), max(1, args.repeat)
        print(f"timings: median of {rep} runs each, after one warm-up run")
        gen.generate([PROMPT], steps=2, seed=0, **sizes)  # warm-up: kernels, caches, allocator
        rows = [
            run(
                gen,
                counts,
                "teacher+CFG",
                sizes,
                rep,
                teacher=True,
                teacher_steps=args.teacher_steps,
            )
        ]
        rows += [run(gen, counts, f"DCM {n}-step", sizes, rep, steps=n) for n in args.steps]
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
