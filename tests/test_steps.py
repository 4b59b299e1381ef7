"""The per-stage training steps (METHOD.md sections 4-6) on small fake networks.

The fakes implement exactly the calls of docs/ARCHITECTURE.md with linear fields, so
every quantity of a step can be recomputed by hand from the replayed generator draws
(order: dropout, k, eps, then a, eps2), and every network pass is counted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dcm.backbones.base import Cond
from dcm.config import DETAIL, SEMANTIC, MethodConfig
from dcm.schedule import Schedule
from dcm.steps import DetailStep, SemanticStep

SHAPE = (3, 2, 5, 2, 2)  # (B, C, T, H, W): T = 5 > tc_stride = 3
B, C = SHAPE[0], SHAPE[1]
N_TOK = SHAPE[2] * SHAPE[3] * SHAPE[4]
D_TOK = 6
W_CFG = 5.0


def text_mean(cond: Cond, x: torch.Tensor) -> torch.Tensor:
    return cond.text.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x)


class FakeTeacher(nn.Module):
    """v = a x + m(c) with m the mean of the text; taps are linear maps of x's tokens."""

    def __init__(self, taps: int = 2) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.7))
        self.w = nn.ParameterList([nn.Parameter(torch.randn(C, D_TOK)) for _ in range(taps)])
        self.p = nn.Parameter(torch.randn(D_TOK, C))
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, Cond]] = []

    def forward(self, x, t, cond):
        self.calls.append(("forward", x.detach().clone(), t.clone(), cond))
        return self.a * x + text_mean(cond, x)

    def tokens(self, x):
        return x.flatten(2).transpose(1, 2)  # (B, N, C)

    def forward_with_taps(self, x, t, cond, every=2):
        assert every == 2
        self.calls.append(("taps", x.detach().clone(), t.clone(), cond))
        tok = self.tokens(x)
        return self.a * x + text_mean(cond, x), [tok @ w for w in self.w]

    def project(self, tokens, t, latent_shape, cond=None):
        assert t.shape == (tokens.shape[0],)
        bsz, _, c, tt, h, w = (tokens.shape[0], *latent_shape)
        return (tokens @ self.p).transpose(1, 2).reshape(bsz, c, tt, h, w)

    def token_grid(self, latent_shape):
        return tuple(latent_shape[-3:])

    def count(self, kind: str) -> int:
        return sum(1 for c in self.calls if c[0] == kind)


