"""Few-step DCM sampling and the teacher's guided sampling (METHOD.md section 7).

Pure functions of model, noise, conditioning and a descending sigma list that ends at 0;
training validation, evaluation and Serve all call these. Plain Euler:
x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, 1000 sigma_i).

An optional ``callback(k, n)`` runs after step k of n (1-based): Serve reports job progress
with it, and an exception it raises stops sampling there (how a job is cancelled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dcm.config import ConfigError, MethodConfig
from dcm.guidance import teacher_velocity
from dcm.schedule import Schedule

StepCallback = Callable[[int, int], None]  # (step k done, of n steps)


def _check_sigmas(sigmas: Sequence[float]) -> list[float]:
    s = [float(v) for v in sigmas]
    if len(s) < 2 or s[-1] != 0.0:
        raise ConfigError(f"sigma list {s} must have at least two values and end with 0.0")
    if any(b >= a for a, b in zip(s, s[1:], strict=False)):
        raise ConfigError(f"sigma list {s} must be strictly decreasing")
    if not 0.0 < s[0] <= 1.0:
        raise ConfigError(f"sigma list {s} must start in (0, 1]")
    return s


@torch.no_grad()
def sample(
    model: Any,
    noise: Tensor,
    cond: Any,
    sigmas: Sequence[float],
    schedule: Schedule,
    callback: StepCallback | None = None,
) -> Tensor:
    """DCM sample from ``noise`` (B, C, T, H, W) at sigmas[0]: one model call per step.

    model: ``model(x, t, cond, expert)`` (a DualExpert); each step is routed per sample by
    ``schedule.route`` (float32 sigma vs sigma_b). No CFG. For HunyuanVideo pass a ``cond``
    whose ``guidance`` is already set (``guidance.with_embedded_guidance``).
    Returns float32 latents at sigma = 0 (normalised; the caller de-normalises).
    """
    s = _check_sigmas(sigmas)
    x = noise.float()
    bsz = x.shape[0]
    for k, (cur, nxt) in enumerate(zip(s, s[1:], strict=False), start=1):
        sig = torch.full((bsz,), cur, dtype=torch.float32, device=x.device)
        expert = schedule.route(sig)  # (B,)
        v = model(x, 1000.0 * sig, cond, expert).float()
        x = x + (nxt - cur) * v
        if callback is not None:
            callback(k, len(s) - 1)
    return x


@torch.no_grad()
def teacher_sample(
    teacher: Any,
    noise: Tensor,
    cond: Any,
    null_cond: Any,
    sigmas: Sequence[float],
    method: MethodConfig,
    callback: StepCallback | None = None,
) -> Tensor:
    """Teacher Euler sample with guidance (CFG: 2 calls per step; embedded: 1)."""
    s = _check_sigmas(sigmas)
    x = noise.float()
    bsz = x.shape[0]
    for k, (cur, nxt) in enumerate(zip(s, s[1:], strict=False), start=1):
        sig = torch.full((bsz,), cur, dtype=torch.float32, device=x.device)
        v = teacher_velocity(teacher, x, 1000.0 * sig, cond, null_cond, method).float()
        x = x + (nxt - cur) * v
        if callback is not None:
            callback(k, len(s) - 1)
    return x
