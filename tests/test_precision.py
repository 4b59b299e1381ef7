"""Precision as diffusers intends (issue #14 part 5): the frozen teacher keeps
``_keep_in_fp32_modules`` in float32 under bf16, and artifacts are saved in float32 from the
master weights, not from the bf16 copies a bf16 run trains with (round trip)."""

from __future__ import annotations

import math

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


# DeepSpeed decides whether the caller's autocast is on with torch.is_autocast_enabled(), which
# without an argument asks about CUDA only; on the CPU it answers as on the GPU with this.
_CUDA_LIKE_AUTOCAST = """import torch
_orig = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda *a: _orig(*a) if a else _orig("cpu")
"""


def test_student_engine_trains_under_the_gpu_precision_policy(tmp_path):
    """The GPU policy (DeepSpeed engine config + bf16 autocast), run on the CPU through the
    workers' optimizer_step for both stages: the student keeps float32 weights and the steps
    run. With DeepSpeed's "bf16" section instead, the engine cast the student to bf16 and
    switched autocast off inside its forward: the first step on an H200 raised "Input type
    (float) and bias type (c10::BFloat16) should be the same", and so does this test."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text(_CUDA_LIKE_AUTOCAST)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    out = tmp_path / "distill.json"
    cmd = [sys.executable, str(root / "benchmarks/distill.py"), "--bf16", "--frames", "5",
           "--steps", "1", "--warmup", "1", "--batch", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())
    assert [c["stage"] for c in cases] == ["semantic", "detail"]
    for case in cases:
        assert case["bf16"] is True
        assert case["param_dtypes"] == ["torch.float32"]
        assert all(math.isfinite(v) for v in case["last_losses"].values())
