"""DualExpert: stage-1/2 trainable sets, per-sample routing, artifact round trip, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

import dcm.experts as experts_mod
from dcm.backbones import Cond
from dcm.config import DETAIL, SEMANTIC, Config, LoraConfig
from dcm.experts import ARTIFACT_JSON, ARTIFACT_WEIGHTS, DualExpert

LORA = LoraConfig(rank=4, alpha=8.0)


def tiny_wan() -> WanTransformer3DModel:
    return helpers.tiny_wan(num_layers=2)


def tiny_hunyuan() -> HunyuanVideoTransformer3DModel:
    return helpers.tiny_hunyuan(num_layers=1, single=2)


def batch(kind: str, b: int = 4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 4, 2, 4, 4, generator=g)
    t = torch.linspace(100.0, 990.0, b)
    text = torch.randn(b, 5, 24, generator=g)
    if kind == "wan":
        return x, t, Cond(text)
    mask = torch.ones(b, 5, dtype=torch.long)
    mask[0, 3:] = 0
    return x, t, Cond(text, mask, torch.randn(b, 12, generator=g), torch.full((b,), 6016.0))


def plain(tr, x, t, cond):
    """The unmodified diffusers forward."""
    if isinstance(tr, WanTransformer3DModel):
        return tr(x, t, cond.text, return_dict=False)[0]
    return tr(x, t, cond.text, cond.mask, cond.pooled, cond.guidance, return_dict=False)[0]


def perturb(model: DualExpert) -> None:
    """Move DetE away from SemE (as training would): LoRA B and the copies change."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


BUILDERS = {"wan": tiny_wan, "hunyuanvideo": tiny_hunyuan}


def test_stage1_trains_everything_and_routes_all_rows_to_the_base():
    tr = tiny_wan()
    model = DualExpert(tr)
    assert not model.has_detail
    assert len(model.trainable_parameters()) == len(list(tr.parameters()))
    x, t, cond = batch("wan")
    with torch.no_grad():
        out = model(x, t, cond, torch.tensor([SEMANTIC, DETAIL, DETAIL, SEMANTIC]))
        torch.testing.assert_close(out, plain(tr, x, t, cond), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expert ids"):
        model(x, t, cond, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        model(x, t, cond, torch.tensor([0, 1]))


@pytest.mark.parametrize("kind", ["wan", "hunyuanvideo"])
def test_detail_expert_starts_equal_with_exactly_the_documented_trainable_set(kind):
    tr = BUILDERS[kind]()
    x, t, cond = batch(kind)
    with torch.no_grad():
        ref = plain(tr, x, t, cond)
    model = DualExpert(tr)
    model.enable_detail_expert(LORA)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in names if ".lora_" in n}
    copies = names - lora
    prefix = "base.transformer."
    if kind == "wan":
        assert copies == {
            "detail_params.scale_shift_table",
            *(
                f"detail_modules.{n}"
                for n, _ in tr.condition_embedder.named_parameters(prefix="condition_embedder")
            ),
            "detail_modules.proj_out.weight",
            "detail_modules.proj_out.bias",
        }
        # self AND cross attention of every block, 4 projections each, A and B
        assert len(lora) == 2 * 2 * 4 * 2
        assert {n.split(".")[4] for n in lora} == {"attn1", "attn2"}
    else:
        assert {n.split(".")[1] for n in copies} == {"time_text_embed", "norm_out", "proj_out"}
        scopes = {n[len(prefix) :].split(".")[0] for n in lora}
        assert scopes == {"transformer_blocks", "single_transformer_blocks", "context_embedder"}
        # dual: 4 projections; single (pre-only): 3; refiner: 4 -> x 2 (A, B)
        assert len(lora) == 2 * (1 * 4 + 2 * 3 + 1 * 4)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        det = model(x, t, cond, torch.full((4,), DETAIL))
        sem = model(x, t, cond, torch.full((4,), SEMANTIC))
    torch.testing.assert_close(det, ref, atol=1e-5, rtol=0)  # B = 0: DetE == SemE at start
    torch.testing.assert_close(sem, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["wan", "hunyuanvideo"])
def test_mixed_batch_equals_the_two_pure_batches_row_by_row(kind):
    tr = BUILDERS[kind]()
    x, t, cond = batch(kind)
    with torch.no_grad():
        ref = plain(tr, x, t, cond)
    model = DualExpert(tr)
    model.enable_detail_expert(LORA)
    perturb(model)
    expert = torch.tensor([DETAIL, SEMANTIC, SEMANTIC, DETAIL])
    with torch.no_grad():
        mixed = model(x, t, cond, expert)
        det = model(x, t, cond, torch.full((4,), DETAIL))
        sem = model(x, t, cond, torch.full((4,), SEMANTIC))
    torch.testing.assert_close(sem, ref, atol=1e-5, rtol=0)  # adapters off = the base exactly
    assert (det - sem).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3  # DetE really differs
    for i, e in enumerate(expert.tolist()):
        torch.testing.assert_close(mixed[i], (det if e == DETAIL else sem)[i], atol=1e-5, rtol=0)


def test_backward_through_detail_rows_reaches_exactly_the_trainable_set():
    model = DualExpert(tiny_wan())
    model.enable_detail_expert(LORA)
    perturb(model)
    x, t, cond = batch("wan")
    with torch.no_grad():
        frozen_sem = model(x, t, cond, torch.full((4,), SEMANTIC))
    assert not model(x, t, cond, torch.full((4,), SEMANTIC)).requires_grad  # SemE is frozen
    out = model(x, t, cond, torch.tensor([DETAIL, SEMANTIC, DETAIL, SEMANTIC]))
    out.square().mean().backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # routing must not have changed the trainable set or the SemE weights
    assert {id(p) for p in model.trainable_parameters()} == trainable
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond, torch.full((4,), SEMANTIC)), frozen_sem)


