"""Batched generation of concurrent same-shape requests, each with its own seed.

Serve's ``@serve.batch`` hands a replica every request that arrived within the batch window;
those with the same model and latent shape (steps, frames, height, width) run as one
``VideoGenerator.generate`` call. Prompts, seeds and output formats may differ: seeds are
passed per row, so a request gets the same video whatever batch it lands in, and each video
is encoded on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SHAPE_KEYS = ("model", "steps", "num_frames", "height", "width")


def group_by_shape(items: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``items`` grouped by SHAPE_KEYS, groups in order of first arrival."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item[k] for k in SHAPE_KEYS), []).append(i)
    return list(groups.values())


def generate_group(
    gen: Any,
    items: Sequence[dict[str, Any]],
    callback: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One ``generate`` call for a same-shape group: uint8 (B, F, H, W, 3) and stage seconds.

    Seeds go per row, so row i equals ``generate([prompt_i], seed=seed_i)`` alone.
    ``callback(k, n)`` runs after each sampling step (job progress).
    """
    p = items[0]
    frames = gen.generate(
        [it["prompt"] for it in items],
        steps=p["steps"],
        seed=[it["seed"] for it in items],
        num_frames=p["num_frames"],
        height=p["height"],
        width=p["width"],
        callback=callback,
    )
    names = {"encode_s": "text", "denoise_s": "denoise", "decode_s": "decode"}
    stages = {names[k]: float(v) for k, v in gen.last_timings.items() if k in names}
    return frames, stages
