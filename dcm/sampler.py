"""Few-step DCM sampling and the teacher's guided sampling (METHOD.md section 7).

Pure functions of model, noise, conditioning and a descending sigma list that ends at 0;
training validation, evaluation and Serve all call these. Plain Euler:
x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, 1000 sigma_i).

An optional ``callback(k, n)`` runs after step k of n (1-based): Serve reports job progress
with it, and an exception it raises stops sampling there (how a job is cancelled).

``renoise`` (``sample.renoise``, METHOD.md section 7) makes the detail expert's steps
stochastic: the step from sigma to sigma' re-noises the expert's clean estimate with noise
of which a ``renoise`` share of the variance is fresh (0: the Euler step above, the
reference; 1: a fresh draw, the multistep consistency sampler). The semantic expert's steps
stay deterministic: their endpoint is sigma_b, not a clean video (with split -1 the one
expert maps to sigma_min and every step but the last is re-noised).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dcm.config import DETAIL, ConfigError, MethodConfig
from dcm.guidance import teacher_velocity
from dcm.schedule import Schedule

StepCallback = Callable[[int, int], None]  # (step k done, of n steps)
# A video's fresh noise of step k comes from its seed + k * RENOISE_STRIDE: its own stream,
# far from the seeds users and evaluations pass, so the video depends on its seed alone.
RENOISE_STRIDE = 1_000_003
FreshNoise = Callable[[int], Tensor]  # step k (1-based) -> N(0, I) like x, for renoise > 0


def fresh_seed(seed: int, k: int) -> int:
    """The seed of step k's fresh noise (``renoise``) for a video drawn from ``seed``."""
    return int(seed) + k * RENOISE_STRIDE


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
    *,
    renoise: float = 0.0,
    fresh: FreshNoise | None = None,
) -> Tensor:
    """DCM sample from ``noise`` (B, C, T, H, W) at sigmas[0]: one model call per step.

    model: ``model(x, t, cond, expert)`` (a DualExpert); each step is routed per sample by
    ``schedule.route`` (float32 sigma vs sigma_b). No CFG. For HunyuanVideo pass a ``cond``
    whose ``guidance`` is already set (``guidance.with_embedded_guidance``).
    ``renoise`` in [0, 1] with ``fresh(k)`` the new noise of step k: see the module docstring.
    Returns float32 latents at sigma = 0 (normalised; the caller de-normalises).
    """
    s = _check_sigmas(sigmas)
    if not 0.0 <= renoise <= 1.0:
        raise ConfigError(f"sample.renoise={renoise} must lie in [0, 1]")
    if renoise > 0.0 and fresh is None:
        raise ConfigError("sample.renoise > 0 needs fresh noise: pass fresh=callable(step)")
    x = noise.float()
    bsz = x.shape[0]
    for k, (cur, nxt) in enumerate(zip(s, s[1:], strict=False), start=1):
        sig = torch.full((bsz,), cur, dtype=torch.float32, device=x.device)
        expert = schedule.route(sig)  # (B,)
        v = model(x, 1000.0 * sig, cond, expert).float()
        # re-noise only where the expert maps to a clean video (DetE, or the one expert of
        # split -1); checked last, so plain Euler sampling never syncs on the routing tensor
        if renoise > 0.0 and nxt > 0.0 and _maps_to_clean(expert, schedule):
            x = _renoised(x, v, cur, nxt, schedule.sigma_min, renoise, fresh(k))  # type: ignore[misc]
        else:
            x = x + (nxt - cur) * v
        if callback is not None:
            callback(k, len(s) - 1)
    return x


def _maps_to_clean(expert: Tensor, schedule: Schedule) -> bool:
    """True when this step's expert ends at sigma_min: DetE, or the single expert."""
    return schedule.single_expert or bool((expert == DETAIL).all())


def _renoised(
    x: Tensor, v: Tensor, cur: float, nxt: float, low: float, share: float, z: Tensor
) -> Tensor:
    """One stochastic detail step: x at sigma ``cur`` -> sigma ``nxt``.

    The detail expert's endpoint is sigma_min = ``low`` (~0): x0 = x + (low - cur) v. The
    noise it implies, eps = (x - (1 - cur) x0) / cur, is mixed with the fresh ``z`` (same
    shape) as sqrt(1 - share) eps + sqrt(share) z, which keeps unit variance, and
    x' = (1 - nxt) x0 + nxt eps'.
    """
    x0 = x + (low - cur) * v
    eps = (x - (1.0 - cur) * x0) / cur
    mixed = (1.0 - share) ** 0.5 * eps + share**0.5 * z.to(device=x.device, dtype=x.dtype)
    return (1.0 - nxt) * x0 + nxt * mixed


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
