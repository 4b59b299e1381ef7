"""Backbone adapters: parity with the plain diffusers forward, taps, projection, grid."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_hunyuan, tiny_wan

from dcm.backbones import Cond, HunyuanVideoBackbone, WanBackbone, make_backbone


def hunyuan_cond(b: int = 2, length: int = 7) -> Cond:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, 4:] = 0  # one padded prompt: exercises the refiner and joint attention masks
    return Cond(
        text=torch.randn(b, length, 24, generator=g),
        mask=mask,
        pooled=torch.randn(b, 12, generator=g),
        guidance=torch.full((b,), 6016.0),
    )


def _inputs(shape=(2, 4, 3, 8, 8)):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    t = torch.tensor([977.64, 137.5] * (shape[0] // 2), dtype=torch.float32)
    return x, t


def _block_outputs(blocks, pick) -> tuple[list, list]:
    seen, hooks = [], []
    for blk in blocks:
        hooks.append(blk.register_forward_hook(lambda m, i, o: seen.append(pick(o))))
    return seen, hooks


@pytest.mark.parametrize("shape", [(2, 4, 3, 8, 8), (2, 4, 2, 6, 10)])
def test_wan_parity_taps_and_projection(shape):
    tr = tiny_wan()
    bb = make_backbone(tr)
    assert isinstance(bb, WanBackbone) and bb.kind == "wan"
    x, t = _inputs(shape)
    cond = Cond(text=torch.randn(2, 5, 24))
    seen, hooks = _block_outputs(tr.blocks, lambda o: o)
    with torch.no_grad():
        ref = tr(x, t, cond.text, return_dict=False)[0]
        for h in hooks:
            h.remove()
        v = bb(x, t, cond)
        v2, taps = bb.forward_with_taps(x, t, cond, every=2)
        v_proj = bb.project(taps[-1], t, x.shape)
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, ref, atol=1e-5, rtol=0)
    grid = bb.token_grid(x.shape)
    assert grid == (shape[2], shape[3] // 2, shape[4] // 2)
    assert len(taps) == 2 == bb.num_taps(2)  # blocks 0 and 2 of 3
    for tap, blk_out in zip(taps, (seen[0], seen[2]), strict=True):
        assert tap.shape == (2, grid[0] * grid[1] * grid[2], bb.dim)
        torch.testing.assert_close(tap, blk_out, atol=1e-6, rtol=0)
    # the last block is tapped here, so its projection is the velocity itself
    torch.testing.assert_close(v_proj, ref, atol=1e-5, rtol=0)


def test_hunyuan_parity_taps_and_projection():
    tr = tiny_hunyuan(single=3)
    bb = make_backbone(tr)
    assert isinstance(bb, HunyuanVideoBackbone) and bb.kind == "hunyuanvideo"
    x, t = _inputs()
    cond = hunyuan_cond()
    seen, hooks = _block_outputs(tr.single_transformer_blocks, lambda o: o[0])
    with torch.no_grad():
        ref = tr(x, t, cond.text, cond.mask, cond.pooled, cond.guidance, return_dict=False)[0]
        for h in hooks:
            h.remove()
        v = bb(x, t, cond)
        _, taps = bb.forward_with_taps(x, t, cond, every=2)
        v_proj = bb.project(taps[-1], t, x.shape, cond)
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=0)
    grid = bb.token_grid(x.shape)
    assert len(taps) == 2 == bb.num_taps(2)
    for tap, blk_out in zip(taps, (seen[0], seen[2]), strict=True):
        # image tokens only: the text tokens of the single-stream sequence are stripped
        assert tap.shape == (2, grid[0] * grid[1] * grid[2], bb.dim)
        torch.testing.assert_close(tap, blk_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(v_proj, ref, atol=1e-5, rtol=0)
    # the padded prompt matters: dropping the mask changes that sample's velocity
    with torch.no_grad():
        unmasked = bb(x, t, Cond(cond.text, None, cond.pooled, cond.guidance))
    assert (unmasked[1] - v[1]).abs().max() > 1e-4


def test_hunyuan_missing_conditioning_is_a_clear_error():
    bb = make_backbone(tiny_hunyuan(single=1))
    x, t = _inputs()
    cond = hunyuan_cond()
    with pytest.raises(ValueError, match="cond.guidance"):
        bb(x, t, Cond(cond.text, cond.mask, cond.pooled, None))
    with pytest.raises(ValueError, match="cond.pooled"):
        bb.project(torch.zeros(2, 48, bb.dim), t, x.shape)


@pytest.mark.parametrize("every,expected", [(1, 5), (2, 3), (3, 2), (5, 1)])
def test_tap_count_follows_every(every, expected):
    bb = make_backbone(tiny_wan(num_layers=5))
    x, t = _inputs((2, 4, 1, 4, 4))
    with torch.no_grad():
        _, taps = bb.forward_with_taps(x, t, Cond(torch.randn(2, 3, 24)), every=every)
    assert len(taps) == expected == bb.num_taps(every)


def test_token_grid_and_shape_errors():
    bb = make_backbone(tiny_wan())
    assert bb.token_grid((16, 21, 60, 104)) == (21, 30, 52)  # Wan 480x832 latents
    with pytest.raises(ValueError, match="not divisible"):
        bb.token_grid((2, 4, 3, 7, 8))
    with pytest.raises(ValueError, match="do not match"):
        bb.project(torch.zeros(2, 10, bb.dim), torch.ones(2), (2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bb(torch.zeros(2, 4, 1, 4, 4), torch.ones(3), Cond(torch.zeros(2, 3, 24)))
    with pytest.raises(ValueError, match="no backbone adapter"):
        make_backbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("build", [tiny_wan, tiny_hunyuan])
def test_timestep_reaches_the_embedder_in_float32_from_a_bf16_model(build):
    # METHOD.md section 1: bf16 would turn 977.64 into 976 and 981.76 into 980. With bf16
    # latents and weights, the time embedder must still get the float32 timesteps exactly.
    tr = build().to(torch.bfloat16)
    bb = make_backbone(tr)
    x, _ = _inputs()
    t32 = torch.tensor([977.64, 981.76])
    if bb.kind == "wan":
        cond, embedder = Cond(torch.randn(2, 3, 24)), tr.condition_embedder
    else:
        cond, embedder = hunyuan_cond(), tr.time_text_embed
    seen = []
    embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        bb(x.bfloat16(), t32.double(), cond.to(dtype=torch.bfloat16))
    assert seen and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], t32)  # not bf16's 976 / 980


def test_cond_index_cat_to():
    c = hunyuan_cond(b=3)
    rows = c.index(torch.tensor([2, 0]))
    assert rows.text.shape[0] == 2 and torch.equal(rows.mask[0], c.mask[2])
    back = Cond.cat([c.index(slice(0, 1)), c.index(slice(1, 3))])
    assert all(torch.equal(getattr(back, k), getattr(c, k)) for k in ("text", "mask", "pooled"))
    half = c.to(dtype=torch.bfloat16)
    assert half.text.dtype == torch.bfloat16 and half.mask.dtype == torch.long
    assert half.guidance.dtype == torch.float32
    with pytest.raises(ValueError, match="guidance"):
        Cond.cat([c, Cond(c.text, c.mask, c.pooled, None)])


@pytest.mark.parametrize("build", [tiny_wan, tiny_hunyuan])
def test_activation_checkpointing_gives_the_same_gradients(build):
    tr = build()
    bb = make_backbone(tr)
    x, t = _inputs((2, 4, 2, 4, 4))
    cond = hunyuan_cond() if bb.kind == "hunyuanvideo" else Cond(torch.randn(2, 5, 24))
    blocks = tr.blocks if bb.kind == "wan" else tr.single_transformer_blocks
    calls = []
    blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    grads, runs = [], []
    for flag in (False, True):
        calls.clear()
        bb.set_checkpointing(flag)
        tr.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        v, taps = bb.forward_with_taps(xg, t, cond)
        (v.square().mean() + taps[0].square().mean()).backward()
        grads.append([xg.grad] + [p.grad for p in tr.parameters()])
        runs.append(len(calls))
    assert runs == [1, 2]  # checkpointing really recomputed the block in backward
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
