"""Video files in and out: mp4 (libx264, yuv420p) and GIF writing, decord reading, contact sheets.

Frames are always uint8 arrays shaped (F, H, W, 3) in RGB order. mp4 goes through the
ffmpeg binary that imageio-ffmpeg ships (it has libx264), GIF through Pillow; reading uses
decord for mp4 (the same decoder ingest uses) and Pillow for GIF.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Near-lossless x264: the shapes metrics read colours back from decoded pixels, and the
# default quality (crf 23) visibly shifts saturated colours on 64x64 frames.
MP4_CRF = 12


class VideoError(ValueError):
    """A video file or frame array is unusable; the message says which and what to do."""


def _check_frames(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VideoError(f"frames must be shaped (F, H, W, 3), got {arr.shape}")
    if arr.shape[0] < 1:
        raise VideoError("frames is empty: pass at least one frame")
    if arr.dtype != np.uint8:
        raise VideoError(f"frames must be uint8 in [0, 255], got {arr.dtype}")
    return np.ascontiguousarray(arr)


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Write uint8 frames (F, H, W, 3) to `path`: .mp4 (libx264, yuv420p) or .gif by suffix."""
    path = Path(path)
    frames = _check_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        _write_gif(path, frames, fps)
    elif suffix == ".mp4":
        _write_mp4(path, frames, fps)
    else:
        raise VideoError(f"{path}: unsupported video suffix '{path.suffix}'; use .mp4 or .gif")
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio_ffmpeg

    # yuv420p needs even sizes: pad the last row/column by edge replication.
    f, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(
        str(path),
        size=(w + pw, h + ph),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,
        output_params=["-crf", str(MP4_CRF), "-preset", "veryfast"],
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start the generator
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _write_gif(path: Path, frames: np.ndarray, fps: int) -> None:
    from PIL import Image

    # Fast octree palettes per frame: Pillow's default (median cut) takes ~0.2 s per noisy frame.
    images = [
        Image.fromarray(frame).quantize(
            colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
        )
        for frame in frames
    ]
    duration_ms = max(20, round(1000 / max(fps, 1)))
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, optimize=False
    )


def video_bytes(frames: np.ndarray, fps: int, fmt: str = "mp4") -> bytes:
    """Encode frames to an in-memory mp4 or GIF file and return its bytes."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("mp4", "gif"):
        raise VideoError(f"fmt={fmt!r} is not supported; use 'mp4' or 'gif'")
    with tempfile.TemporaryDirectory(prefix="dcm-video-") as tmp:
        path = write_video(Path(tmp) / f"video.{fmt}", frames, fps)
        return path.read_bytes()


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of an mp4 (decord) or GIF (Pillow) to uint8 (F, H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file '{path}' does not exist")
    if path.suffix.lower() == ".gif":
        return _read_gif(path)
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as err:  # noqa: BLE001 - decord raises its own error types
        raise VideoError(
            f"video file '{path}' cannot be decoded ({err}); re-encode it as mp4"
        ) from None
    if len(reader) == 0:
        raise VideoError(f"video file '{path}' has no frames")
    return reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.uint8)  # (F, H, W, 3)


def _read_gif(path: Path) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(path) as img:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(img)]
    return np.stack(frames).astype(np.uint8)


def contact_sheet(
    videos: Sequence[np.ndarray],
    path: str | Path,
    columns: int = 8,
    fps: int = 8,
    scale: int = 2,
    pad: int = 2,
) -> Path:
    """A picture of several videos: PNG = one row per video with `columns` evenly spaced
    frames; GIF = the videos tiled side by side (up to `columns` per row) and animated.

    Frames are upscaled by `scale` (nearest) so 64x64 clips stay visible in a README.
    """
    path = Path(path)
    clips = [_check_frames(v) for v in videos]
    if not clips:
        raise VideoError("contact_sheet needs at least one video")
    h, w = clips[0].shape[1:3]
    if any(c.shape[1:3] != (h, w) for c in clips):
        raise VideoError("contact_sheet videos must share one frame size")
    clips = [c.repeat(scale, axis=1).repeat(scale, axis=2) for c in clips]
    h, w = h * scale, w * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        n_frames = max(c.shape[0] for c in clips)
        cols = min(columns, len(clips))
        rows = -(-len(clips) // cols)
        grid = np.full((n_frames, rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
        for i, clip in enumerate(clips):
            r, c = divmod(i, cols)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            idx = np.minimum(np.arange(n_frames), clip.shape[0] - 1)  # hold the last frame
            grid[:, y : y + h, x : x + w] = clip[idx]
        return write_video(path, grid, fps)
    if path.suffix.lower() != ".png":
        raise VideoError(f"{path}: contact sheets are .png or .gif")
    from PIL import Image

    sheet = np.full((len(clips) * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for r, clip in enumerate(clips):
        picks = np.linspace(0, clip.shape[0] - 1, columns).round().astype(int)
        for c, k in enumerate(picks):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y : y + h, x : x + w] = clip[k]
    Image.fromarray(sheet).save(path)
    return path
