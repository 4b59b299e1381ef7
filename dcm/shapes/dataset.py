"""Shapes-world datasets: deterministic clips from a seed, written as mp4 + captions.jsonl.

The manifest is what `dcm ingest --input` reads: one JSON object per line with `path`
(relative to the manifest's folder) and `caption`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dcm.shapes.grammar import Scene, sample_scene, triples
from dcm.shapes.render import render_scene
from dcm.video import write_video

MANIFEST = "captions.jsonl"


def clip_seed(seed: int, index: int, split: str) -> int:
    """The render seed of clip `index`: distinct per split so the splits never share a clip."""
    return (seed * 1_000_003 + index * 7919 + (0 if split == "train" else 104_729)) % (2**31)


def iter_clips(
    n: int,
    seed: int = 0,
    split: str = "train",
    two_prob: float = 0.25,
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    reseed: int = 0,
) -> Iterator[tuple[Scene, np.ndarray]]:
    """Yield `n` (scene, uint8 frames (F, H, W, 3)) pairs of `split`, deterministic in `seed`.

    `reseed` != 0 shifts every render seed: the same scenes (captions) drawn again with other
    positions, paths and background."""
    triples(split)  # validates the split name
    rng = random.Random(f"{seed}:{split}")
    for i in range(n):
        scene = sample_scene(rng, split, two_prob)
        render_seed = clip_seed(seed, i, split) + reseed
        yield scene, render_scene(scene, render_seed, num_frames, height, width)


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "train",
    two_prob: float = 0.25,
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    fps: int = 8,
) -> Path:
    """Write `n` clips as `videos/<split>_<i>.mp4` plus `captions.jsonl`; return the manifest.

    Held-out clips use only the held-out (colour, shape, motion) compositions.
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    clips = iter_clips(n, seed, split, two_prob, num_frames, height, width)
    for i, (scene, frames) in enumerate(clips):
        rel = f"videos/{split}_{i:05d}.mp4"
        write_video(out / rel, frames, fps)
        lines.append(json.dumps({"path": rel, "caption": scene.caption()}))
    manifest = out / MANIFEST
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a captions.jsonl manifest with `path` made absolute."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({"path": str(path.parent / row["path"]), "caption": row["caption"]})
    return rows
