"""Validation during distillation: quality curves from step 0, checkpoints chosen by quality.

- the validator's teacher reference is the teacher on its own scheduler, the very video
  ``dcm generate --teacher`` makes from the same seed; free-text prompts score PSNR to it;
- ``record_selection`` tags the MLflow run with how the checkpoint was chosen and flags a
  run whose final student does not beat step 0 (tag + warning line + return value);
- that a real shapes-world distillation (Ray Train + DeepSpeed) logs ``val/score`` from step
  0 on and exports the checkpoint with the best ``val/score`` is checked on the shared
  ``both`` run of tests/test_distill.py (same run, no second distillation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bundle

from dcm.config import load_config
from pipelines.tracking import RunLogger, Tracker
from pipelines.train_loop import (
    ValidationInputs,
    Validator,
    record_selection,
    step0_verdict,
    validation_metric,
)

FREE_TEXT = ["a dog runs along a beach", "clouds over the hills"]


def _val_inputs(bundle: Path, captions: list[str], cfg) -> ValidationInputs:
    """What pipelines.distill.validation_inputs hands the workers, for ``captions``."""
    from dcm.bundle import load_bundle

    enc = load_bundle(
        bundle, components=("text_encoder",), text_max_length=cfg.model.text_max_length
    )
    cond, null = enc.encode_text(captions), enc.encode_text([""])
    d = cfg.data
    vae = load_bundle(bundle, components=("vae",))
    return ValidationInputs(
        captions,
        cond.text.numpy(),
        cond.mask.numpy(),
        null.text.numpy(),
        null.mask.numpy(),
        tuple(vae.latent_shape(d.num_frames, d.height, d.width)),
    )


@pytest.mark.timeout(300)
def test_free_text_validation_scores_psnr_to_the_fair_teacher(tmp_path_factory):
    from dcm.backbones.base import make_backbone
    from dcm.bundle import load_bundle
    from dcm.experts import DualExpert
    from dcm.generate import VideoGenerator

    bundle = tiny_bundle(tmp_path_factory)
    cfg = load_config(
        None, "shapes-tiny",
        [f"model.path={bundle}", "sample.steps=2", "sample.eval_steps=[2]",
         "sample.teacher_steps=3", "sample.seeds=[0, 1]"],
    )  # fmt: skip
    val = _val_inputs(bundle, FREE_TEXT, cfg)
    validator = Validator(cfg, val, torch.device("cpu"), rank=0)
    assert not validator.shapes_world
    teacher = make_backbone(load_bundle(bundle, components=("transformer",)).transformer).eval()
    student = DualExpert(teacher).eval()
    metrics = validator(student, teacher, 0, RunLogger())
    assert metrics["val/score"] == metrics["val/psnr"] == metrics["val/psnr_2steps"]
    assert 0 < metrics["val/psnr"] < 100 and 0 < metrics["val/ssim"] <= 1
    # the reference is exactly what `dcm generate --teacher` makes from the same seed
    gen = VideoGenerator.load(str(bundle), cfg=cfg)
    for seed in (0, 1):
        ref = gen.generate(FREE_TEXT, seed=seed, teacher=True, teacher_steps=3)
        np.testing.assert_array_equal(validator.teacher_video(seed, teacher), ref)
    text = validation_metric(cfg, FREE_TEXT)
    assert text.startswith("PSNR dB of decoded frames to the teacher, FlowMatchEuler shift 3.0")
    assert validation_metric(cfg, ["a red circle moves left on a plain background"]).startswith(
        "shapes summary"
    )


def test_validation_samples_with_the_configured_renoise(tmp_path_factory):
    from dcm.backbones.base import make_backbone
    from dcm.bundle import load_bundle
    from dcm.experts import DualExpert

    bundle = tiny_bundle(tmp_path_factory)
    teacher = make_backbone(load_bundle(bundle, components=("transformer",)).transformer).eval()
    student = DualExpert(teacher).eval()
    scores = {}
    for renoise in (0.0, 1.0):
        cfg = load_config(
            None, "shapes-tiny",
            [f"model.path={bundle}", "sample.steps=4", "sample.eval_steps=[2, 4]",
             "sample.teacher_steps=3", f"sample.renoise={renoise}"],
        )  # fmt: skip
        validator = Validator(cfg, _val_inputs(bundle, FREE_TEXT, cfg), torch.device("cpu"), 0)
        scores[renoise] = validator(student, teacher, 0, RunLogger())
    # 2 steps end each expert's step at its endpoint: nothing to re-noise; 4 steps differ
    assert scores[0.0]["val/psnr_2steps"] == scores[1.0]["val/psnr_2steps"]
    assert scores[0.0]["val/psnr_4steps"] != scores[1.0]["val/psnr_4steps"]


def test_a_student_that_never_beats_step0_is_flagged(tmp_path, caplog):
    from mlflow import MlflowClient

    cfg = load_config(None, "shapes-tiny", [f"train.out={tmp_path}", "train.run_name=flag"])
    tracker = Tracker(cfg, tmp_path)
    logger = tracker.open_run("semantic")
    captions = ["a red circle moves left on a plain background"]
    assert step0_verdict({"val/score": 0.30}, 0.31) == {
        "val/score_step0": 0.31, "val/beats_step0": 0.0,
    }  # fmt: skip
    final = {"val/score": 0.30, **step0_verdict({"val/score": 0.30}, 0.31)}
    with caplog.at_level(logging.WARNING, logger="pipelines.train_loop"):
        assert record_selection(logger, cfg, "semantic", captions, final, {"step": 2}) is False
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "does not beat the untrained student's 0.3100" in warned[0].message
    tags = MlflowClient(tracking_uri=tracker.uri).get_run(logger.run_id).data.tags
    assert tags["dcm_beats_step0"] == "false" and "step 0" in tags["dcm_quality_flag"]
    assert tags["dcm_selection_metric"] == "val/score" and tags["dcm_best_step"] == "2"
    assert tags["dcm_val_score"].startswith("shapes summary")
    better = {"val/score": 0.5, **step0_verdict({"val/score": 0.5}, 0.31)}
    caplog.clear()
    assert record_selection(RunLogger(), cfg, "semantic", captions, better, {"step": 3}) is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_train_controller_unpickles_the_stage_without_the_model_stack(tmp_path):
    """Ray's Train controller unpickles the per-worker function and its config; from
    ``pipelines.worker_entry`` and plain dicts that imports none of the model stack (about
    5 s of CPU per fit on 2 cores), while the worker still gets back the same settings."""
    import pickle
    import subprocess
    import sys

    import cloudpickle

    from pipelines.train_loop import StageSettings
    from pipelines.worker_entry import distill_worker

    cfg = load_config(preset="shapes-tiny")
    val = ValidationInputs(
        ["a red ball"], np.ones((1, 4, 8), np.float32), np.ones((1, 4), bool),
        np.zeros((1, 4, 8), np.float32), np.ones((1, 4), bool), (8, 2, 4, 4),
    )  # fmt: skip
    settings = StageSettings(cfg, "detail", val, logger=RunLogger("sqlite:///x.db", "r1"))
    blob = tmp_path / "fit.pkl"
    blob.write_bytes(cloudpickle.dumps((distill_worker, settings.loop_config())))
    probe = (
        "import pickle, sys; fn, config = pickle.load(open(sys.argv[1], 'rb')); "
        "print(fn.__module__, sorted(m for m in ('torch', 'transformers', 'peft', 'diffusers') "
        "if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", probe, str(blob)], cwd=root, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    assert out == ["pipelines.worker_entry", "[]"], out
    back = StageSettings.from_loop_config(pickle.loads(blob.read_bytes())[1])
    assert back.cfg == cfg and back.stage == "detail" and back.logger == settings.logger
    assert back.val.captions == val.captions and back.val.latent_shape == (8, 2, 4, 4)
    np.testing.assert_array_equal(back.val.text, val.text)


def test_nonfinite_names_the_bad_metrics_and_the_marker_round_trips(tmp_path):
    """What the loop checks at each log step (train/ and val/ values only) and the record
    rank 0 leaves for the driver, read once and removed by a rerun."""
    from pipelines.train_loop import (
        diverged_message,
        nonfinite,
        read_diverged,
        write_diverged,
    )

    metrics = {"train/loss": float("nan"), "train/cd": 0.1, "val/score": float("inf"),
               "perf/samples_per_s": float("nan"), "step": 3.0}  # fmt: skip
    assert nonfinite(metrics) == ["train/loss", "val/score"]
    assert nonfinite({"train/loss": 0.2, "val/score": 31.0}) == []
    marker = str(tmp_path / "run" / "semantic" / "diverged.json")
    assert read_diverged(marker) is None
    write_diverged(marker, 7, ["train/loss"])
    assert read_diverged(marker) == {"step": 7, "metrics": ["train/loss"]}
    assert read_diverged(marker, remove=True) is not None and read_diverged(marker) is None
    line = diverged_message("detail", 1e-4, 7, ["train/loss"], "no checkpoint had been written yet")
    assert line.startswith("stage 'detail' diverged at step 7 (train/loss not finite")
    assert "lower train.lr_detail" in line and line.endswith("no checkpoint had been written yet")
