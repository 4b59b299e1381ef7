"""Hand-computed values and gradient flow of the DCM losses (METHOD.md sections 4-6)."""

from __future__ import annotations

import math

import pytest
import torch

from dcm.config import ConfigError
from dcm.losses import (
    ConsistencyLoss,
    FeatureMatchingLoss,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    TemporalCoherenceLoss,
)


def test_pseudo_huber_hand_values() -> None:
    pred = torch.tensor([0.0, 3e-3, -4e-3, 1.0], requires_grad=True)
    target = torch.zeros(4)
    c = 1e-3
    expected = (
        0.0
        + (math.sqrt(9e-6 + 1e-6) - 1e-3)
        + (math.sqrt(16e-6 + 1e-6) - 1e-3)
        + (math.sqrt(1.0 + 1e-6) - 1e-3)
    ) / 4
    loss = ConsistencyLoss("pseudo_huber", c)(pred, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dd of sqrt(d^2 + c^2) = d / sqrt(d^2 + c^2), / 4 for the mean
    d = pred.detach().double()
    assert torch.allclose(pred.grad.double(), d / torch.sqrt(d**2 + c**2) / 4, rtol=1e-5)
    # a large c makes it L2 / (2c); a tiny c makes it L1
    big = ConsistencyLoss("pseudo_huber", 10.0)(torch.tensor([0.01]), torch.zeros(1))
    assert big.item() == pytest.approx(0.01**2 / 20, rel=1e-3)


def test_l2_hand_values() -> None:
    loss = ConsistencyLoss("l2")(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.zeros(2, 2))
    assert loss.item() == pytest.approx((1 + 4 + 0.25) / 4)
    with pytest.raises(ConfigError, match="consistency_loss"):
        ConsistencyLoss("l1")


def test_temporal_coherence_hand_values() -> None:
    a = torch.tensor([0.0, 1.0, 3.0, 6.0]).view(1, 1, 4, 1, 1).requires_grad_()
    b = torch.zeros(1, 1, 4, 1, 1)
    assert TemporalCoherenceLoss(3)(a, b).item() == pytest.approx(36.0)  # D(a) = [6 - 0]
    loss = TemporalCoherenceLoss(1)(a, b)  # D(a) = [1, 2, 3]
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)
    loss.backward()
    # d/da of mean((a[t+1] - a[t])^2): 2/3 * (-1, 1 - 2, 2 - 3, 3)
    assert a.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, -2 / 3, 2.0])
    # identical frame differences -> 0 (a constant offset per frame pair cancels)
    assert TemporalCoherenceLoss(2)(a.detach() + 5.0, a.detach()).item() == 0.0


def test_temporal_coherence_zero_when_too_few_frames() -> None:
    a = torch.randn(2, 3, 3, 4, 4, requires_grad=True)
    loss = TemporalCoherenceLoss(3)(a, torch.randn(2, 3, 3, 4, 4))
    assert loss.item() == 0.0
    loss.backward()  # stays in the graph, so a summed loss still backpropagates
    assert a.grad is not None and a.grad.abs().sum().item() == 0.0


def test_hinge_losses_hand_values_two_heads() -> None:
    fake = [torch.tensor([-2.0, 0.0, 0.5]), torch.tensor([[1.0, -1.0]])]
    real = [torch.tensor([2.0, 0.5]), torch.tensor([[0.0, -3.0]])]
    loss, f, r = HingeDiscriminatorLoss()(fake, real)
    f_heads = [(0 + 1 + 1.5) / 3, (2 + 0) / 2]  # relu(1 + D(fake))
    r_heads = [(0 + 0.5) / 2, (1 + 4) / 2]  # relu(1 - D(real))
    assert f.item() == pytest.approx(sum(f_heads) / 2)
    assert r.item() == pytest.approx(sum(r_heads) / 2)
    assert loss.item() == pytest.approx(sum(f_heads) / 2 + sum(r_heads) / 2)
    g = HingeGeneratorLoss()(fake)  # relu(1 - D(fake))
    assert g.item() == pytest.approx(((3 + 1 + 0.5) / 3 + (0 + 2) / 2) / 2)
    with pytest.raises(ValueError, match="heads"):
        HingeGeneratorLoss()([])


def test_hinge_gradients() -> None:
    fake = torch.tensor([-2.0, 0.0, 0.5], requires_grad=True)
    real = torch.tensor([2.0, 0.5], requires_grad=True)
    HingeDiscriminatorLoss()([fake], [real])[0].backward()
    assert fake.grad.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3])  # inactive below -1
    assert real.grad.tolist() == pytest.approx([0.0, -1 / 2])  # inactive above 1
    fake.grad = None
    HingeGeneratorLoss()([fake]).backward()
    assert fake.grad.tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3])


def test_feature_matching_projection_and_grad() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 6)  # tokens D = 4 -> C = 6 per token
    project = lambda tok: (tok @ weight).transpose(1, 2).reshape(tok.shape[0], 6, 1, 2, 3)  # noqa: E731
    fake = [torch.randn(2, 6, 4, requires_grad=True) for _ in range(3)]
    real = [torch.randn(2, 6, 4) for _ in range(3)]
    loss = FeatureMatchingLoss()(fake, real, project)
    expected = (
        sum(((f.detach() - r) @ weight).pow(2).mean() for f, r in zip(fake, real, strict=True)) / 3
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fake)
    assert FeatureMatchingLoss()(real, real, project).item() == 0.0
    with pytest.raises(ValueError, match="taps"):
        FeatureMatchingLoss()(fake, real[:2], project)
