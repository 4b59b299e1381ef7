"""What several benchmarks share: the full-size Wan2.1-1.3B transformer config and a one-line
description of the machine a table was measured on.

The benchmarks run as scripts (``python benchmarks/<name>.py``), so their own folder is on
``sys.path`` and they import this file as ``common``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

# diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine(device: torch.device | None = None, *, load: bool = False) -> str:
    """The card (CUDA) or the CPU: model, cores, memory and torch version, for a table's
    header. ``load=True`` adds the 1-minute load average, for figures taken on a shared box."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = f"{_cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__}"
    if load:
        cpu += f", load average {os.getloadavg()[0]:.0f}"
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({cpu})"
    return f"CPU only ({cpu}, {torch.get_num_threads()} torch threads)"


# distill_study.py's validation noise seed, and one more: a probe's videos are
# (held-out caption, noise seed) pairs, the same for every row it compares.
NOISE_SEEDS = (777, 778)


def heldout_inputs(gen, prompts: int) -> tuple[list[str], object, list[torch.Tensor]]:
    """``prompts`` held-out shapes captions (distill_study's seed 123), their Cond and one
    noise batch (prompts, C, T, h, w) per NOISE_SEEDS, for the VideoGenerator ``gen``."""
    from dcm.shapes.dataset import iter_clips

    caps = [scene.caption() for scene, _ in iter_clips(prompts, seed=123, split="heldout")]
    return caps, gen.bundle.encode_text(caps), probe_noises(gen, len(caps))


def probe_noises(gen, videos: int) -> list[torch.Tensor]:
    """One noise batch (videos, C, T, h, w) per NOISE_SEEDS, at the VideoGenerator's size."""
    shape = gen.bundle.latent_shape(
        gen.cfg.data.num_frames, gen.cfg.data.height, gen.cfg.data.width
    )
    return [
        torch.randn((videos, *shape), generator=torch.Generator().manual_seed(s))
        for s in NOISE_SEEDS
    ]


def paired(d) -> str:
    """Per-video differences (numpy array) -> 'mean +- standard error (wins / losses)'."""
    se = d.std(ddof=1) / len(d) ** 0.5
    return f"{d.mean():+.3f} +- {se:.3f} ({int((d > 0).sum())} / {int((d < 0).sum())})"


def shapes_summaries(bundle, z: torch.Tensor, caps: list[str]) -> list[float]:
    """Normalised latents (B, C, T, h, w) -> the shapes summary of each decoded video."""
    from dcm.generate import to_uint8
    from dcm.shapes.metrics import score_batch

    rows = score_batch(list(to_uint8(bundle.decode(z))), caps)["per_video"]
    return [float(r["summary"]) for r in rows]


def load_probe(doc: str):
    """A shapes quality probe's start: parse --model / --prompts, load the student, build the
    held-out inputs. Returns (args, VideoGenerator, captions, Cond, noises)."""
    import argparse

    from dcm.generate import VideoGenerator

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="bundled:shapes-dcm", help="a distilled shapes student")
    ap.add_argument("--prompts", type=int, default=24, help="held-out captions")
    args = ap.parse_args()
    gen = VideoGenerator.load(args.model, "cpu")
    gen.student.eval()
    return (args, gen, *heldout_inputs(gen, args.prompts))


def sampled_summaries(
    gen,
    model,
    noises: list[torch.Tensor],
    cond,
    caps: list[str],
    sigmas: list[float],
    renoise: float = 0.0,
) -> np.ndarray:
    """The shapes summary of every video ``model`` samples on ``sigmas`` from each of the
    probe's noise batches (NOISE_SEEDS order); detail steps take a ``renoise`` share of fresh
    noise, step k's from ``fresh_seed(seed, k)`` as ``VideoGenerator`` draws it."""
    from dcm.sampler import fresh_seed, sample

    per: list[float] = []
    schedule = gen.schedule()
    for seed, noise in zip(NOISE_SEEDS, noises, strict=True):

        def fresh(k: int, seed: int = seed, shape: tuple = noise.shape) -> torch.Tensor:
            return torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed(seed, k)))

        z = sample(model, noise, cond, sigmas, schedule, renoise=renoise, fresh=fresh)
        per += shapes_summaries(gen.bundle, z, caps)
    return np.asarray(per)


def probe_header(model: str, sch, caps: list[str]) -> str:
    """The two lines above a probe's table: model, grid and machine; the videos scored."""
    n_vid = len(caps) * len(NOISE_SEEDS)
    return (
        f"\n{model}, grid {sch.grid_points}, split {sch.split}; {machine()}\n"
        f"{len(caps)} held-out captions x {len(NOISE_SEEDS)} noise seeds = {n_vid} videos\n"
    )


def encode_clips(
    bundle, n: int, seed: int, split: str, rerender: int = 0
) -> tuple[torch.Tensor, object, list[str]]:
    """n rendered shapes clips (``iter_clips``' seed and split) -> normalised latents
    (n, C, T, h, w), their Cond and captions. ``rerender`` != 0: the same scenes (captions)
    rendered again (``iter_clips``' ``reseed``)."""
    from dcm.shapes.dataset import iter_clips

    lat, caps = [], []
    for scene, frames in iter_clips(n, seed=seed, split=split, reseed=rerender):
        px = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, F, H, W)
        lat.append(bundle.encode_video(px[None], posterior="mean"))
        caps.append(scene.caption())
    return bundle.normalize(torch.cat(lat)), bundle.encode_text(caps), caps


def guided_teacher(teacher, null_cond, method):
    """The teacher + its guidance as a sampler model ``(x, t, cond, expert) -> v`` (the
    expert id is ignored), for ``to_split`` and ``dcm.sampler.sample``."""
    from dcm.guidance import teacher_velocity

    def model(x, t, cond, expert):
        return teacher_velocity(teacher, x, t, cond, null_cond, method)

    return model


def to_split(student, x: torch.Tensor, cond, head: list[float], sch) -> torch.Tensor:
    """The student's Euler steps along ``head`` (descending, ending at sigma_b): x at sigma_b."""
    for cur, nxt in zip(head, head[1:], strict=False):
        sig = torch.full((x.shape[0],), cur, dtype=torch.float32)
        x = x + (nxt - cur) * student(x, 1000.0 * sig, cond, sch.route(sig)).float()
    return x
