"""The DCM losses as small callables (METHOD.md sections 4-6).

Each returns a scalar tensor that keeps the autograd graph of its inputs; which inputs
carry grad (and therefore which network a loss trains) is the training step's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dcm.config import ConfigError


class ConsistencyLoss:
    """L_CD between the student's endpoint and the target (METHOD.md section 4, step 5).

    'pseudo_huber': mean(sqrt(d^2 + c^2) - c) over all elements (reference);
    'l2': mean(d^2) (paper).
    """

    def __init__(self, kind: str = "pseudo_huber", c: float = 0.001) -> None:
        if kind not in ("pseudo_huber", "l2"):
            raise ConfigError(
                f"method.consistency_loss='{kind}' is unknown: use 'pseudo_huber' or 'l2'"
            )
        if c <= 0:
            raise ConfigError(f"method.huber_c={c!r} must be positive")
        self.kind, self.c = kind, c

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        d = pred.float() - target.float()
        if self.kind == "l2":
            return d.square().mean()
        # sqrt(d^2 + c^2) - c written as d^2 / (sqrt(d^2 + c^2) + c): equal, but free of
        # the float32 cancellation when |d| << c
        d2 = d.square()
        return (d2 / (torch.sqrt(d2 + self.c**2) + self.c)).mean()


class TemporalCoherenceLoss:
    """L_TC = mean((D(a) - D(b))^2), D(z) = z[:, :, l:] - z[:, :, :-l] (METHOD.md section 5).

    Frames are dim 2 of (B, C, T, H, W); exactly 0 (still a graph-connected tensor) when
    T <= l, where no frame pair exists.
    """

    def __init__(self, stride: int = 3) -> None:
        if stride < 1:
            raise ConfigError(f"method.tc_stride={stride} must be at least 1")
        self.stride = stride

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        l = self.stride  # noqa: E741 - METHOD.md's name
        if a.shape[2] <= l:
            return (a.float() - b.float()).sum() * 0.0
        da = a[:, :, l:].float() - a[:, :, :-l].float()  # (B, C, T - l, H, W)
        db = b[:, :, l:].float() - b[:, :, :-l].float()
        return (da - db).square().mean()


def _heads(logits: Sequence[Tensor]) -> list[Tensor]:
    if len(logits) == 0:
        raise ValueError("the discriminator returned no heads: expected one logits tensor per tap")
    return [x.float() for x in logits]


class HingeDiscriminatorLoss:
    """L_D = mean(relu(1 + D(fake))) + mean(relu(1 - D(real))), averaged over heads.

    Returns (loss, fake part, real part); the parts are the head-averaged halves.
    """

    def __call__(
        self, fake: Sequence[Tensor], real: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        f = torch.stack([F.relu(1.0 + x).mean() for x in _heads(fake)]).mean()
        r = torch.stack([F.relu(1.0 - x).mean() for x in _heads(real)]).mean()
        return f + r, f, r


class HingeGeneratorLoss:
    """L_G = mean(relu(1 - D(fake))), averaged over heads (METHOD.md section 6)."""

    def __call__(self, fake: Sequence[Tensor]) -> Tensor:
        return torch.stack([F.relu(1.0 - x).mean() for x in _heads(fake)]).mean()


class FeatureMatchingLoss:
    """L_FM: MSE between projections of fake and real taps, averaged over taps.

    ``project`` maps one tap (B, N, D) to latent space (B, C, T, H, W): the teacher's own
    final layer at t_a (METHOD.md section 6). Gradient flows through the fake side only
    when the real taps carry none.
    """

    def __call__(
        self,
        fake_taps: Sequence[Tensor],
        real_taps: Sequence[Tensor],
        project: Callable[[Tensor], Tensor],
    ) -> Tensor:
        if len(fake_taps) != len(real_taps) or not fake_taps:
            raise ValueError(
                f"feature matching needs the same non-zero number of fake and real taps, "
                f"got {len(fake_taps)} and {len(real_taps)}"
            )
        parts = [
            F.mse_loss(project(f).float(), project(r).float())
            for f, r in zip(fake_taps, real_taps, strict=True)
        ]
        return torch.stack(parts).mean()
