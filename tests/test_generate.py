"""VideoGenerator on tiny bundles and artifacts; `python -m pipelines.generate` writes a real mp4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bundle

from dcm.config import ConfigError, LoraConfig, load_config
from dcm.experts import DualExpert
from dcm.generate import VideoGenerator
from dcm.video import read_video

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moves left", "a blue square"]


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def gen(bundle_path) -> VideoGenerator:
    return VideoGenerator.load(bundle_path, cfg=load_config(preset="shapes-tiny"))


def test_generate_shapes_seeds_and_timings(gen):
    cfg = load_config(preset="shapes-tiny")
    a = gen.generate(PROMPTS, steps=4, seed=7)
    d = cfg.data
    assert a.dtype == np.uint8 and a.shape == (2, d.num_frames, d.height, d.width, 3)
    assert set(gen.last_timings) == {"nfe", "encode_s", "denoise_s", "decode_s", "total_s"}
    assert gen.last_timings["nfe"] == 4
    assert gen.last_timings["total_s"] >= gen.last_timings["denoise_s"] > 0
    assert np.array_equal(a, gen.generate(PROMPTS, steps=4, seed=7))
    assert not np.array_equal(a, gen.generate(PROMPTS, steps=4, seed=8))
    small = gen.generate(PROMPTS[:1], steps=2, seed=7, num_frames=5, height=16, width=24)
    assert small.shape == (1, 5, 16, 24, 3) and gen.last_timings["nfe"] == 2


def test_split_moves_sigmas_and_output(gen):
    s34, s20 = gen.sigmas(4), gen.sigmas(4, split=20)
    assert s34 != s20 and s34[-1] == s20[-1] == 0.0 and len(s34) == 5
    a = gen.generate(PROMPTS[:1], steps=4, seed=1, num_frames=5)
    b = gen.generate(PROMPTS[:1], steps=4, seed=1, num_frames=5, split=20)
    assert not np.array_equal(a, b)
    with pytest.raises(ConfigError, match="split=49"):
        gen.generate(PROMPTS[:1], split=49)


def test_teacher_counts_guided_evaluations(gen):
    gen.generate(PROMPTS[:1], teacher=True, teacher_steps=3, num_frames=5)
    assert gen.last_timings["nfe"] == 6  # CFG: two passes per Euler step


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 10}, r"num_frames=10 must be k\*4\+1"),
        ({"height": 60}, "height=60 must be a positive multiple of 8"),
        ({"width": 4}, "width=4 must be a positive multiple of 8"),
        ({"steps": 1}, "at least 2"),
    ],
)
def test_bad_sizes_are_config_errors(gen, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        gen.generate(PROMPTS[:1], **kwargs)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """uint8 videos equal up to one level on a handful of pixels."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return bool(diff.max() <= 1 and (diff > 0).mean() < 1e-3)


def test_artifact_loads_with_its_bundle(gen, bundle_path, tmp_path):
    cfg = load_config(preset="shapes-tiny")
    student = DualExpert(
        gen.bundle.transformer.__class__.from_pretrained(bundle_path / "transformer")
    )
    student.enable_detail_expert(LoraConfig(rank=4, alpha=8.0))
    art = student.save_artifact(tmp_path / "fresh", cfg, str(bundle_path))
    loaded = VideoGenerator.load(art, cfg=cfg)
    assert loaded.source == "artifact" and loaded.student.has_detail
    # DetE starts equal to SemE (LoRA B = 0) and SemE is the base: same video as the bundle
    # (up to float rounding: from_config + load_state_dict vs from_pretrained, ~1e-7).
    kw = {"steps": 4, "seed": 3, "num_frames": 5}
    base = gen.generate(PROMPTS[:1], **kw).astype(int)
    assert _close(loaded.generate(PROMPTS[:1], **kw), base)
    # A trained-looking DetE changes only the low-noise steps' expert, hence the video.
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    moved = VideoGenerator.load(
        student.save_artifact(tmp_path / "moved", cfg, str(bundle_path)), cfg=cfg
    )
    assert not _close(moved.generate(PROMPTS[:1], **kw), base)
    assert moved._teacher is None  # the teacher transformer loads only when asked for
    teacher = moved.generate(PROMPTS[:1], teacher=True, teacher_steps=2, num_frames=5)
    assert np.array_equal(
        teacher, gen.generate(PROMPTS[:1], teacher=True, teacher_steps=2, num_frames=5)
    )


def test_artifact_with_missing_bundle_is_clear(gen, bundle_path, tmp_path):
    cfg = load_config(preset="shapes-tiny")
    student = DualExpert(
        gen.bundle.transformer.__class__.from_pretrained(bundle_path / "transformer")
    )
    art = student.save_artifact(tmp_path / "a", cfg, str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="needs its bundle"):
        VideoGenerator.load(art, cfg=cfg)


def test_cli_writes_playable_mp4(bundle_path, tmp_path):
    out = tmp_path / "v.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.generate", "--model", str(bundle_path)]
    cmd += ["--prompt", "a red circle moves left", "--steps", "3", "--frames", "9"]
    cmd += ["--height", "48", "--width", "32", "--seed", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout and "3 network evaluations" in proc.stdout
    frames = read_video(out)  # decord
    assert frames.shape == (9, 48, 32, 3) and frames.dtype == np.uint8


def test_cli_bad_input_is_one_line(bundle_path, tmp_path, capsys):
    from pipelines.args import run_main
    from pipelines.generate import main

    argv = [
        "--model",
        str(bundle_path),
        "--prompt",
        "a",
        "--frames",
        "8",
        "--out",
        str(tmp_path / "x.mp4"),
    ]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: num_frames=8") and "\n" not in err
    assert run_main(main, ["--prompt", "a", "--out", str(tmp_path / "x.avi")]) == 2
    assert ".mp4 or .gif" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