class FakeStudent(nn.Module):
    """F = s_e x + q_e m(c), one (s, q) pair per expert, chosen per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([-0.5, -0.9]))
        self.q = nn.Parameter(torch.tensor([0.8, 1.2]))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Cond, torch.Tensor]] = []

    def forward(self, x, t, cond, expert):
        assert t.dtype == torch.float32 and expert.dtype == torch.long
        self.calls.append((x.detach().clone(), t.clone(), cond, expert.clone()))
        s, q = self.s[expert].view(-1, 1, 1, 1, 1), self.q[expert].view(-1, 1, 1, 1, 1)
        return s * x + q * text_mean(cond, x)


class FakeDisc(nn.Module):
    """One linear head per tap: per-token logits."""

    def __init__(self, taps: int = 2) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(D_TOK, 1) for _ in range(taps)])
        with torch.no_grad():  # small logits: every hinge is active, so every head learns
            for head in self.heads:
                head.weight.mul_(0.05)
                head.bias.mul_(0.1)

    def forward(self, taps, grid):
        assert grid[0] * grid[1] * grid[2] == taps[0].shape[1]
        return [head(tap).flatten() for head, tap in zip(self.heads, taps, strict=True)]


def grid_sigma(k: torch.Tensor, b: int | None = None) -> torch.Tensor:
    """Independent closed form: sigma_k = 17 (k + 1) / (50 + 16 (k + 1)), sigma_-1 = 17/1016."""
    k = k.double()
    s = 17 * (k + 1) / (50 + 16 * (k + 1))
    return torch.where(k < 0, torch.full_like(s, 17 / 1016), s)


def bc(s: torch.Tensor) -> torch.Tensor:
    return s.double().view(-1, 1, 1, 1, 1)


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return {
        "x0": torch.randn(SHAPE, generator=g),
        "cond": Cond(text=1.0 + torch.rand(B, 4, 8, generator=g)),
        "null_cond": Cond(text=torch.zeros(1, 4, 8)),
    }


def pseudo_huber(d: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    return (torch.sqrt(d**2 + c**2) - c).mean()


def expected_consistency(batch, seed, expert, method, student, teacher_a, drop_p=0.0):
    """Section 4 by hand, in float64, from the replayed draws."""
    g = torch.Generator().manual_seed(seed)
    u_drop = torch.rand(B, generator=g, dtype=torch.float64)
    u_k = torch.rand(B, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g).double()
    b = method.split
    k = (b + 1 + torch.floor(u_k * (49 - b))) if expert == SEMANTIC else torch.floor(u_k * (b + 1))
    s, sp = grid_sigma(k), grid_sigma(k - 1)
    se = (
        grid_sigma(torch.tensor(float(b))) if expert == SEMANTIC else grid_sigma(torch.tensor(-1.0))
    )
    s, sp, se = bc(s), bc(sp), se.double()
    x0 = batch["x0"].double()
    m = batch["cond"].text.double().mean(dim=(1, 2))
    m = torch.where(u_drop < drop_p, torch.zeros_like(m), m).view(-1, 1, 1, 1, 1)
    s_e, q_e = student.s[expert].item(), student.q[expert].item()
    x_k = (1 - s) * x0 + s * eps
    x_hat = x_k + (se - s) * (s_e * x_k + q_e * m)
    # v(c) = a x + m, v(null) = a x (empty text): v_T = v(c) + w (v(c) - v(null))
    v_t = teacher_a * x_k + m + W_CFG * ((teacher_a * x_k + m) - teacher_a * x_k)
    x_prev = x_k + (sp - s) * v_t
    x_tgt = x_prev + (se - sp) * (s_e * x_prev + q_e * m)
    return {"k": k.long(), "eps": eps, "x_hat": x_hat, "x_tgt": x_tgt, "se": se, "g": g, "s": s}


@pytest.fixture
def method() -> MethodConfig:
    return MethodConfig()  # Wan: b = 34, CFG w = 5, pseudo-Huber, tc 1, stride 3


def test_semantic_step_matches_hand_computation(method: MethodConfig) -> None:
    torch.manual_seed(0)
    student, teacher, batch = FakeStudent(), FakeTeacher(), make_batch()
    out = SemanticStep(Schedule.from_config(method), method)(
        student, teacher, batch, torch.Generator().manual_seed(7)
    )
    ref = expected_consistency(batch, 7, SEMANTIC, method, student, -0.7)
    d = ref["x_hat"] - ref["x_tgt"]
    cd = pseudo_huber(d)
    dd = d[:, :, 3:] - d[:, :, :-3]  # D(x_hat) - D(x_tgt), stride 3
    assert out["cd"].item() == pytest.approx(cd.item(), rel=1e-4)
    assert out["tc"].item() == pytest.approx(dd.pow(2).mean().item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx(cd.item() + dd.pow(2).mean().item(), rel=1e-4)
    # the student saw x_k at t_k, then x_prev at t' = 1000 sigma_prev(k), all as SemE
    (x1, t1, _, e1), (_, t2, _, e2) = student.calls
    k = ref["k"]
    assert bool((k >= 35).all() and (k <= 49).all())
    x_k = (1 - ref["s"]) * batch["x0"].double() + ref["s"] * ref["eps"]
    assert torch.allclose(x1.double(), x_k, atol=1e-5)
    assert torch.allclose(t1.double(), 1000 * grid_sigma(k), atol=1e-3)
    assert torch.allclose(t2.double(), 1000 * grid_sigma(k - 1), atol=1e-3)
    assert e1.tolist() == e2.tolist() == [SEMANTIC] * B


def test_semantic_step_passes_and_gradients(method: MethodConfig) -> None:
    student, teacher = FakeStudent(), FakeTeacher()  # teacher params left trainable on purpose
    out = SemanticStep(Schedule.from_config(method), method)(
        student, teacher, make_batch(), torch.Generator().manual_seed(1)
    )
    assert len(student.calls) == 2
    assert teacher.count("forward") == 2 and teacher.count("taps") == 0  # CFG: c and null
    assert teacher.calls[1][3].text.abs().sum() == 0 and teacher.calls[1][3].text.shape[0] == B
    out["loss"].backward()
    assert student.s.grad is not None and student.s.grad[SEMANTIC] != 0
    assert student.s.grad[DETAIL] == 0  # only the semantic expert's parameters were used
    assert all(p.grad is None for p in teacher.parameters())
    assert not out["cd"].requires_grad and not out["tc"].requires_grad


def test_target_is_x_prev_at_the_boundary(method: MethodConfig) -> None:
    # k = b + 1 gives sigma' == sigma_e: the target pass must not matter there. A target
    # network that returns NaN at t' = t_b would poison the loss otherwise.
    sch = Schedule.from_config(method)
    t_b = 1000.0 * sch.endpoint(torch.tensor([SEMANTIC]))[0]

    class NanAtBoundary(nn.Module):
        def forward(self, x, t, cond, expert):
            return torch.where((t == t_b).view(-1, 1, 1, 1, 1), float("nan"), 0.0) + x

    hits = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        out = SemanticStep(sch, method)(
            FakeStudent(), FakeTeacher(), make_batch(), gen, NanAtBoundary()
        )
        assert torch.isfinite(out["loss"])
        g = torch.Generator().manual_seed(seed)
        torch.rand(B, generator=g, dtype=torch.float64)
        hits += int((sch.sample_indices(torch.zeros(B, dtype=torch.long), g) == 35).sum())
    assert hits > 0  # the boundary index k = b + 1 was actually drawn


def test_ema_target_module_is_used(method: MethodConfig) -> None:
    student, target = FakeStudent(), FakeStudent()
    SemanticStep(Schedule.from_config(method), method)(
        student, FakeTeacher(), make_batch(), torch.Generator().manual_seed(0), target
    )
    assert len(student.calls) == 1 and len(target.calls) == 1


def test_empty_prompt_dropout_per_sample_from_generator(method: MethodConfig) -> None:
    sch = Schedule.from_config(method)
    student = FakeStudent()
    SemanticStep(sch, method, empty_prompt_prob=1.0)(
        student, FakeTeacher(), make_batch(), torch.Generator().manual_seed(0)
    )
    assert student.calls[0][2].text.abs().sum() == 0
    for seed in range(4):
        student = FakeStudent()
        SemanticStep(sch, method, empty_prompt_prob=0.5)(
            student, FakeTeacher(), make_batch(), torch.Generator().manual_seed(seed)
        )
        drop = (
            torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < 0.5
        )
        row_empty = student.calls[0][2].text.abs().sum(dim=(1, 2)) == 0
        assert row_empty.tolist() == drop.tolist()
    # the draw order does not depend on the probability: same k and eps with p = 0 or 0.5
    s1, s2 = FakeStudent(), FakeStudent()
    SemanticStep(sch, method, 0.0)(
        s1, FakeTeacher(), make_batch(), torch.Generator().manual_seed(3)
    )
    SemanticStep(sch, method, 0.5)(
        s2, FakeTeacher(), make_batch(), torch.Generator().manual_seed(3)
    )
    assert torch.equal(s1.calls[0][0], s2.calls[0][0]) and torch.equal(
        s1.calls[0][1], s2.calls[0][1]
    )


def test_same_seed_same_step(method: MethodConfig) -> None:
    sch = Schedule.from_config(method)
    runs = []
    for seed in (4, 4, 5):
        torch.manual_seed(0)
        out = SemanticStep(sch, method)(
            FakeStudent(), FakeTeacher(), make_batch(), torch.Generator().manual_seed(seed)
        )
        runs.append(out["loss"].item())
    assert runs[0] == runs[1] != runs[2]


def test_embedded_guidance_one_teacher_pass(method: MethodConfig) -> None:
    m = dataclasses.replace(method, guidance="embedded", split=37, fm_weight=1.0)
    student, teacher = FakeStudent(), FakeTeacher()
    SemanticStep(Schedule.from_config(m), m)(
        student, teacher, make_batch(), torch.Generator().manual_seed(0)
    )
    assert teacher.count("forward") == 1
    for cond in [c[2] for c in student.calls] + [teacher.calls[0][3]]:
        assert cond.guidance.dtype == torch.float32 and cond.guidance.tolist() == [6016.0] * B
    assert torch.tensor(6000.0).bfloat16().item() == 6016.0  # why the reference feeds 6016


def teacher_tail_by_hand(x_k, k, lo, m, teacher_a):
    """Row by row in float64: guided teacher Euler steps from sigma_k down to sigma_{lo-1}."""
    rows = []
    for i in range(B):
        x = x_k[i : i + 1]
        for j in range(int(k[i]), lo - 1, -1):
            s, sp = grid_sigma(torch.tensor(float(j))), grid_sigma(torch.tensor(j - 1.0))
            x = x + (sp - s) * (teacher_a * x + (1 + W_CFG) * m[i : i + 1])
        rows.append(x)
    return torch.cat(rows)


@pytest.mark.parametrize("expert", [SEMANTIC, DETAIL])
def test_teacher_target_is_the_teachers_own_tail(method: MethodConfig, expert: int) -> None:
    # method.*_target = 'teacher': x_tgt is the guided teacher's grid path from x_k to the
    # endpoint (sigma_b for SemE, sigma_min for DetE), and no student target pass runs
    key = "semantic_target" if expert == SEMANTIC else "detail_target"
    m = dataclasses.replace(method, **{key: "teacher"})
    sch, batch, student = Schedule.from_config(m), make_batch(), FakeStudent()
    teacher = FakeTeacher().requires_grad_(False)
    if expert == SEMANTIC:
        out = SemanticStep(sch, m)(student, teacher, batch, torch.Generator().manual_seed(7))
        ref = expected_consistency(batch, 7, SEMANTIC, m, student, -0.7)
    else:
        out, student, teacher, _ = run_detail(m, seed=7, student=student, teacher=teacher)
        ref = expected_consistency(batch, 7, DETAIL, m, student, -0.7)
    k, lo = ref["k"], sch.index_range(expert)[0]
    x_k = (1 - ref["s"]) * batch["x0"].double() + ref["s"] * ref["eps"]
    text = batch["cond"].text.double().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    x_tgt = teacher_tail_by_hand(x_k, k, lo, text, -0.7)
    assert not torch.allclose(x_tgt, ref["x_tgt"], atol=1e-3)  # differs from the bootstrap
    assert out["cd"].item() == pytest.approx(pseudo_huber(ref["x_hat"] - x_tgt).item(), rel=1e-4)
    assert len(student.calls) == 1  # the endpoint only: the target needs no student pass
    # 2 CFG passes per step: the whole batch's first step (section 4 step 3), then at each
    # grid point j below the highest k only the rows that started above it
    forwards = [c for c in teacher.calls if c[0] == "forward"]
    assert [c[1].shape[0] for c in forwards[::2]] == [B] + [
        int((k > j).sum()) for j in range(int(k.max()) - 1, lo - 1, -1)
    ]
    assert len(forwards) == 2 * (int(k.max()) - lo + 1)


def sampled_states_by_hand(eps, k, m, sch, student, teacher_a):
    """method.detail_inputs='semantic' in float64, row by row: the SemE head of the 2-step
    (even rows) or 4-step (odd rows) list from eps at sigma = 1, then the guided teacher's
    grid steps from sigma_b down to sigma_k."""
    s_sem, q_sem = student.s[SEMANTIC].item(), student.q[SEMANTIC].item()
    b, rows = sch.split, []
    for i in range(B):
        lst = sch.sampling_sigmas(2 if i % 2 == 0 else 4)
        head = [v for v in lst if v > sch.sigma_split] + [sch.sigma_split]
        x, mi = eps[i : i + 1], m[i : i + 1]
        for cur, nxt in zip(head, head[1:], strict=False):
            x = x + (nxt - cur) * (s_sem * x + q_sem * mi)
        for j in range(b, int(k[i]), -1):
            sj, sp = grid_sigma(torch.tensor(float(j))), grid_sigma(torch.tensor(j - 1.0))
            x = x + (sp - sj) * (teacher_a * x + (1 + W_CFG) * mi)
        rows.append(x)
    return torch.cat(rows)


def test_detail_inputs_semantic_trains_on_sampled_states(method: MethodConfig) -> None:
    # method.detail_inputs='semantic': x_k is where sampling puts the DetE (the SemE's
    # steps to sigma_b, then the guided teacher's grid down to sigma_k), not a noised clip
    m = dataclasses.replace(method, split=4, detail_inputs="semantic")
    sch, student = Schedule.from_config(m), FakeStudent()
    out, student, teacher, _ = run_detail(m, seed=5, student=student)
    batch = make_batch()
    ref = expected_consistency(batch, 5, DETAIL, m, student, -0.7)
    k, s, sp, se = ref["k"], ref["s"], bc(grid_sigma(ref["k"] - 1)), ref["se"]
    assert len(set(k.tolist())) > 1 and int(k.min()) < m.split  # the walk runs, unevenly
    text = batch["cond"].text.double().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    x_k = sampled_states_by_hand(ref["eps"], k, text, sch, student, -0.7)
    s_d, q_d = student.s[DETAIL].item(), student.q[DETAIL].item()
    x_hat = x_k + (se - s) * (s_d * x_k + q_d * text)
    x_prev = x_k + (sp - s) * (-0.7 * x_k + (1 + W_CFG) * text)
    x_tgt = x_prev + (se - sp) * (s_d * x_prev + q_d * text)
    assert out["cd"].item() == pytest.approx(pseudo_huber(x_hat - x_tgt).item(), rel=1e-4)
    # the DetE endpoint pass saw the sampled states, far from the noised clips
    seen = student.calls[3][0].double()
    assert torch.allclose(seen, x_k, atol=1e-5)
    assert (seen - ((1 - s) * batch["x0"].double() + s * ref["eps"])).abs().max() > 0.1
    # student passes: the SemE heads (rows 0, 2: one jump; row 1: two steps), then the
    # DetE endpoint and its target; the head passes carry no gradient
    experts = [c[3].tolist() for c in student.calls]
    assert experts == [[SEMANTIC] * 2, [SEMANTIC], [SEMANTIC], [DETAIL] * B, [DETAIL] * B]
    # teacher: 2 CFG passes per walk step (rows with k < j), then section 4 step 3's pair
    forwards = [c[1].shape[0] for c in teacher.calls if c[0] == "forward"][::2]
    walk = [int((k < j).sum()) for j in range(m.split, int(k.min()), -1)]
    assert forwards == walk + [B]
    # the clip is not used: another x0, the same step
    other = make_batch()
    other["x0"] = other["x0"] * 3.0 + 1.0
    again = DetailStep(sch, m)(
        FakeStudent(),
        FakeTeacher().requires_grad_(False),
        FakeDisc(),
        other,
        torch.Generator().manual_seed(5),
    )
    assert again["cd"].item() == pytest.approx(out["cd"].item(), rel=1e-6)


def test_detail_inputs_semantic_needs_two_experts() -> None:
    from dcm.config import ConfigError

    with pytest.raises(ConfigError, match="method.detail_inputs='semantic' needs two experts"):
        MethodConfig(split=-1, detail_inputs="semantic")


# ---------------------------------------------------------------- stage 2
def run_detail(method, seed=3, student=None, teacher=None, disc=None):
    torch.manual_seed(0)
    student = student or FakeStudent()
    teacher = teacher or FakeTeacher().requires_grad_(False)
    disc = disc or FakeDisc()
    out = DetailStep(Schedule.from_config(method), method)(
        student, teacher, disc, make_batch(), torch.Generator().manual_seed(seed)
    )
    return out, student, teacher, disc


def test_detail_step_matches_hand_computation(method: MethodConfig) -> None:
    out, student, teacher, disc = run_detail(method)
    batch = make_batch()
    ref = expected_consistency(batch, 3, DETAIL, method, student, -0.7)
    g = ref["g"]  # continues after eps: a, then eps2
    u_a = torch.rand(B, generator=g, dtype=torch.float64)
    eps2 = torch.randn(SHAPE, generator=g).double()
    a = torch.floor(u_a * (method.split + 1))
    sa, se = bc(grid_sigma(a - 1)), ref["se"]
    x_fake = ((1 - sa) * ref["x_hat"] + (sa - se) * eps2) / (1 - se)
    x_real = ((1 - sa) * ref["x_tgt"] + (sa - se) * eps2) / (1 - se)
    taps = [c for c in teacher.calls if c[0] == "taps"]
    assert torch.allclose(taps[0][1].double(), x_fake, atol=1e-5)
    assert torch.allclose(taps[1][1].double(), x_real, atol=1e-5)
    assert torch.allclose(taps[0][2].double(), 1000 * grid_sigma(a - 1), atol=1e-3)
    assert torch.equal(taps[0][2], taps[1][2])
    # losses from the fakes' own maths on the hand-computed samples
    with torch.no_grad():
        tf = [teacher.tokens(x_fake.float()) @ w for w in teacher.w]
        tr = [teacher.tokens(x_real.float()) @ w for w in teacher.w]
        lf, lr = disc(tf, (5, 2, 2)), disc(tr, (5, 2, 2))
        l_g = torch.stack([torch.relu(1 - x).mean() for x in lf]).mean()
        proj = lambda tok: teacher.project(tok, torch.zeros(B), SHAPE)  # noqa: E731
        l_fm = torch.stack(
            [(proj(f) - proj(r)).pow(2).mean() for f, r in zip(tf, tr, strict=True)]
        ).mean()
        d_fake = torch.stack([torch.relu(1 + x).mean() for x in lf]).mean()
        d_real = torch.stack([torch.relu(1 - x).mean() for x in lr]).mean()
    cd = pseudo_huber(ref["x_hat"] - ref["x_tgt"]).item()
    assert out["cd"].item() == pytest.approx(cd, rel=1e-4)
    assert out["g"].item() == pytest.approx(l_g.item(), rel=1e-4)
    assert out["fm"].item() == pytest.approx(l_fm.item(), rel=1e-4)
    assert out["loss_g"].item() == pytest.approx(
        cd + 0.1 * (5 * l_g.item() + 10 * l_fm.item()), rel=1e-4
    )
    assert out["d_fake"].item() == pytest.approx(d_fake.item(), rel=1e-4)
    assert out["d_real"].item() == pytest.approx(d_real.item(), rel=1e-4)
    assert out["loss_d"].item() == pytest.approx((d_fake + d_real).item(), rel=1e-4)
    assert all(c[3].tolist() == [DETAIL] * B for c in student.calls)


def test_adv_real_data_is_the_clip_renoised(method: MethodConfig) -> None:
    """method.adv_real='data': the discriminator's real sample is the training clip re-noised
    to sigma_a by eps2, (1 - sigma_a) x0 + sigma_a eps2; the fake and the consistency loss
    are unchanged, and the draws are the same (same x_fake as the reference order)."""
    m = dataclasses.replace(method, adv_real="data")
    out, student, teacher, _ = run_detail(m)
    base, *_ = run_detail(method)
    batch = make_batch()
    ref = expected_consistency(batch, 3, DETAIL, m, student, -0.7)
    g = ref["g"]
    u_a = torch.rand(B, generator=g, dtype=torch.float64)
    eps2 = torch.randn(SHAPE, generator=g).double()
    sa = bc(grid_sigma(torch.floor(u_a * (m.split + 1)) - 1))
    x_real = (1 - sa) * batch["x0"].double() + sa * eps2
    x_fake = ((1 - sa) * ref["x_hat"] + (sa - ref["se"]) * eps2) / (1 - ref["se"])
    taps = [c for c in teacher.calls if c[0] == "taps"]
    assert torch.allclose(taps[1][1].double(), x_real, atol=1e-5)
    assert torch.allclose(taps[0][1].double(), x_fake, atol=1e-5)
    assert out["cd"].item() == pytest.approx(base["cd"].item(), rel=1e-6)
    assert out["d_real"].item() != pytest.approx(base["d_real"].item(), rel=1e-3)


def test_detail_step_pass_counts(method: MethodConfig) -> None:
    _, student, teacher, _ = run_detail(method)
    # Wan: 2 CFG passes + taps on fake + taps on real = 4 (the reference needs 6); 2 student
    assert teacher.count("forward") == 2 and teacher.count("taps") == 2
    assert len(teacher.calls) == 4 and len(student.calls) == 2


def test_detail_step_gradients_are_separated(method: MethodConfig) -> None:
    out, student, teacher, disc = run_detail(method)
    out["loss_g"].backward()
    assert student.s.grad[DETAIL] != 0 and student.q.grad[DETAIL] != 0
    assert student.s.grad[SEMANTIC] == 0
    assert all(p.grad is None for p in disc.parameters())  # loss_g: no grad to the disc
    assert all(p.grad is None for p in teacher.parameters())
    g_student = student.s.grad.clone()
    out["loss_d"].backward()  # after G backward: the separate graph is intact
    assert all(p.grad is not None for p in disc.parameters())
    # (the bias grads cancel exactly: +1/N from fake, -1/N from real with all hinges active)
    assert all(head.weight.grad.abs().sum() > 0 for head in disc.heads)
    assert torch.equal(student.s.grad, g_student)  # loss_d: no grad to the student


def test_adversarial_gradient_flows_through_frozen_teacher(method: MethodConfig) -> None:
    grads = []
    for adv in (0.0, 0.1):
        m = dataclasses.replace(method, adv_weight=adv)
        out, student, _, _ = run_detail(m)
        out["loss_g"].backward()
        grads.append(student.s.grad[DETAIL].item())
    assert grads[0] != pytest.approx(grads[1], rel=1e-3)
    # G and FM parts each reach the student through the teacher's fake taps
    for gen_scale, fm in ((5.0, 0.0), (0.0, 10.0)):
        m = dataclasses.replace(method, gen_scale=gen_scale, fm_weight=fm)
        out, student, _, _ = run_detail(m)
        out["loss_g"].backward()
        assert student.s.grad[DETAIL].item() != pytest.approx(grads[0], rel=1e-4)


def test_detail_step_embedded_and_frozen_teacher_check(method: MethodConfig) -> None:
    m = dataclasses.replace(method, guidance="embedded", split=37, fm_weight=1.0)
    _, _, teacher, _ = run_detail(m)
    assert teacher.count("forward") == 1 and teacher.count("taps") == 2
    assert all(c[3].guidance.tolist() == [6016.0] * B for c in teacher.calls)
    with pytest.raises(ValueError, match="frozen"):
        run_detail(method, teacher=FakeTeacher())


# ---------------------------------------------------------------- real tiny Wan
def test_both_steps_on_real_tiny_wan() -> None:
    import copy

    from diffusers import WanTransformer3DModel

    from dcm.backbones import make_backbone
    from dcm.config import LoraConfig
    from dcm.discriminator import Discriminator
    from dcm.experts import DualExpert

    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=3, rope_max_seq_len=64,
    )  # fmt: skip
    teacher = make_backbone(copy.deepcopy(tr)).requires_grad_(False)
    student = DualExpert(tr)
    method = MethodConfig(disc_hidden=32)
    sch = Schedule.from_config(method)
    g = torch.Generator().manual_seed(0)
    batch = {
        "x0": torch.randn(2, 4, 4, 4, 4, generator=g),  # (B, C, T, H, W), T = 4 > stride 3
        "cond": Cond(text=torch.randn(2, 5, 24, generator=g)),
        "null_cond": Cond(text=torch.zeros(1, 5, 24)),
    }

    out = SemanticStep(sch, method, empty_prompt_prob=0.5)(student, teacher, batch, g)
    assert torch.isfinite(out["loss"]) and out["tc"] > 0
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())

    student.zero_grad(set_to_none=True)
    student.enable_detail_expert(LoraConfig(rank=4, alpha=8.0))
    disc = Discriminator(teacher.num_taps(method.tap_every), teacher.dim, method.disc_hidden)
    out = DetailStep(sch, method)(student, teacher, disc, batch, g)
    assert all(torch.isfinite(out[k]) for k in ("loss_g", "loss_d", "g", "fm", "cd"))
    out["loss_g"].backward()
    trainable = student.trainable_parameters()
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
    before = [p.grad.clone() for p in trainable]
    out["loss_d"].backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(torch.equal(p.grad, b) for p, b in zip(trainable, before, strict=True))


def test_top_share_reaches_the_draw_of_k(method: MethodConfig) -> None:
    """method.top_share moves the student's start noise level to the expert's top index
    (SemE: sigma = 1, the first call of every sample) for that share of the batch."""
    firsts = []
    for share in (0.0, 0.95):
        m = dataclasses.replace(method, top_share=share)
        student = FakeStudent()
        SemanticStep(Schedule.from_config(m), m)(
            student, FakeTeacher(), make_batch(), torch.Generator().manual_seed(11)
        )
        firsts.append(student.calls[0][1])  # (B,) t of the student's pass at x_k
    uniform, top = firsts
    assert float((top == 1000.0).float().mean()) >= 0.75
    assert float((uniform == 1000.0).float().mean()) < float((top == 1000.0).float().mean())
