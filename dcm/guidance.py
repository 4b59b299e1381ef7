"""The teacher's guided velocity (METHOD.md section 4, step 3).

Two modes, chosen by ``method.guidance``:

- 'cfg' (Wan): v_T = v(c) + w (v(c) - v(null)), w = method.cfg_scale (5, i.e. classic
  scale 6). Two teacher calls of batch B, conditional first: two network passes, as
  counted by the step's pass budget. Two calls rather than one of 2B keep the text
  tensors of ``cond`` and ``null_cond`` independent (no padding to a common length) and
  halve peak activation memory at 81x480x832; a big GPU is saturated by B anyway.
- 'embedded' (HunyuanVideo): one pass with ``cond.guidance`` = method.embedded_guidance
  for every sample. The reference feeds 6016, not 6000: it builds the guidance tensor in
  bf16 and bf16(6000) = 6016 (bf16 has a spacing of 32 in [4096, 8192), and 6000 / 32 =
  187.5 rounds to even, 188). The student and the target get the same value
  (``with_embedded_guidance``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from dcm.config import MethodConfig


def with_embedded_guidance(cond: Any, method: MethodConfig, batch: int) -> Any:
    """``cond`` with guidance (B,) float32 set to method.embedded_guidance in 'embedded'
    mode; unchanged in 'cfg' mode. ``cond`` is a ``dcm.backbones.Cond`` (a dataclass)."""
    if method.guidance != "embedded":
        return cond
    device = cond.text.device
    g = torch.full((batch,), float(method.embedded_guidance), dtype=torch.float32, device=device)
    return dataclasses.replace(cond, guidance=g)


def expand_cond(cond: Any, batch: int) -> Any:
    """A batch-1 Cond (e.g. one encoded empty prompt) repeated to ``batch`` rows."""
    rows = cond.text.shape[0]
    if rows == batch:
        return cond
    if rows != 1:
        raise ValueError(f"null_cond has {rows} rows; expected 1 or the batch size {batch}")
    return cond.index(torch.zeros(batch, dtype=torch.long, device=cond.text.device))


def teacher_velocity(
    teacher: Any, x: Tensor, t: Tensor, cond: Any, null_cond: Any, method: MethodConfig
) -> Tensor:
    """Guided teacher velocity at (x, t): (B, C, T, H, W). Call it under no_grad.

    teacher: ``teacher(x, t, cond)`` -> velocity; t: (B,) float32 = 1000 sigma.
    """
    batch = x.shape[0]
    if method.guidance == "embedded":
        return teacher(x, t, with_embedded_guidance(cond, method, batch))
    v_c = teacher(x, t, cond)
    v_null = teacher(x, t, expand_cond(null_cond, batch))
    return v_c + method.cfg_scale * (v_c - v_null)
