"""Precision as diffusers intends (issue #14 part 5): the frozen teacher keeps
``_keep_in_fp32_modules`` in float32 under bf16, and artifacts are saved in float32 from the
master weights, not from the bf16 copies a bf16 run trains with (round trip)."""

from __future__ import annotations

import torch
from helpers import tiny_wan

from dcm.backbones.base import cast_keeping_fp32, fp32_modules, make_backbone
from dcm.config import load_config
from dcm.experts import DualExpert


def test_teacher_cast_keeps_diffusers_fp32_modules():
    teacher = make_backbone(tiny_wan())
    keep = fp32_modules(teacher)
    assert "time_embedder" in keep and "scale_shift_table" in keep
    cast_keeping_fp32(teacher, torch.bfloat16, keep)
    tr = teacher.transformer
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tr.scale_shift_table.dtype == torch.float32
    assert tr.blocks[0].scale_shift_table.dtype == torch.float32
    assert next(tr.condition_embedder.time_embedder.parameters()).dtype == torch.float32
    x, cond_text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 24)
    from dcm.backbones import Cond

    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = teacher(x, torch.tensor([500.0]), Cond(text=cond_text))
    assert v.shape == x.shape and torch.isfinite(v.float()).all()


def _bf16_module_with_masters(model: DualExpert) -> dict[str, torch.Tensor]:
    """What a DeepSpeed bf16 run holds: bf16 module weights, fp32 masters of trained ones."""
    masters = {
        n: p.detach().clone().float() + 1e-3  # off the bf16 grid: rounding would show
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masters:
                p.copy_(masters[n])
    model.to(torch.bfloat16)
    return masters


def test_artifacts_are_saved_from_fp32_masters(tmp_path):
    cfg = load_config(overrides=["lora.rank=4", "lora.alpha=8.0"])
    # stage 1: every weight trains; the artifact holds the masters, not their bf16 copies
    sem = DualExpert(tiny_wan())
    masters = _bf16_module_with_masters(sem)
    sem.save_artifact(tmp_path / "sem", cfg, "bundled:shapes", masters)
    back = DualExpert.load_artifact(tmp_path / "sem")
    saved = dict(back.named_parameters())
    assert all(v.dtype == torch.float32 for v in saved.values())
    for name, value in masters.items():
        assert torch.equal(saved[name], value), name
        assert not torch.equal(value.bfloat16().float(), value)  # so bf16 would have lost it

    # stage 2: frozen SemE weights come from the stage-1 file, trained ones from the masters
    det = DualExpert.load_artifact(tmp_path / "sem")
    det.enable_detail_expert(cfg.lora)
    det_masters = _bf16_module_with_masters(det)
    assert all(".lora_" in n or n.startswith("detail_") for n in det_masters)
    det.save_artifact(tmp_path / "det", cfg, "bundled:shapes", det_masters)
    final = dict(DualExpert.load_artifact(tmp_path / "det").named_parameters())
    q = "base.transformer.blocks.0.attn1.to_q"
    assert torch.equal(final[f"{q}.base_layer.weight"], saved[f"{q}.weight"])
    for name, value in det_masters.items():
        assert torch.equal(final[name], value), name
    # loading in bf16 keeps the fp32 modules in fp32
    half = DualExpert.load_artifact(tmp_path / "det", dtype=torch.bfloat16)
    tr = half.base.transformer
    assert tr.scale_shift_table.dtype == torch.float32
    assert tr.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16
