"""Batched generation of concurrent same-shape requests, each with its own seed.

Serve's ``@serve.batch`` hands a replica every request that arrived within the batch window;
those with the same model and latent shape (steps, frames, height, width) run as one batch.
``VideoGenerator.generate`` draws the noise of a whole batch from ONE seed, so a request's
video would depend on its position in the batch. ``generate_batch`` keeps the result of a
request independent of batching: noise row i comes from ``seed_i`` exactly as in a batch of
one (``generate([p_i], seed=seed_i)``), and the rest is the same pipeline (text encoding,
the shared ``dcm.sampler.sample`` on the generator's sigma list, VAE decode; METHOD.md
section 7). A batch of one simply calls ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SHAPE_KEYS = ("model", "steps", "num_frames", "height", "width")


def group_by_shape(items: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``items`` grouped by SHAPE_KEYS, groups in order of first arrival."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item[k] for k in SHAPE_KEYS), []).append(i)
    return list(groups.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_batch(
    gen: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    num_frames: int,
    height: int,
    width: int,
) -> tuple[np.ndarray, dict[str, float]]:
    """uint8 videos (B, F, H, W, 3) and stage seconds; row i depends only on its own inputs."""
    from dcm.generate import to_uint8
    from dcm.guidance import with_embedded_guidance
    from dcm.sampler import sample

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if len(prompts) == 1:
        frames = gen.generate(
            prompts, steps=steps, seed=seeds[0], num_frames=num_frames, height=height, width=width
        )
        return frames, _stage_seconds(gen.last_timings)

    b, dev = gen.bundle, gen.device
    start = time.perf_counter()
    shape = b.latent_shape(num_frames, height, width)  # (C, T, h, w)
    noise = torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(dev)  # (B, C, T, h, w), drawn on the CPU like generate()
    cond = with_embedded_guidance(b.encode_text(list(prompts)), gen.method, len(prompts))
    _sync(dev)
    t_text = time.perf_counter()
    z = sample(gen.student, noise, cond, gen.sigmas(steps), gen.schedule())
    _sync(dev)
    t_denoise = time.perf_counter()
    frames = to_uint8(b.decode(z))
    t_end = time.perf_counter()
    return frames, {
        "text": t_text - start,
        "denoise": t_denoise - t_text,
        "decode": t_end - t_denoise,
    }


def _stage_seconds(timings: dict[str, float]) -> dict[str, float]:
    """generate()'s last_timings -> the stage names of Server-Timing."""
    names = {"encode_s": "text", "denoise_s": "denoise", "decode_s": "decode"}
    return {names[k]: float(v) for k, v in timings.items() if k in names}
