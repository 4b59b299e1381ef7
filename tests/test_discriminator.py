"""Discriminator heads over teacher taps: derived token grid, per-frame heads, clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_wan

from dcm.backbones import Cond, make_backbone
from dcm.discriminator import Discriminator


@pytest.fixture(scope="module")
def teacher():
    tr = tiny_wan(num_layers=4)
    return make_backbone(tr).requires_grad_(False)


@pytest.mark.parametrize("frames,height,width", [(1, 8, 8), (3, 8, 8), (1, 6, 12), (3, 6, 12)])
def test_heads_follow_the_latent_shape(teacher, frames, height, width):
    x = torch.randn(2, 4, frames, height, width, requires_grad=True)
    _, taps = teacher.forward_with_taps(
        x, torch.tensor([900.0, 300.0]), Cond(torch.randn(2, 3, 24))
    )
    grid = teacher.token_grid(x.shape)
    disc = Discriminator(teacher.num_taps(2), teacher.dim, hidden=32)
    logits = disc(taps, grid)
    assert len(logits) == len(taps) == 2
    assert all(lg.shape == (2, frames * (height // 2) * (width // 2)) for lg in logits)
    # the generator's gradient reaches the latents through the frozen teacher's features
    sum(lg.mean() for lg in logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


def test_each_latent_frame_is_its_own_image():
    # GroupNorm statistics are per (sample, latent frame): changing frame 1 leaves frame 0's
    # logits unchanged and changes its own.
    torch.manual_seed(1)
    disc = Discriminator(num_taps=1, dim=16, hidden=32)
    grid = (2, 3, 4)
    tokens = torch.randn(1, 24, 16)
    edited = tokens.clone()
    edited[:, 12:] = torch.randn(1, 12, 16)  # tokens of frame 1 (order T', h, w)
    with torch.no_grad():
        a, b = disc([tokens], grid)[0], disc([edited], grid)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_wrong_shapes_are_clear_errors():
    disc = Discriminator(num_taps=2, dim=16, hidden=32)
    good = torch.randn(1, 24, 16)
    with pytest.raises(ValueError, match=r"tap 1 has shape \(1, 20, 16\).*token grid 2x3x4"):
        disc([good, torch.randn(1, 20, 16)], (2, 3, 4))
    with pytest.raises(ValueError, match="dim 16"):
        disc([good, torch.randn(1, 24, 8)], (2, 3, 4))
    with pytest.raises(ValueError, match="2 heads but got 1 taps"):
        disc([good], (2, 3, 4))
    with pytest.raises(ValueError, match="multiple of 32"):
        Discriminator(num_taps=1, dim=16, hidden=48)
