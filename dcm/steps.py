"""One consistency-distillation training step per stage (METHOD.md sections 4-6).

Pure maths: no optimisers, no devices, no precision policy (the runner wraps a call in
autocast and owns backward/step). Arithmetic on latents runs in float32; the networks get
t = 1000 sigma as float32.

Random draws, all from the ``generator`` argument, in this fixed order (so every rank of a
sequence-parallel group seeded alike draws the same values, and a replayed seed replays a
step exactly):

1. dropout: B uniforms (drawn even when empty_prompt_prob = 0, to keep the order fixed)
2. k: B uniforms -> start grid index per sample (``Schedule.sample_indices``)
3. eps: noise like x0 (with ``method.detail_inputs='semantic'`` the DetE's pure noise at sigma 1)
4. a: B uniforms -> adversarial index U{0..b} (detail step only)
5. eps2: noise like x0, shared by the fake and the real sample (detail step only)

Models called (interfaces of docs/ARCHITECTURE.md):
``student(x, t, cond, expert)``, ``teacher(x, t, cond)``,
``teacher.forward_with_taps(x, t, cond, every=)``,
``teacher.project(tokens, t, shape, cond=)`` (Hunyuan's final adaLN needs the text),
``teacher.token_grid(shape)``, ``disc(taps, grid)`` -> list of per-head logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dcm.config import DETAIL, SEMANTIC, MethodConfig
from dcm.guidance import expand_cond, teacher_velocity, with_embedded_guidance
from dcm.losses import (
    ConsistencyLoss,
    FeatureMatchingLoss,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    TemporalCoherenceLoss,
)
from dcm.schedule import Schedule


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) float64 uniforms drawn on the generator's device, moved to ``device``."""
    u = torch.rand(n, generator=generator, device=_gen_device(generator), dtype=torch.float64)
    return u.to(device)


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``like`` (float32), drawn on the generator's device."""
    z = torch.randn(like.shape, generator=generator, device=_gen_device(generator))
    return z.to(like.device)


