"""dcm.decode: clip selection, resize-to-cover + centre crop, pixel range, captions, and the
reject reason of every kind of broken file (real mp4s written with ffmpeg)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.decode import (
    SourceError,
    center_crop,
    check_caption,
    cover_size,
    decode_clips,
    plan_clips,
    read_caption,
    to_pixels,
)
from dcm.video import write_video


# ---------------------------------------------------------------- clip selection
def test_cover_mode_strides_to_cover_the_whole_video():
    (idx,), fps = plan_clips(total_frames=100, native_fps=24.0, num_frames=17)
    assert len(idx) == 17 and np.all(np.diff(idx) == 6)  # stride (100 - 1) // 16 = 6
    assert idx[0] >= 0 and idx[-1] < 100 and idx[-1] - idx[0] == 96  # covers 97 of 100 frames
    assert fps == pytest.approx(4.0)


def test_cover_mode_cuts_several_clips_without_overlap():
    clips, _ = plan_clips(total_frames=100, native_fps=10.0, num_frames=9, clips=3)
    assert len(clips) == 3
    for a, b in zip(clips, clips[1:], strict=False):
        assert a[-1] < b[0]
    assert all(len(c) == 9 and np.all(np.diff(c) > 0) for c in clips)
    # more clips asked than fit: as many as hold 9 frames each
    assert len(plan_clips(20, 10.0, 9, clips=5)[0]) == 2


def test_fps_mode_takes_frames_at_the_target_rate():
    clips, fps = plan_clips(
        total_frames=300, native_fps=30.0, num_frames=5, target_fps=10.0, clips=2
    )
    assert fps == pytest.approx(10.0)
    assert [list(np.diff(c)) for c in clips] == [[3, 3, 3, 3]] * 2
    assert clips[0][0] == 0 and clips[1][-1] == 299  # windows spread over the whole video
    # a slower video is never up-sampled: stride 1 at its native rate
    (idx,), fps = plan_clips(total_frames=50, native_fps=8.0, num_frames=5, target_fps=16.0)
    assert list(np.diff(idx)) == [1, 1, 1, 1] and fps == pytest.approx(8.0)


def test_start_end_limit_the_segment():
    (idx,), _ = plan_clips(total_frames=1000, native_fps=10.0, num_frames=5, start=10.0, end=20.0)
    assert idx[0] >= 100 and idx[-1] < 200


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"total_frames": 16, "native_fps": 8.0, "num_frames": 17}, "too short"),
        (
            {"total_frames": 40, "native_fps": 30.0, "num_frames": 17, "target_fps": 10.0},
            "too short",
        ),
        (
            {"total_frames": 100, "native_fps": 10.0, "num_frames": 5, "start": 5.0, "end": 2.0},
            "not before",
        ),
        ({"total_frames": 100, "native_fps": 10.0, "num_frames": 5, "start": 50.0}, "outside"),
        (
            {"total_frames": 100, "native_fps": 0.0, "num_frames": 5, "target_fps": 8.0},
            "frame rate",
        ),
        ({"total_frames": 0, "native_fps": 8.0, "num_frames": 5}, "no frames"),
    ],
)
def test_unusable_segments_are_rejected(kwargs, reason):
    with pytest.raises(SourceError, match=reason):
        plan_clips(**kwargs)


# ---------------------------------------------------------------- geometry and pixels
def test_cover_size_keeps_aspect_and_covers():
    assert cover_size(1080, 1920, 480, 832) == (480, 853)
    assert cover_size(480, 640, 64, 64) == (64, 85)
    assert cover_size(100, 50, 64, 64) == (128, 64)
    h, w = cover_size(37, 91, 30, 30)
    assert h >= 30 and w >= 30


def test_center_crop_takes_the_middle():
    frames = np.zeros((2, 6, 10, 3), np.uint8)
    frames[:, 1:5, 3:7] = 255
    out = center_crop(frames, 4, 4)
    assert out.shape == (2, 4, 4, 3) and out.min() == 255
    with pytest.raises(ValueError):
        center_crop(frames, 8, 4)


def test_to_pixels_layout_and_range():
    frames = np.zeros((1, 2, 3, 4, 3), np.uint8)  # (B, F, H, W, 3)
    frames[0, 1, :, :, 0] = 255  # frame 1, red channel
    frames.setflags(write=False)  # as Ray hands them out
    x = to_pixels(frames)
    assert x.shape == (1, 3, 2, 3, 4) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert (
        torch.all(x[0, 0, 1] == 1.0)
        and torch.all(x[0, 0, 0] == -1.0)
        and torch.all(x[0, 1] == -1.0)
    )
    with pytest.raises(ValueError):
        to_pixels(np.zeros((2, 3, 4, 3), np.uint8))


# ---------------------------------------------------------------- captions
def test_captions():
    assert read_caption("\ufeff  a red ball \n".encode()) == "a red ball"
    with pytest.raises(SourceError, match="not valid UTF-8"):
        read_caption("café".encode("latin-1"))
    with pytest.raises(SourceError, match="empty"):
        read_caption(b"  \n")
    with pytest.raises(SourceError, match="missing"):
        check_caption(None)
    with pytest.raises(SourceError, match="UTF-8"):
        check_caption("caf\ufffd")


# ---------------------------------------------------------------- real files
def _ramp_video(path: Path, frames: int = 40, height: int = 48, width: int = 96) -> Path:
    """Frame i has brightness 5 * i; columns: a red quarter, a green half, a blue quarter."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    q = width // 4
    video[:, :, :q, 0] = 255
    video[:, :, q : 3 * q, 1] = 255
    video[:, :, 3 * q :, 2] = 255
    video[:, : height // 4] = (5 * np.arange(frames, dtype=np.uint8))[:, None, None, None]
    return write_video(path, video, fps=8)


def test_decode_resizes_to_cover_and_crops_the_centre(tmp_path):
    src = _ramp_video(tmp_path / "ramp.mp4")
    out = decode_clips(src, num_frames=17, height=32, width=32)
    assert out.total_frames == 40 and out.native_fps == pytest.approx(8.0)
    (clip,) = out.clips
    assert clip.shape == (17, 32, 32, 3) and clip.dtype == np.uint8
    # 48x96 -> cover 32x64 -> the centre 32 columns are the green half only
    body = clip[:, 12:, 2:-2].astype(int)
    assert body[..., 1].mean() > 200 and body[..., 0].mean() < 40 and body[..., 2].mean() < 40
    # the frames follow the planned indices (stride 2 from frame 3): brightness 5 * index
    top = clip[:, 2:5].astype(float).mean(axis=(1, 2, 3))
    (idx,), _ = plan_clips(40, 8.0, 17)
    np.testing.assert_allclose(top, 5 * idx, atol=6)


def test_decode_bytes_equals_decode_path(tmp_path):
    src = _ramp_video(tmp_path / "ramp.mp4")
    a = decode_clips(src, 9, 16, 16, clips=2)
    b = decode_clips(src.read_bytes(), 9, 16, 16, clips=2)
    assert len(a.clips) == len(b.clips) == 2
    for x, y in zip(a.clips, b.clips, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """One file per way a source can be broken."""
    import imageio_ffmpeg

    d = tmp_path_factory.mktemp("broken")
    good = _ramp_video(d / "good.mp4")
    data = good.read_bytes()
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    files = {"zero": d / "zero.mp4", "truncated": d / "truncated.mp4", "text": d / "notes.mp4"}
    files["zero"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])  # moov atom at the end is lost
    files["text"].write_text("this is not a video\n" * 50)
    # index up front, then the second half of the stream garbled: opens, fails to decode
    fast = d / "fast.mp4"
    subprocess.run(
        [
            ffmpeg,
            "-y",
            "-loglevel",
            "error",
            "-i",
            str(good),
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            str(fast),
        ],
        check=True,
    )
    raw = bytearray(fast.read_bytes())
    rng = np.random.default_rng(0)
    raw[len(raw) // 3 :] = rng.integers(0, 256, len(raw) - len(raw) // 3, dtype=np.uint8).tobytes()
    files["corrupt"] = d / "corrupt.mp4"
    files["corrupt"].write_bytes(bytes(raw))
    files["audio"] = d / "audio.m4a"
    subprocess.run(
        [
            ffmpeg,
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=1",
            "-c:a",
            "aac",
            str(files["audio"]),
        ],
        check=True,
    )
    from PIL import Image

    files["image"] = d / "still.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(files["image"])
    files["short"] = write_video(d / "short.mp4", np.zeros((5, 32, 32, 3), np.uint8), fps=8)
    return files


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("zero", "empty file"),
        ("truncated", "not a readable video"),
        ("text", "not a readable video"),
        ("corrupt", "corrupt"),
        ("audio", "audio-only"),
        ("image", "not a video"),
        ("short", "too short"),
    ],
)
def test_broken_files_raise_their_reason(broken, kind, reason):
    with pytest.raises(SourceError, match=reason):
        decode_clips(broken[kind], num_frames=17, height=32, width=32)
    if kind != "zero":  # the same reason from the file's bytes (remote sources)
        with pytest.raises(SourceError, match=reason):
            decode_clips(broken[kind].read_bytes(), num_frames=17, height=32, width=32)
