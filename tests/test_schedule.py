"""The shifted grid, the expert split and the sampling lists (METHOD.md sections 2, 3, 7)."""

from __future__ import annotations

import math

import pytest
import torch

from dcm.config import DETAIL, SEMANTIC, SIGMA_PRESETS, ConfigError, MethodConfig, load_config
from dcm.schedule import Schedule, shifted

GOLDEN = {
    0: 0.25758,
    9: 0.80952,
    18: 0.91243,
    25: 0.94850,
    34: 0.97541,
    35: 0.97764,
    37: 0.98176,
    38: 0.98368,
    43: 0.99204,
    49: 1.0,
}


@pytest.fixture
def wan() -> Schedule:
    return Schedule.from_config(MethodConfig())  # s = 17, N = 50, b = 34


@pytest.fixture
def hunyuan() -> Schedule:
    return Schedule.from_config(load_config(preset="hunyuanvideo").method)  # b = 37


def test_golden_grid_values(wan: Schedule) -> None:
    for k, ref in GOLDEN.items():
        assert abs(float(wan.sigmas[k]) - ref) < 1e-5, k
        assert abs(float(wan.sigma(torch.tensor([k]))[0]) - ref) < 1e-5, k
    # closed form sigma_k = 17 (k + 1) / (50 + 16 (k + 1)), exact in float64
    k = torch.arange(50, dtype=torch.float64)
    assert torch.allclose(wan.sigmas, 17 * (k + 1) / (50 + 16 * (k + 1)), atol=1e-15, rtol=0)
    assert wan.sigmas.dtype == torch.float64 and wan.sigmas.shape == (50,)
    assert bool((wan.sigmas[1:] > wan.sigmas[:-1]).all())


def test_sigma_min_and_high_noise_packing(wan: Schedule) -> None:
    assert wan.sigma_min == pytest.approx(17 / 1016, abs=1e-12)
    assert wan.sigma_min == pytest.approx(0.016732, abs=1e-6)
    assert int((wan.sigmas >= 0.975).sum()) == 16


def test_sigma_prev_and_endpoints(wan: Schedule) -> None:
    k = torch.tensor([0, 1, 35, 49])
    prev = wan.sigma_prev(k)
    assert prev.dtype == torch.float32
    assert prev[0].item() == pytest.approx(wan.sigma_min, rel=1e-6)
    assert prev[1].item() == pytest.approx(float(wan.sigmas[0]), rel=1e-6)
    # sigma' == sigma_e exactly (same float32 table) at the first index of each expert
    expert = torch.tensor([SEMANTIC, DETAIL])
    first = torch.tensor([wan.split + 1, 0])
    assert torch.equal(wan.sigma_prev(first), wan.endpoint(expert))
    assert wan.endpoint(expert).tolist() == pytest.approx([0.97541, 0.016732], abs=1e-5)
    assert wan.index_range(SEMANTIC) == (35, 49)
    assert wan.index_range(DETAIL) == (0, 34)
    with pytest.raises(ValueError, match="expert"):
        wan.index_range(2)


def test_sample_indices_uniform_over_indices_mixed_batch(wan: Schedule) -> None:
    gen = torch.Generator().manual_seed(0)
    expert = torch.tensor([SEMANTIC, DETAIL] * 4000)
    k = wan.sample_indices(expert, gen)
    assert k.dtype == torch.long and k.shape == expert.shape
    sem, det = k[expert == SEMANTIC], k[expert == DETAIL]
    assert int(sem.min()) == 35 and int(sem.max()) == 49
    assert int(det.min()) == 0 and int(det.max()) == 34
    # uniform over INDICES: every index of the range appears at about the same rate
    counts = torch.bincount(det, minlength=35).double()
    assert float(counts.min()) > 0.6 * 4000 / 35 and float(counts.max()) < 1.4 * 4000 / 35
    # same seed, same draws; exactly B uniforms consumed
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    k7 = wan.sample_indices(expert[:7], g1)
    u = torch.rand(7, generator=g2, dtype=torch.float64)  # the one call it makes
    lo = torch.where(expert[:7] == SEMANTIC, 35, 0)
    count = torch.where(expert[:7] == SEMANTIC, 15, 35)
    assert torch.equal(k7, lo + torch.floor(u * count).long())
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_route_float32_vs_bf16(wan: Schedule) -> None:
    sig = wan.sigmas.to(torch.float32)
    expert = wan.route(sig)
    assert expert.dtype == torch.long
    assert expert[:35].eq(DETAIL).all() and expert[35:].eq(SEMANTIC).all()
    # METHOD.md section 1: bf16 rounds t = 977.64 (sigma_35) to 976, and sigma_b = sigma_34
    # (t = 975.41) to 976 as well, so a bf16 comparison sends the SemE point 35 to DetE.
    t35 = 1000 * float(wan.sigmas[35])
    assert t35 == pytest.approx(977.64, abs=5e-3)
    assert torch.tensor(t35).bfloat16().item() == 976.0
    t_b = torch.tensor(1000 * wan.sigma_split).bfloat16()
    assert not bool(torch.tensor(t35).bfloat16() > t_b)  # bf16 misroutes
    assert wan.route(torch.tensor([float(wan.sigmas[35])])).item() == SEMANTIC  # float32 right
    # same in sigma units: bf16(sigma_35) == bf16(sigma_34)
    assert torch.equal(sig[35:36].bfloat16(), sig[34:35].bfloat16())
    assert torch.tensor(981.76).bfloat16().item() == 980.0


