"""VideoGenerator on tiny bundles and artifacts; `python -m pipelines.generate` writes a real mp4."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import moving_square_frames, sample_mp4, tiny_bundle

from dcm.config import ConfigError, LoraConfig, load_config
from dcm.experts import DualExpert
from dcm.generate import VideoGenerator
from dcm.video import read_video

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


def test_per_row_seeds_do_not_depend_on_the_batch(gen):
    kw = {"steps": 2, "num_frames": 5, "height": 16, "width": 16}
    both = gen.generate(PROMPTS, seed=[5, 9], **kw)
    assert _close(both[1], gen.generate(PROMPTS[1:], seed=9, **kw)[0])
    assert _close(both[0], gen.generate(PROMPTS[:1], seed=np.int64(5), **kw)[0])
    with pytest.raises(ConfigError, match="one seed per prompt"):
        gen.generate(PROMPTS, seed=[1], **kw)


def test_renoise_is_seeded_per_row_and_only_moves_intermediate_detail_steps(bundle_path):
    cfg = load_config(preset="shapes-tiny", overrides=["sample.renoise=1.0"])
    noisy, plain = VideoGenerator.load(bundle_path, cfg=cfg), VideoGenerator.load(bundle_path)
    kw = {"num_frames": 5, "height": 16, "width": 16}
    a = noisy.generate(PROMPTS, steps=4, seed=[5, 9], **kw)
    assert noisy.last_meta["renoise"] == 1.0
    assert np.array_equal(a, noisy.generate(PROMPTS, steps=4, seed=[5, 9], **kw))
    assert _close(a[1], noisy.generate(PROMPTS[1:], steps=4, seed=9, **kw)[0])
    assert not np.array_equal(a, plain.generate(PROMPTS, steps=4, seed=[5, 9], **kw))
    assert plain.last_meta["renoise"] == 0.0
    # 2 steps: the one DetE step ends at 0, so nothing is re-noised
    two = noisy.generate(PROMPTS, steps=2, seed=[5, 9], **kw)
    assert np.array_equal(two, plain.generate(PROMPTS, steps=2, seed=[5, 9], **kw))


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


def test_bfloat16_weights_run_under_autocast(bundle_path):
    cfg = load_config(preset="shapes-tiny", overrides=["model.dtype=bfloat16"])
    g = VideoGenerator.load(bundle_path, cfg=cfg)
    assert g.student.base.transformer.patch_embedding.weight.dtype == torch.bfloat16
    video = g.generate(PROMPTS[:1], steps=2, num_frames=5, height=16, width=16)
    assert video.shape == (1, 5, 16, 16, 3) and video.std() > 0
    g.generate(PROMPTS[:1], teacher=True, teacher_steps=1, num_frames=5, height=16, width=16)
    assert g.last_timings["nfe"] == 2


@pytest.mark.gpu
def test_generate_on_gpu(bundle_path):
    g = VideoGenerator.load(bundle_path, device="cuda", cfg=load_config(preset="shapes-tiny"))
    assert g.bundle.dtype == torch.bfloat16  # model.dtype 'auto' on CUDA
    video = g.generate(PROMPTS, steps=4, seed=0)
    assert video.shape == (2, 17, 64, 64, 3)
    assert np.array_equal(video, g.generate(PROMPTS, steps=4, seed=0))


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
    with pytest.raises(ConfigError, match="needs its base model folder 'gone'.*--base-model"):
        VideoGenerator.load(art, cfg=cfg)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_cli_writes_playable_mp4(bundle_path, tmp_path, monkeypatch, capsys):
    # runpy with run_name="__main__" is what `python -m pipelines.generate` does, minus the
    # ~10 s of library imports a fresh interpreter would pay on this 2-core machine.
    out = tmp_path / "v.mp4"
    argv = ["--model", str(bundle_path), "--prompt", "a red circle moves left", "--steps", "3"]
    argv += ["--frames", "9", "--height", "48", "--width", "32", "--seed", "2"]
    argv += ["--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["pipelines.generate", *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("pipelines.generate", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "3 network evaluations" in stdout
    frames = read_video(out)  # decord
    assert frames.shape == (9, 48, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 0


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


def test_sample_mp4_helper(tmp_path):
    frames = read_video(sample_mp4(tmp_path / "s.mp4", num_frames=9, height=32, width=64))
    assert frames.shape == (9, 32, 64, 3)
    # the square moves right: its red mass drifts to larger x (mp4 is lossy; compare centroids)
    want = moving_square_frames(9, 32, 64)
    red = (frames[..., 0].astype(int) - frames[..., 2]) > 100
    xs = [np.nonzero(r)[1].mean() for r in red[[0, -1]]]
    assert xs[1] > xs[0] + 20 and np.abs(frames.astype(int) - want).mean() < 8
