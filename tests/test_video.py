"""dcm.video: mp4/GIF round trips through the real encoders and decord, bytes, contact sheets."""

from __future__ import annotations

import numpy as np
import pytest

from dcm.video import VideoError, contact_sheet, read_video, video_bytes, write_video


def _moving_square(frames: int = 9, size: int = 32) -> np.ndarray:
    """A red square moving right over grey: (F, H, W, 3) uint8."""
    out = np.full((frames, size, size, 3), 128, np.uint8)
    for f in range(frames):
        x = 2 + 2 * f
        out[f, 10:20, x : x + 8] = (220, 30, 30)
    return out


def test_mp4_round_trip_keeps_shape_and_colours(tmp_path):
    clip = _moving_square()
    path = write_video(tmp_path / "a.mp4", clip, fps=8)
    back = read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    # near-lossless x264: flat regions come back within a few levels
    assert np.abs(back[:, 12:18, 12:14].astype(int) - clip[:, 12:18, 12:14]).mean() < 40
    assert np.abs(back[:, 25:, :].astype(int) - 128).mean() < 3
    # the square's position per frame survives (motion is not smeared away)
    red = (back[..., 0] > 160) & (back[..., 1] < 100)
    xs = [np.nonzero(red[f])[1].mean() for f in range(len(back))]
    assert np.all(np.diff(xs) > 1.0)


def test_odd_sizes_are_padded_for_yuv420p(tmp_path):
    clip = np.zeros((5, 15, 21, 3), np.uint8)
    back = read_video(write_video(tmp_path / "odd.mp4", clip, fps=4))
    assert back.shape[0] == 5 and back.shape[1:3] == (16, 22)


def test_gif_round_trip_and_bytes(tmp_path):
    clip = _moving_square(frames=5)
    back = read_video(write_video(tmp_path / "a.gif", clip, fps=8))
    assert back.shape == clip.shape
    assert np.abs(back.astype(int) - clip).mean() < 4
    data = video_bytes(clip, fps=8, fmt="gif")
    assert data[:6] in (b"GIF87a", b"GIF89a")
    mp4 = video_bytes(clip, fps=8, fmt="mp4")
    assert mp4[4:8] == b"ftyp"


def test_contact_sheets(tmp_path):
    from PIL import Image

    clips = [_moving_square(), _moving_square()[::-1].copy()]
    png = contact_sheet(clips, tmp_path / "sheet.png", columns=4, scale=1, pad=2)
    img = np.asarray(Image.open(png))
    assert img.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    gif = read_video(contact_sheet(clips, tmp_path / "sheet.gif", scale=2, pad=2))
    assert gif.shape == (9, 64 + 4, 2 * 66 + 2, 3)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match=r"\(F, H, W, 3\)"):
        write_video(tmp_path / "x.mp4", np.zeros((4, 4, 3), np.uint8), fps=8)
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 4, 4, 3), np.float32), fps=8)
    with pytest.raises(VideoError, match="suffix"):
        write_video(tmp_path / "x.avi", np.zeros((2, 4, 4, 3), np.uint8), fps=8)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match="cannot be decoded"):
        read_video(tmp_path / "junk.mp4")