def test_hunyuan_reference_four_steps(hunyuan: Schedule) -> None:
    sig = hunyuan.sampling_sigmas(4)
    assert len(sig) == 5 and sig[-1] == 0.0
    ref = [(1.0, 3), (0.992, 3), (0.9818, 4), (0.9124, 4)]  # (value, digits the reference kept)
    for got, (r, digits) in zip(sig[:-1], ref, strict=True):
        assert round(got, digits) == pytest.approx(r, abs=1e-12)
    assert hunyuan.route(torch.tensor(sig[:-1])).tolist() == [SEMANTIC, SEMANTIC, DETAIL, DETAIL]
    assert sig[2] == hunyuan.sigma_split  # the DetE sub-trajectory starts at sigma_b


def test_presets_route_by_their_bar(wan: Schedule, hunyuan: Schedule) -> None:
    h = hunyuan.sampling_sigmas(4, "hunyuan-4")
    # 0.9818 is sigma_37 = 0.981763 rounded up: unsnapped it would route to SemE
    assert hunyuan.sigma_split < 0.9818
    assert hunyuan.route(torch.tensor([0.9818])).item() == SEMANTIC
    assert h[2] == hunyuan.sigma_split
    assert hunyuan.route(torch.tensor(h[:-1])).tolist() == [0, 0, 1, 1]
    w = wan.sampling_sigmas(6, "wan-6")
    assert w[:-1] == list(SIGMA_PRESETS["wan-6"]) and w[-1] == 0.0
    assert wan.route(torch.tensor(w[:-1])).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="sigma_preset"):
        wan.sampling_sigmas(4, "wan-6")
    with pytest.raises(ConfigError, match="unknown"):
        wan.sampling_sigmas(4, "nope")


@pytest.mark.parametrize("b", [0, 1, 17, 34, 37, 47, 48])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 16, 60, 101])
def test_even_split_any_n_any_b(n: int, b: int) -> None:
    sch = Schedule(shift=17.0, grid_points=50, split=b)
    sig = sch.sampling_sigmas(n)
    assert len(sig) == n + 1 and sig[0] == 1.0 and sig[-1] == 0.0
    assert all(y < x for x, y in zip(sig, sig[1:], strict=False))
    experts = sch.route(torch.tensor(sig[:-1])).tolist()
    n_sem = math.ceil(n / 2)
    assert experts == [SEMANTIC] * n_sem + [DETAIL] * (n - n_sem)
    assert sig[n_sem] == sch.sigma_split  # DetE always starts at sigma_b


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_other_step_shares_route_k_steps_to_the_semantic_expert(n: int) -> None:
    sch = Schedule(shift=3.0, grid_points=10, split=6)
    for k in range(1, n):
        sig = sch.sampling_sigmas(n, semantic_steps=k)
        assert len(sig) == n + 1 and sig[0] == 1.0 and sig[-1] == 0.0
        assert all(y < x for x, y in zip(sig, sig[1:], strict=False))
        assert sch.route(torch.tensor(sig[:-1])).tolist() == [SEMANTIC] * k + [DETAIL] * (n - k)
        assert sig[k] == sch.sigma_split
    assert sch.sampling_sigmas(n, semantic_steps=(n + 1) // 2) == sch.sampling_sigmas(n)
    for bad in (n, -1):
        with pytest.raises(ConfigError, match=f"semantic_steps={bad} must lie in 1..{n - 1}"):
            sch.sampling_sigmas(n, semantic_steps=bad)


def test_even_split_uniform_in_index() -> None:
    sch = Schedule(shift=17.0, grid_points=50, split=34)
    grid = sch.sigmas.tolist()
    sig = sch.sampling_sigmas(6)
    # SemE: 49, 44, 39 (step 15/3 = 5); DetE: 34, 22.33 -> 22, 10.67 -> 11 (step 35/3)
    assert sig[:-1] == [grid[i] for i in (49, 44, 39, 34, 22, 11)]
    # more steps than grid points: fractional positions on the continuous curve
    sch = Schedule(shift=17.0, grid_points=50, split=47)
    sig = sch.sampling_sigmas(8)  # SemE: 4 steps over 2 indices -> 49, 48.5, 48, 47.5
    assert sig[:4] == pytest.approx([shifted((p + 1) / 50, 17.0) for p in (49, 48.5, 48, 47.5)])


def test_teacher_sigmas(wan: Schedule) -> None:
    sig = wan.teacher_sigmas()
    assert len(sig) == 51 and sig[-1] == 0.0
    assert sig[:-1] == wan.sigmas.flip(0).tolist()
    sig10 = wan.teacher_sigmas(10)
    assert sig10 == pytest.approx(
        [17 * (i / 10) / (1 + 16 * i / 10) for i in range(10, 0, -1)] + [0.0]
    )


def test_bad_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="split"):
        Schedule(shift=17.0, grid_points=50, split=49)
    with pytest.raises(ConfigError, match="steps"):
        Schedule(shift=17.0, grid_points=50, split=34).sampling_sigmas(1)