def _bc(s: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1, 1) to broadcast a per-sample scalar over x."""
    return s.view(-1, *([1] * (x.dim() - 1)))


def drop_prompts(cond: Any, null_cond: Any, drop: Tensor) -> Any:
    """Rows of ``cond`` where ``drop`` (B,) bool is True replaced by the empty prompt."""
    if not bool(drop.any()):
        return cond
    batch = drop.shape[0]
    null = expand_cond(null_cond, batch)
    idx = torch.arange(batch, device=drop.device) + batch * drop.long()  # row i or B + i
    return type(cond).cat([cond, null]).index(idx.to(cond.text.device))


@dataclass
class _Consistency:
    """What both stages share after METHOD.md section 4 steps 1-5."""

    x_hat: Tensor  # (B, C, T, H, W) student endpoint, with grad
    x_tgt: Tensor  # (B, C, T, H, W) target endpoint, no grad
    sigma_e: Tensor  # (B,) float32 endpoint
    cond: Any  # conditioning after dropout, with embedded guidance where configured
    cd: Tensor  # consistency loss


class _Step:
    """Sections 4.1-4.5 for one expert; the stage subclasses add their extra losses."""

    expert: int = SEMANTIC

    def __init__(
        self, schedule: Schedule, method: MethodConfig, empty_prompt_prob: float = 0.0
    ) -> None:
        if not 0.0 <= empty_prompt_prob <= 1.0:
            raise ValueError(f"empty_prompt_prob={empty_prompt_prob!r} must lie in [0, 1]")
        self.schedule, self.method = schedule, method
        self.empty_prompt_prob = empty_prompt_prob
        self.consistency = ConsistencyLoss(method.consistency_loss, method.huber_c)

    def _consistency(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator | None,
        target: nn.Module | None,
    ) -> _Consistency:
        sch, method = self.schedule, self.method
        x0 = batch["x0"].float()  # (B, C, T, H, W) normalised latents
        bsz, dev = x0.shape[0], x0.device
        expert = torch.full((bsz,), self.expert, dtype=torch.long, device=dev)

        # Draws 1-3 (module docstring order): dropout, k, eps.
        drop = _rand(bsz, generator, dev) < self.empty_prompt_prob
        k = sch.sample_indices(expert, generator, method.top_share)  # (B,)
        eps = _randn(x0, generator)
        cond = drop_prompts(batch["cond"], batch["null_cond"], drop)
        cond = with_embedded_guidance(cond, method, bsz)  # teacher, student and target alike

        sigma, sigma_p, sigma_e = sch.sigma(k), sch.sigma_prev(k), sch.endpoint(expert)  # (B,)
        t, t_p = 1000.0 * sigma, 1000.0 * sigma_p
        s, sp, se = _bc(sigma, x0), _bc(sigma_p, x0), _bc(sigma_e, x0)

        if self.expert == DETAIL and method.detail_inputs == "semantic":
            # 1'. x_k on the path sampling takes: eps is the pure noise (x0 unused)
            x_k = self._sampled_states(student, teacher, eps, k, cond, batch["null_cond"])
        else:
            # 1. x_k = (1 - sigma) x0 + sigma eps
            x_k = (1.0 - s) * x0 + s * eps
        # 2. student endpoint, with grad: x_hat = x_k + (sigma_e - sigma) F(x_k, t_k, c)
        x_hat = x_k + (se - s) * student(x_k, t, cond, expert).float()
        with torch.no_grad():
            # 3. frozen original teacher, guided; one Euler step to sigma' = sigma_prev(k)
            v_t = teacher_velocity(teacher, x_k, t, cond, batch["null_cond"], method).float()
            x_prev = x_k + (sp - s) * v_t
            if self.target_kind == "teacher":
                # 4'. the teacher's own grid Euler steps on to sigma_e (no bootstrap)
                x_tgt = self._teacher_tail(teacher, x_prev, k, cond, batch["null_cond"])
            else:
                # 4. target from the current student (or an EMA copy) at (x_prev, t');
                #    x_tgt = x_prev itself where sigma' == sigma_e (k = b+1 SemE, k = 0 DetE)
                f_tgt = (target if target is not None else student)(x_prev, t_p, cond, expert)
                x_tgt = torch.where(sp == se, x_prev, x_prev + (se - sp) * f_tgt.float())
        # 5. consistency loss (pseudo-Huber c = 0.001 or L2), mean over all elements
        cd = self.consistency(x_hat, x_tgt)
        return _Consistency(x_hat=x_hat, x_tgt=x_tgt, sigma_e=sigma_e, cond=cond, cd=cd)

    @property
    def target_kind(self) -> str:
        """'bootstrap' (METHOD.md section 4 step 4) or 'teacher' (step 4') for this expert."""
        m = self.method
        return m.semantic_target if self.expert == SEMANTIC else m.detail_target

    @torch.no_grad()
    def _sampled_states(
        self,
        student: nn.Module,
        teacher: nn.Module,
        eps: Tensor,
        k: Tensor,
        cond: Any,
        null_cond: Any,
    ) -> Tensor:
        """DetE training states where sampling puts them (``method.detail_inputs='semantic'``).

        eps: (B, C, T, H, W) pure noise at sigma = 1. Even rows take the 2-step list's SemE
        head (one jump to sigma_b), odd rows the 4-step list's (two steps): the two states
        the default samplers hand the DetE. From sigma_b (grid point b) the guided
        teacher's grid Euler steps carry row i down to sigma_{k_i} (k_i = b: none). Costs
        1.5 SemE passes per row and up to b guided teacher steps (2 passes each with CFG).
        """
        sch, b = self.schedule, self.schedule.split
        x = eps.float().clone()
        rows = torch.arange(x.shape[0], device=x.device)
        for parity, n in ((0, 2), (1, 4)):
            r = rows[rows % 2 == parity]
            if r.numel() == 0:
                continue
            head = sch.semantic_head(sch.sampling_sigmas(n))
            xr, cr = x[r], cond.index(r)
            sem = torch.full((r.numel(),), SEMANTIC, dtype=torch.long, device=x.device)
            for cur, nxt in zip(head, head[1:], strict=False):
                t = torch.full((r.numel(),), 1000.0 * cur, dtype=torch.float32, device=x.device)
                xr = xr + (nxt - cur) * student(xr, t, cr, sem).float()
            x[r] = xr
        for j in range(b, int(k.min()), -1):  # grid point j -> j - 1 for the rows with k < j
            self._teacher_grid_step(teacher, x, (k < j).nonzero().squeeze(1), j, cond, null_cond)
        return x

    def _teacher_grid_step(
        self, teacher: nn.Module, x: Tensor, rows: Tensor, j: int, cond: Any, null_cond: Any
    ) -> None:
        """In place: the rows ``rows`` (R,) of x, now at sigma_j, take one guided teacher
        Euler step to sigma_prev(j)."""
        jj = torch.full_like(rows, j)
        s, sp = self.schedule.sigma(jj), self.schedule.sigma_prev(jj)  # (R,)
        xr = x[rows]
        v = teacher_velocity(teacher, xr, 1000.0 * s, cond.index(rows), null_cond, self.method)
        x[rows] = xr + _bc(sp - s, xr) * v.float()

    def _teacher_tail(
        self, teacher: nn.Module, x_prev: Tensor, k: Tensor, cond: Any, null_cond: Any
    ) -> Tensor:
        """The guided teacher's grid Euler steps from sigma_{k-1} on down to the endpoint.

        x_prev: (B, C, T, H, W) at sigma_prev(k) per sample. Row i takes steps j = k_i - 1
        down to the expert's lowest index (b+1 lands on sigma_b, 0 on sigma_min); at step j
        only the rows now at sigma_j (k_i > j) run the teacher, so a batch costs
        max k - lowest index further guided steps (2 passes each with CFG, 1 embedded).
        """
        lo = self.schedule.index_range(self.expert)[0]
        x = x_prev.clone()
        for j in range(int(k.max()) - 1, lo - 1, -1):  # the rows now at sigma_j: k > j
            self._teacher_grid_step(teacher, x, (k > j).nonzero().squeeze(1), j, cond, null_cond)
        return x


class SemanticStep(_Step):
    """Stage 1 (METHOD.md section 5): L = L_CD + lambda_tc L_TC on SemE indices b+1..N-1.

    2 student passes (endpoint with grad, target without), teacher passes: 2 with CFG,
    1 with embedded guidance.
    """

    expert = SEMANTIC

    def __init__(
        self, schedule: Schedule, method: MethodConfig, empty_prompt_prob: float = 0.0
    ) -> None:
        super().__init__(schedule, method, empty_prompt_prob)
        self.temporal = TemporalCoherenceLoss(method.tc_stride)

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator | None,
        target: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        c = self._consistency(student, teacher, batch, generator, target)
        tc = self.temporal(c.x_hat, c.x_tgt)
        loss = c.cd + self.method.tc_weight * tc
        return {"loss": loss, "cd": c.cd.detach(), "tc": tc.detach()}


class DetailStep(_Step):
    """Stage 2 (METHOD.md section 6): L_CD + lambda_adv (gen_scale L_G + lambda_fm L_FM).

    The discriminator features come from the frozen teacher at the re-noised endpoints,
    computed ONCE: the fake taps keep their graph (L_G and L_FM train the student through
    the frozen teacher), and L_D reuses them detached. A Wan step costs 2 student passes
    and 4 teacher passes (2 CFG + taps on fake + taps on real); with
    ``method.detail_target='teacher'`` 1 student pass and 2 CFG passes per further grid
    point of the tail. The returned losses are
    independent: ``loss_g`` gives no grad to the discriminator (its parameters enter
    detached) and ``loss_d`` gives grad only to the discriminator, so the runner can do
    G backward + step, then D backward + step, in either order.
    """

    expert = DETAIL

    def __init__(
        self, schedule: Schedule, method: MethodConfig, empty_prompt_prob: float = 0.0
    ) -> None:
        super().__init__(schedule, method, empty_prompt_prob)
        self.gen_loss = HingeGeneratorLoss()
        self.disc_loss = HingeDiscriminatorLoss()
        self.fm_loss = FeatureMatchingLoss()

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        disc: nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator | None,
        target: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        sch, method = self.schedule, self.method
        if any(p.requires_grad for p in teacher.parameters()):
            # L_G backpropagates through the teacher's taps: a trainable teacher would be
            # trained too (METHOD.md section 6: the discriminator's teacher is frozen).
            raise ValueError(
                "DetailStep: the teacher must be frozen; call teacher.requires_grad_(False)"
            )
        c = self._consistency(student, teacher, batch, generator, target)
        x_hat, x_tgt = c.x_hat, c.x_tgt
        bsz, dev = x_hat.shape[0], x_hat.device
        shape = tuple(x_hat.shape)  # (B, C, T, H, W)

        # 6a. draws 4-5: a ~ U{0..b} per sample, sigma_a = sigma_prev(a); one shared eps2
        a = sch.sample_indices(torch.full((bsz,), DETAIL, dtype=torch.long, device=dev), generator)
        sigma_a = sch.sigma_prev(a)  # (B,) float32
        eps2 = _randn(x_hat, generator)
        sa, se = _bc(sigma_a, x_hat), _bc(c.sigma_e, x_hat)
        t_a = 1000.0 * sigma_a

        # 6b. re-noise both endpoints from sigma_e to sigma_a (x_fake keeps grad)
        x_fake = ((1.0 - sa) * x_hat + (sa - se) * eps2) / (1.0 - se)
        if method.adv_real == "data":
            # the clip itself, as if noised to sigma_e by eps2 and re-noised like x_fake:
            # ((1 - sa)((1 - se) x0 + se eps2) + (sa - se) eps2) / (1 - se) = (1 - sa) x0 + sa eps2
            x_real = (1.0 - sa) * batch["x0"].float() + sa * eps2
        else:
            x_real = ((1.0 - sa) * x_tgt + (sa - se) * eps2) / (1.0 - se)  # no grad in x_tgt

        # 6c. teacher features, once each: fake with grad into x_hat, real without
        every = method.tap_every
        _, taps_fake = teacher.forward_with_taps(x_fake, t_a, c.cond, every=every)
        with torch.no_grad():
            _, taps_real = teacher.forward_with_taps(x_real, t_a, c.cond, every=every)
        grid = teacher.token_grid(shape)

        # 6d. generator side: the discriminator's parameters enter detached, so L_G
        #     trains only the student (through the frozen teacher's tapped features)
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        g = self.gen_loss(functional_call(disc, frozen, (taps_fake, grid)))
        fm = self.fm_loss(
            taps_fake, taps_real, lambda tok: teacher.project(tok, t_a, shape, cond=c.cond)
        )
        loss_g = c.cd + method.adv_weight * (method.gen_scale * g + method.fm_weight * fm)

        # 6e. discriminator side: the same features, detached (pre-update samples)
        logits_fake = disc([f.detach() for f in taps_fake], grid)
        logits_real = disc(list(taps_real), grid)
        loss_d, d_fake, d_real = self.disc_loss(logits_fake, logits_real)

        return {
            "loss_g": loss_g,
            "loss_d": loss_d,
            "cd": c.cd.detach(),
            "g": g.detach(),
            "fm": fm.detach(),
            "d_real": d_real.detach(),
            "d_fake": d_fake.detach(),
        }
