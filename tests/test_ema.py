"""dcm.ema: the one EMA (consistency target, pretrained teacher)."""

from __future__ import annotations

import torch

from dcm.ema import Ema, ema_update, warmup_decay


def test_ema_update_is_a_lerp_in_the_shadow_dtype():
    shadow = [torch.zeros(3, dtype=torch.float64)]
    ema_update(shadow, [torch.ones(3, dtype=torch.float32, requires_grad=True)], 0.9)
    assert shadow[0].dtype == torch.float64
    assert torch.allclose(shadow[0], torch.full((3,), 0.1, dtype=torch.float64))


def test_warmup_and_swap():
    assert warmup_decay(0.999, 1) == 2 / 11 and warmup_decay(0.5, 1000) == 0.5
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    ema = Ema([lin], decay=0.5, warmup=False)
    with torch.no_grad():
        lin.weight.fill_(4.0)
    ema.update()  # shadow = 0.5 * 0 + 0.5 * 4
    ema.swap()
    assert torch.equal(lin.weight, torch.full((1, 2), 2.0))
    ema.swap()
    assert torch.equal(lin.weight, torch.full((1, 2), 4.0))
