"""Shared test helpers: tiny diffusers transformers and bundles, small real video files.

``tiny_bundle`` builds through ``dcm.tiny.build_tiny_bundle`` (the same code the shapes
pretraining starts from) and caches one bundle per (factory, backbone, sizes), so a test
session pays for each kind of bundle once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dcm.tiny import build_tiny_bundle

_CACHE: dict[tuple[Any, ...], Path] = {}


def tiny_bundle(
    where: pytest.TempPathFactory | Path | str, backbone: str = "wan", seed: int = 0, **dims: Any
) -> Path:
    """A tiny random bundle: built once per session for a ``tmp_path_factory``, else in ``where``.

    Sized for the ``shapes-tiny`` preset: 17 x 64 x 64 videos -> latents (8, 5, 16, 16)
    (VAE spatial factor 4, patch 1x2x2: 320 tokens).
    """
    if isinstance(where, pytest.TempPathFactory):
        key = (id(where), backbone, seed, tuple(sorted(dims.items())))
        if key not in _CACHE or not (_CACHE[key] / "model_index.json").is_file():
            folder = where.mktemp(f"tiny_{backbone}_bundle")
            _CACHE[key] = build_tiny_bundle(folder, backbone=backbone, seed=seed, **dims)
        return _CACHE[key]
    return build_tiny_bundle(Path(where), backbone=backbone, seed=seed, **dims)


def tiny_wan(num_layers: int = 3, patch: tuple[int, int, int] = (1, 2, 2)) -> Any:
    """A seeded tiny ``WanTransformer3DModel`` in eval mode: D = 32, text dim 24, 4 channels."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=patch,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=48,
        num_layers=num_layers,
        rope_max_seq_len=64,
    ).eval()


def tiny_hunyuan(num_layers: int = 2, single: int = 3) -> Any:
    """A seeded tiny text-to-video ``HunyuanVideoTransformer3DModel`` in eval mode: D = 32,
    text dim 24, pooled dim 12, 4 channels."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_single_layers=single,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=24,
        pooled_projection_dim=12,
        rope_axes_dim=(4, 6, 6),
    ).eval()


def moving_square_frames(
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    color: tuple[int, int, int] = (230, 40, 40),
) -> np.ndarray:
    """uint8 (F, H, W, 3): a coloured square sliding left to right on a grey background."""
    frames = np.full((num_frames, height, width, 3), 60, dtype=np.uint8)
    side = max(4, height // 4)
    top = (height - side) // 2
    for f in range(num_frames):
        left = int(f * (width - side) / max(1, num_frames - 1))
        frames[f, top : top + side, left : left + side] = color
    return frames


def sample_mp4(
    path: Path | str, num_frames: int = 17, height: int = 64, width: int = 64, fps: int = 8
) -> Path:
    """Write a real H.264 mp4 of ``moving_square_frames`` and return its path."""
    from dcm.video import write_video

    return write_video(Path(path), moving_square_frames(num_frames, height, width), fps=fps)
