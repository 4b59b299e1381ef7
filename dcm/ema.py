"""The one exponential moving average of weights: the consistency target, the pretrained
teacher's exported weights and the student's averaged weights (``train.average_decay``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

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


def mean_warmup(decay: float, updates: int) -> float:
    """min(decay, n / (n + 1)): the plain mean of the first 1 / (1 - decay) updates, then
    the EMA. A trained start (the teacher's weights) is one sample of the mean, no more."""
    return min(decay, updates / (updates + 1))


class Ema:
    """Shadow copies of parameters, updated by ``ema_update`` after each step.

    The shadowed parameters: every parameter of ``modules``, or ``named`` ones (name ->
    parameter, e.g. only the trained ones, with ``modules`` None); ``warmup`` maps (decay, updates) to this update's decay (None: constant);
    ``dtype``: the shadows' dtype (default: each parameter's), float32 keeps the small
    updates of an average over bf16 weights. ``applied`` puts the shadows in the live
    parameters for a block; ``named`` and
    ``state_dict`` give the shadows by name.
    """

    def __init__(
        self,
        modules: list[nn.Module] | None,
        decay: float,
        warmup: Callable[[float, int], float] | None = warmup_decay,
        *,
        named: dict[str, nn.Parameter] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if named is None:
            named = {
                f"{i}.{n}": p for i, m in enumerate(modules or []) for n, p in m.named_parameters()
            }
        self.names, self.params = list(named), list(named.values())
        self.shadow = [p.detach().to(dtype or p.dtype, copy=True) for p in self.params]
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def update(self) -> None:
        self.updates += 1
        d = self.warmup(self.decay, self.updates) if self.warmup else self.decay
        ema_update(self.shadow, self.params, d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the live parameters for the block, the live ones after.
        With a float32 shadow of bf16 parameters the live values come back exactly (they
        are kept aside, not round-tripped through the shadow)."""
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in zip(kept, self.params, strict=True):
                    p.copy_(k)

    def named(self) -> dict[str, Tensor]:
        """The shadows by name, float32 on the CPU (what an exported artifact saves)."""
        return {
            n: s.detach().to("cpu", torch.float32)
            for n, s in zip(self.names, self.shadow, strict=True)
        }

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": dict(zip(self.names, self.shadow, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        """A saved average of the same parameters (by name), for a resumed run."""
        saved = state["shadow"]
        if set(saved) != set(self.names):
            raise ValueError("the saved weight average holds other parameters than this model's")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow, strict=True):
                s.copy_(saved[n])
        self.updates = int(state["updates"])
