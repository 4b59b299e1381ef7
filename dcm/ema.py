"""The one exponential moving average of weights (the consistency target, the pretrained teacher)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update(shadow: Iterable[Tensor], live: Iterable[Tensor], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * live, pairwise and in place (shadow's dtype)."""
    shadow = list(shadow)
    live = [p.detach().to(s.dtype) for s, p in zip(shadow, live, strict=True)]
    if shadow:
        torch._foreach_lerp_(shadow, live, 1.0 - decay)


def warmup_decay(decay: float, updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)): early averages forget the random start quickly."""
    return min(decay, (1 + updates) / (10 + updates))


class Ema:
    """Shadow copies of some modules' parameters, updated by ``ema_update`` after each step.

    ``warmup`` applies ``warmup_decay``; ``swap`` exchanges live and shadow weights (call it
    again to restore), e.g. to save the averaged weights.
    """

    def __init__(self, modules: list[nn.Module], decay: float, warmup: bool = True) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def update(self) -> None:
        self.updates += 1
        d = warmup_decay(self.decay, self.updates) if self.warmup else self.decay
        ema_update(self.shadow, self.params, d)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
