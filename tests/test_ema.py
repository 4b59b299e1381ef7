"""dcm.ema: the one EMA (consistency target, pretrained teacher)."""

from __future__ import annotations

import pytest
import torch

from dcm.ema import Ema, ema_update, mean_warmup, warmup_decay


def test_ema_update_is_a_lerp_in_the_shadow_dtype():
    shadow = [torch.zeros(3, dtype=torch.float64)]
    ema_update(shadow, [torch.ones(3, dtype=torch.float32, requires_grad=True)], 0.9)
    assert shadow[0].dtype == torch.float64
    assert torch.allclose(shadow[0], torch.full((3,), 0.1, dtype=torch.float64))


def test_warmup_and_applied():
    assert warmup_decay(0.999, 1) == 2 / 11 and warmup_decay(0.5, 1000) == 0.5
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    ema = Ema([lin], decay=0.5, warmup=None)
    with torch.no_grad():
        lin.weight.fill_(4.0)
    ema.update()  # shadow = 0.5 * 0 + 0.5 * 4
    with ema.applied():
        assert torch.equal(lin.weight, torch.full((1, 2), 2.0))
    assert torch.equal(lin.weight, torch.full((1, 2), 4.0))


def test_float32_average_of_named_parameters_applies_and_restores_exactly():
    """train.average_decay's use: a float32 mean over bf16 weights, swapped in for a block."""
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    lin.bias.requires_grad_(False)
    trained = {n: p for n, p in lin.named_parameters() if p.requires_grad}
    ema = Ema(None, 0.999, mean_warmup, named=trained, dtype=torch.float32)
    assert ema.names == ["weight"] and ema.shadow[0].dtype == torch.float32
    seen = [lin.weight.detach().float().clone()]
    for value in (1.0, 2.0, 4.5):
        with torch.no_grad():
            lin.weight.fill_(value)
        seen.append(lin.weight.detach().float().clone())
        ema.update()
    # mean_warmup: decays 1/2, 2/3, 3/4 make the plain mean of the start and three updates
    assert mean_warmup(0.999, 3) == 0.75 and mean_warmup(0.5, 10) == 0.5
    mean = torch.stack(seen).mean(0)
    assert torch.allclose(ema.named()["weight"], mean, atol=1e-6)
    live = lin.weight.detach().clone()
    with ema.applied():
        assert torch.equal(lin.weight, mean.to(torch.bfloat16))
    assert torch.equal(lin.weight, live)  # restored bit for bit, not via the shadow
    # a resumed run gets the same average back; another model's is refused
    other = Ema(None, 0.999, mean_warmup, named=trained, dtype=torch.float32)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict({"updates": 1, "shadow": {"bias": torch.zeros(2)}})