def test_checkpointing_a_mixed_batch_gives_the_same_gradients():
    # Recomputation in backward must see the LoRA state of its own rows, not the last one set.
    model = DualExpert(tiny_wan())
    model.enable_detail_expert(LORA)
    perturb(model)
    x, t, cond = batch("wan")
    expert = torch.tensor([SEMANTIC, DETAIL, SEMANTIC, DETAIL])
    calls = []
    model.base.transformer.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    grads, runs = [], []
    for flag in (False, True):
        calls.clear()
        model.set_checkpointing(flag)
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        model(xg, t, cond, expert).square().mean().backward()
        grads.append([xg.grad] + [p.grad for p in model.trainable_parameters()])
        runs.append(len(calls))
    # each expert's rows run block 0 once forward; checkpointing runs it again in backward
    assert runs[1] == 2 * runs[0] and runs[0] >= 1
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["wan", "hunyuanvideo"])
def test_artifact_round_trip(tmp_path, kind):
    model = DualExpert(BUILDERS[kind]())
    model.enable_detail_expert(LORA)
    perturb(model)
    cfg = Config().replace(**{"method.split": 30})
    folder = model.save_artifact(tmp_path / "art", cfg, "/bundles/teacher")
    assert sorted(p.name for p in folder.iterdir()) == [ARTIFACT_JSON, ARTIFACT_WEIGHTS]
    meta = json.loads((folder / ARTIFACT_JSON).read_text())
    assert meta["schema_version"] == 1 and meta["backbone"] == kind and meta["has_detail"]
    assert meta["method"] == {"shift": 17.0, "grid_points": 50, "split": 30}
    assert meta["lora"]["rank"] == 4 and meta["bundle_path"] == "/bundles/teacher"
    assert meta["transformer_class"] == type(model.base.transformer).__name__
    loaded = DualExpert.load_artifact(folder)
    assert loaded.has_detail and loaded.kind == kind
    x, t, cond = batch(kind)
    expert = torch.tensor([DETAIL, SEMANTIC, DETAIL, SEMANTIC])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, cond, expert), model(x, t, cond, expert), atol=0, rtol=0
        )


def test_failed_save_keeps_the_previous_artifact_and_bf16_load_keeps_fp32_modules(
    tmp_path, monkeypatch
):
    model = DualExpert(tiny_wan())
    folder = model.save_artifact(tmp_path, Config(), "bundled:shapes")
    x, t, cond = batch("wan")
    expert = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        before = model(x, t, cond, expert)
    model.enable_detail_expert(LORA)
    perturb(model)

    def crash(state, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(experts_mod, "save_file", crash)
    with pytest.raises(OSError):
        model.save_artifact(folder, Config(), "bundled:shapes")
    monkeypatch.undo()
    old = DualExpert.load_artifact(folder)
    assert not old.has_detail
    with torch.no_grad():
        torch.testing.assert_close(old(x, t, cond, expert), before, atol=0, rtol=0)

    half = DualExpert.load_artifact(folder, dtype=torch.bfloat16)
    tr = half.base.transformer
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tr.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert tr.scale_shift_table.dtype == torch.float32


def test_bad_artifacts_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a DCM artifact"):
        DualExpert.load_artifact(tmp_path)
    DualExpert(tiny_wan()).save_artifact(tmp_path, Config(), "b")
    meta = json.loads((tmp_path / ARTIFACT_JSON).read_text())
    (tmp_path / ARTIFACT_JSON).write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version"):
        DualExpert.load_artifact(tmp_path)
    # weights of another model under this JSON (an interrupted save between the two renames)
    (tmp_path / ARTIFACT_JSON).write_text(
        json.dumps({**meta, "has_detail": True, "lora": {"rank": 4}})
    )
    with pytest.raises(ValueError, match="does not match"):
        DualExpert.load_artifact(tmp_path)


def _count(transformer) -> tuple[float, float]:
    model = DualExpert(transformer)
    total = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # LoRA layers on meta as well: no memory, no init cost
        model.enable_detail_expert(LoraConfig())
    return total, sum(p.numel() for p in model.trainable_parameters())


def test_parameter_counts_of_the_real_configs_on_meta():
    # METHOD.md section 6: ~120 M of 1.42 B (Wan2.1 1.3B), ~215 M of 12.8 B (HunyuanVideo).
    with torch.device("meta"):
        wan = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )
    total, trainable = _count(wan)
    assert total == pytest.approx(1.42e9, rel=0.05)
    assert trainable == pytest.approx(120e6, rel=0.05)
    with torch.device("meta"):
        hunyuan = HunyuanVideoTransformer3DModel()
    total, trainable = _count(hunyuan)
    assert total == pytest.approx(12.8e9, rel=0.05)
    assert trainable == pytest.approx(215e6, rel=0.05)


def test_exported_weights_replace_the_live_ones_by_name(tmp_path):
    """save_artifact(masters=...): how a checkpoint exports the weight average; a name the
    model does not have is refused rather than silently exporting the live weights."""
    model = DualExpert(tiny_wan())
    model.enable_detail_expert(LORA)
    name, live = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    folder = model.save_artifact(tmp_path / "a", Config(), "b", {name: torch.full_like(live, 0.25)})
    loaded = dict(DualExpert.load_artifact(folder).named_parameters())
    assert torch.equal(loaded[name], torch.full_like(live, 0.25))
    with pytest.raises(ValueError, match="name no parameter"):
        model.save_artifact(tmp_path / "b", Config(), "b", {"detail.nope.weight": live})
