"""Which queued requests can share one ``VideoGenerator.generate`` call.

Serve's ``@serve.batch`` hands a replica every request that arrived within the batch window;
only those with the same model and latent shape (steps, frames, height, width) can run as one
batch. Prompts, seeds and output formats may differ: noise is drawn per sample from its own
seed, and each video is encoded on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SHAPE_KEYS = ("model", "steps", "num_frames", "height", "width")


def group_by_shape(items: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``items`` grouped by SHAPE_KEYS, groups in order of first arrival."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item[k] for k in SHAPE_KEYS), []).append(i)
    return list(groups.values())