def test_single_expert_split_owns_the_whole_grid():
    """b = -1: the ablation's single consistency model (sigma_{-1} = sigma_min)."""
    sch = Schedule(shift=17.0, grid_points=50, split=-1)
    assert sch.single_expert and sch.sigma_split == sch.sigma_min
    assert sch.index_range(SEMANTIC) == (0, 49)
    k = sch.sample_indices(torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert int(k.min()) == 0 and int(k.max()) == 49
    # the consistency endpoint is sigma_min, which equals sigma_prev(0): x_tgt = x_prev there
    assert float(sch.endpoint(torch.zeros(1, dtype=torch.long))) == float(
        sch.sigma_prev(torch.zeros(1, dtype=torch.long))
    )
    for n in (2, 3, 4, 8):
        sig = sch.sampling_sigmas(n)
        assert len(sig) == n + 1 and sig[0] == 1.0 and sig[-1] == 0.0
        assert sch.route(torch.tensor(sig[:-1])).tolist() == [SEMANTIC] * n
    with pytest.raises(ConfigError, match="no detail expert"):
        sch.sample_indices(torch.ones(2, dtype=torch.long), torch.Generator())
    with pytest.raises(ConfigError, match="or be -1"):
        Schedule(shift=17.0, grid_points=50, split=-2)


def test_semantic_head_closes_a_list_at_the_split() -> None:
    # the SemE's share of a sampling list, ending on sigma_b where the DetE takes over
    sch = Schedule.from_config(MethodConfig(grid_points=10, split=6))
    for n in (2, 4, 6):
        lst = sch.sampling_sigmas(n)
        head = sch.semantic_head(lst)
        assert head == lst[: (n + 1) // 2 + 1]  # the SemE's steps plus sigma_b
        assert head[-1] == sch.sigma_split and all(s > sch.sigma_split for s in head[:-1])
    teacher = sch.semantic_head(sch.teacher_sigmas(50))
    assert teacher[0] == 1.0 and teacher[-1] == sch.sigma_split and len(teacher) == 16


def test_top_share_moves_draws_to_each_experts_top_index():
    """method.top_share: p of the draws start at the expert's top index (DetE: sigma_b, the
    one jump of a 2-step sample), the rest stays uniform; the draw count is unchanged."""
    sch = Schedule(shift=5.0, grid_points=10, split=6)
    expert = torch.tensor([DETAIL, SEMANTIC] * 20000)
    plain = sch.sample_indices(expert, torch.Generator().manual_seed(3))
    same = sch.sample_indices(expert, torch.Generator().manual_seed(3), 0.0)
    assert torch.equal(plain, same)  # p = 0 is the reference draw, bit for bit
    g = torch.Generator().manual_seed(3)
    k = sch.sample_indices(expert, g, 0.3)
    det, sem = k[expert == DETAIL], k[expert == SEMANTIC]
    assert int(det.min()) == 0 and int(det.max()) == 6  # still inside each expert's range
    assert int(sem.min()) == 7 and int(sem.max()) == 9
    share = [float((det == j).float().mean()) for j in range(7)]
    assert share[6] == pytest.approx(0.3 + 0.7 / 7, abs=0.01)
    assert all(s == pytest.approx(0.7 / 7, abs=0.01) for s in share[:6])
    assert float((sem == 9).float().mean()) == pytest.approx(0.3 + 0.7 / 3, abs=0.01)
    # the same number of uniforms is drawn: the next draw matches the plain path's
    g0 = torch.Generator().manual_seed(3)
    sch.sample_indices(expert, g0)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=g0))
