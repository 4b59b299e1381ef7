"""The shifted training grid, the one expert boundary, and sampling sigma lists.

METHOD.md section 2 (grid) and 3 (expert split), section 7 (sampling lists). Everything
here derives from three constants of ``cfg.method``: shift s, grid size N and boundary b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dcm.config import DETAIL, SEMANTIC, SIGMA_PRESETS, ConfigError, MethodConfig

# sigma_min = sigma(1 / MIN_U): the point below k = 0 (METHOD.md section 2).
MIN_U = 1000
# A preset value this close to sigma_b stands for sigma_b itself: the reference lists are
# rounded (HunyuanVideo's 0.9818 is sigma_37 = 0.981763 rounded UP, yet it is the first
# detail-expert step), so without snapping it would route to the wrong expert.
PRESET_SNAP = 1e-3


def shifted(u: float, shift: float) -> float:
    """sigma(u) = s u / (1 + (s - 1) u) in float64 (METHOD.md section 2)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Shift-s Euler grid sigma_k = sigma((k + 1) / N), k = 0..N-1, split at index b.

    SemE owns start indices b+1..N-1 (endpoint sigma_b), DetE owns 0..b (endpoint
    sigma_min); at inference sigma > sigma_b goes to SemE, compared in float32.

    b = -1 is the single consistency model of the paper's ablation: with sigma_{-1} =
    sigma_min (the point below k = 0), one expert owns the whole grid 0..N-1, maps to
    sigma_min and takes every sampling step; there is no detail expert.
    """

    shift: float
    grid_points: int
    split: int
    sigmas: Tensor = field(init=False, repr=False)  # (N,) float64 ascending, sigma_{N-1} = 1
    sigma_min: float = field(init=False)
    sigma_split: float = field(init=False)

    def __post_init__(self) -> None:
        n, b = self.grid_points, self.split
        if n < 2:
            raise ConfigError(f"method.grid_points={n} must be at least 2")
        if not -1 <= b <= n - 2:
            raise ConfigError(
                f"method.split={b} must lie in 0..{n - 2} so both experts own grid points "
                "(or be -1 for a single consistency model)"
            )
        grid = torch.tensor(
            [shifted((k + 1) / n, self.shift) for k in range(n)], dtype=torch.float64
        )
        object.__setattr__(self, "sigmas", grid)
        sigma_min = shifted(1.0 / MIN_U, self.shift)
        object.__setattr__(self, "sigma_min", sigma_min)
        object.__setattr__(self, "sigma_split", float(grid[b]) if b >= 0 else sigma_min)

    @property
    def single_expert(self) -> bool:
        """b = -1: one consistency model over the whole trajectory (no detail expert)."""
        return self.split < 0

    @classmethod
    def from_config(cls, method: MethodConfig) -> Schedule:
        return cls(shift=method.shift, grid_points=method.grid_points, split=method.split)

    # ------------------------------------------------------------ grid look-ups
    def _table(self, device: torch.device) -> Tensor:
        # (N + 1,) float32: [sigma_min, sigma_0, .., sigma_{N-1}], so sigma_prev(k) = table[k].
        low = torch.tensor([self.sigma_min], dtype=torch.float64)
        return torch.cat([low, self.sigmas]).to(device=device, dtype=torch.float32)

    def sigma(self, k: Tensor) -> Tensor:
        """sigma_k as float32, same shape and device as k."""
        return self._table(k.device)[k.long() + 1]

    def sigma_prev(self, k: Tensor) -> Tensor:
        """sigma_{k-1} as float32; sigma_min at k = 0."""
        return self._table(k.device)[k.long()]

    def endpoint(self, expert: Tensor) -> Tensor:
        """Consistency endpoint sigma_e per sample: sigma_b (SemE) or sigma_min (DetE)."""
        hi = torch.full(expert.shape, self.sigma_split, dtype=torch.float32, device=expert.device)
        lo = torch.full_like(hi, self.sigma_min)
        return torch.where(expert == SEMANTIC, hi, lo)

    def index_range(self, expert: int) -> tuple[int, int]:
        """Inclusive start-index range of an expert (METHOD.md section 3)."""
        if expert == SEMANTIC:
            return self.split + 1, self.grid_points - 1
        if expert == DETAIL:
            return 0, self.split
        raise ValueError(f"expert={expert!r} is not an expert id: use SEMANTIC (0) or DETAIL (1)")

    def sample_indices(
        self, expert: Tensor, generator: torch.Generator | None, top_share: float = 0.0
    ) -> Tensor:
        """One start index k per sample, uniform over its expert's grid INDICES; with
        ``top_share`` p > 0, a share p of the samples starts at the expert's top index (the
        DetE's is sigma_b, the one jump of a 2-step sample) and the rest is uniform, so the
        top index gets p + (1 - p) / count.

        Draws exactly B uniforms from ``generator`` (on the generator's device), whatever
        the mix of experts and p, so ranks sharing a seed stay in step.
        """
        s_lo, s_hi = self.index_range(SEMANTIC)
        d_lo, d_hi = self.index_range(DETAIL)
        sem = expert == SEMANTIC
        if self.single_expert and not bool(sem.all()):
            raise ConfigError("method.split=-1 has no detail expert: train only the semantic stage")
        lo = torch.where(sem, s_lo, d_lo)  # (B,)
        count = torch.where(sem, s_hi - s_lo + 1, d_hi - d_lo + 1)
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(expert.shape, generator=generator, device=dev, dtype=torch.float64)
        u = u.to(expert.device)
        top = u < top_share
        if top_share > 0.0:  # the rest of the draw, rescaled to [0, 1): still uniform
            u = torch.where(top, u, (u - top_share) / (1.0 - top_share))
        # the minimum guards u * count rounding up to count
        k = torch.minimum(lo + torch.floor(u * count).long(), lo + count - 1)
        return torch.where(top, lo + count - 1, k)

    def route(self, sigma: Tensor) -> Tensor:
        """Expert per sample from its noise level: sigma > sigma_b -> SEMANTIC, else DETAIL.

        Compared in float32 (never bf16: bf16 rounds sigma_35 = 0.97764 and sigma_34 =
        0.97541 to the same value, sending a SemE step to DetE). A bf16 input has already
        lost that precision; pass float32 or float64.
        """
        s32 = sigma.to(torch.float32)
        bar = torch.tensor(self.sigma_split, dtype=torch.float32, device=sigma.device)
        return torch.where(s32 > bar, SEMANTIC, DETAIL).long()

    # ------------------------------------------------------------ sampling lists
    def _position_sigma(self, p: float) -> float:
        """sigma at a (possibly fractional) grid position p: sigma((p + 1) / N)."""
        if float(p).is_integer():
            return float(self.sigmas[int(p)])  # exactly the grid value (routes like sigma_b)
        return shifted((p + 1.0) / self.grid_points, self.shift)

    def _uniform(self, top: int, span: int, m: int) -> list[float]:
        """m positions from ``top`` down in equal index steps of span/m (top included).

        When the sub-trajectory has at least m grid points the positions are rounded
        half-up to grid indices (distinct, since the step is >= 1): the student was
        trained there. With more steps than grid points they stay fractional on the
        continuous shifted curve.
        """
        step = span / m
        pos = [top - j * step for j in range(m)]
        if m <= span:
            pos = [float(math.floor(p + 0.5)) for p in pos]
        return [self._position_sigma(p) for p in pos]

    def sampling_sigmas(self, n: int, preset: str = "", semantic_steps: int = 0) -> list[float]:
        """Descending sigma list for n student steps, ending with 0.0 (METHOD.md section 7).

        Even split: SemE gets ceil(n / 2) steps, DetE floor(n / 2). Our choice for odd n:
        the extra step goes to the high-noise expert, which fixes layout and motion (the
        paper's ablation credits most of DCM's gain to that expert). ``semantic_steps``
        (1..n-1) shares the steps otherwise; on the shapes student the even share scored
        best (benchmarks/step_split.py, docs/QUALITY.md section 6).
        SemE steps run uniformly in grid index from N-1 down to b (exclusive), DetE steps
        from b down to the end (index -1, below which the list closes at 0).
        With ``preset`` (a key of SIGMA_PRESETS) the reference list is used instead; a
        value within PRESET_SNAP of sigma_b is snapped to sigma_b so it routes to DetE.
        """
        if preset:
            return self._preset(n, preset)
        if n < 2:
            raise ConfigError(f"sample.steps={n} must be at least 2 (one step per expert)")
        n_sem = n if self.single_expert else (semantic_steps or (n + 1) // 2)
        if not self.single_expert and not 1 <= n_sem <= n - 1:
            raise ConfigError(f"semantic_steps={semantic_steps} must lie in 1..{n - 1}")
        n_det = n - n_sem
        top = self.grid_points - 1
        sem = self._uniform(top, top - self.split, n_sem)
        det = self._uniform(self.split, self.split + 1, n_det) if n_det else []
        return sem + det + [0.0]

    def _preset(self, n: int, preset: str) -> list[float]:
        if preset not in SIGMA_PRESETS:
            raise ConfigError(
                f"sample.sigma_preset='{preset}' is unknown: choose one of {', '.join(SIGMA_PRESETS)}"
            )
        values = list(SIGMA_PRESETS[preset])
        if n != len(values):
            raise ConfigError(
                f"sample.steps={n} does not match sample.sigma_preset='{preset}' "
                f"({len(values)} steps): set sample.steps={len(values)} or clear the preset"
            )
        out = [self.sigma_split if abs(v - self.sigma_split) <= PRESET_SNAP else v for v in values]
        return out + [0.0]

    def semantic_head(self, sigmas: list[float]) -> list[float]:
        """The part of a descending sigma list above sigma_b, closed at sigma_b: the SemE's
        share of a sampling list, which hands the DetE its state at sigma_b."""
        return [s for s in sigmas if s > self.sigma_split] + [self.sigma_split]

    def teacher_sigmas(self, n: int = 50) -> list[float]:
        """Teacher Euler list: the N grid points descending then 0; sigma(i / n) for n != N."""
        if n < 1:
            raise ConfigError(f"sample.teacher_steps={n} must be at least 1")
        if n == self.grid_points:
            return [float(s) for s in self.sigmas.flip(0)] + [0.0]
        return [shifted(i / n, self.shift) for i in range(n, 0, -1)] + [0.0]
