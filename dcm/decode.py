"""Clip selection and decord decoding for ingest (METHOD.md section 8).

Pure functions: a video (local path or bytes) and the clip geometry in, uint8 clips
``(F, H, W, 3)`` out. Every way a source can be unusable raises ``SourceError`` whose
message is the reject reason ingest records; nothing here knows about Ray or file
systems beyond reading one local path or one byte string.

Clip selection, for a segment of ``L`` source frames (the whole video, or ``start``..``end``):

- cover mode (``target_fps == 0``): the segment is cut into ``n = min(clips, L // F)`` equal
  parts and each part is covered by ``F`` frames taken with the integer stride
  ``s = max(1, (part - 1) // (F - 1))``, centred in the part (the reference's "stride to
  cover the clip"; an integer stride keeps motion uniform).
- fps mode (``target_fps > 0``): stride ``s = native_fps / target_fps`` (never below 1, so
  frames are not duplicated), window ``W = floor((F - 1) * s) + 1``, ``n = min(clips, L // W)``
  windows spread evenly over the segment.

A segment that cannot hold one window of ``F = 4k + 1`` frames is rejected as too short.
Frames are resized to cover ``(H, W)`` by decord while decoding (so a 4K source never
exists at full size in memory) and then centre-cropped.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class SourceError(ValueError):
    """A source video or caption is unusable; the message is the reject reason."""


@dataclass(frozen=True)
class DecodedVideo:
    """The clips cut from one source, with what was learned about the source."""

    clips: list[np.ndarray]  # each uint8 (F, H, W, 3)
    native_fps: float
    total_frames: int
    clip_fps: float  # frame rate of the selected frames (native_fps / stride)


# ---------------------------------------------------------------- clip selection
def plan_clips(
    total_frames: int,
    native_fps: float,
    num_frames: int,
    target_fps: float = 0.0,
    clips: int = 1,
    start: float | None = None,
    end: float | None = None,
) -> tuple[list[np.ndarray], float]:
    """Frame indices of each clip and the clips' frame rate.

    Returns ``(indices, clip_fps)``: ``indices`` is a list of int64 arrays of length
    ``num_frames`` (ascending, inside the segment). Raises ``SourceError`` when the segment
    is empty or too short for one window.
    """
    if num_frames < 1 or clips < 1:
        raise ValueError(f"num_frames={num_frames} and clips={clips} must be at least 1")
    if total_frames < 1:
        raise SourceError("the video has no frames")
    if (start is not None or end is not None or target_fps > 0) and not _valid_fps(native_fps):
        raise SourceError(f"the video reports no usable frame rate ({native_fps!r})")
    a, b = 0, total_frames  # segment [a, b) in source frames
    if start is not None:
        a = max(0, int(math.floor(start * native_fps)))
    if end is not None:
        b = min(total_frames, int(math.ceil(end * native_fps)))
    if start is not None and end is not None and end <= start:
        raise SourceError(f"start={start:g}s is not before end={end:g}s")
    seg = b - a
    if seg <= 0:
        raise SourceError(
            f"the segment {start}..{end}s lies outside the video ({total_frames} frames)"
        )
    f = num_frames
    if target_fps > 0:
        stride = max(1.0, native_fps / target_fps)
        window = int(math.floor((f - 1) * stride)) + 1
        if seg < window:
            raise SourceError(
                f"too short: {seg} frames at {native_fps:g} fps, need {window} to take "
                f"{f} frames at {target_fps:g} fps"
            )
        n = min(clips, seg // window)
        offsets = (
            [a + (seg - window) // 2]
            if n == 1
            else [a + round(j * (seg - window) / (n - 1)) for j in range(n)]
        )
        steps = np.floor(np.arange(f) * stride + 1e-9).astype(np.int64)
        out = [off + steps for off in offsets]
        return out, native_fps / stride if _valid_fps(native_fps) else 0.0
    if seg < f:
        raise SourceError(f"too short: {seg} frames, need {f} (4k+1) for one clip")
    n = min(clips, seg // f)
    part = seg // n
    stride = max(1, (part - 1) // max(1, f - 1))
    window = (f - 1) * stride + 1
    out = [
        a + j * part + (part - window) // 2 + np.arange(f, dtype=np.int64) * stride
        for j in range(n)
    ]
    return out, (native_fps / stride) if _valid_fps(native_fps) else 0.0


def _valid_fps(fps: float) -> bool:
    return fps is not None and math.isfinite(fps) and fps > 0


# ---------------------------------------------------------------- geometry
def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Smallest (h, w) with the source's aspect ratio that covers (target_h, target_w)."""
    scale = max(target_h / height, target_w / width)
    # round, then make sure rounding never leaves us a pixel short of the target
    return max(target_h, round(height * scale)), max(target_w, round(width * scale))


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop ``(F, H0, W0, 3)`` -> ``(F, height, width, 3)`` (H0 >= height, W0 >= width)."""
    h0, w0 = frames.shape[1:3]
    if h0 < height or w0 < width:
        raise ValueError(f"cannot crop {h0}x{w0} frames to {height}x{width}")
    top, left = (h0 - height) // 2, (w0 - width) // 2
    return frames[:, top : top + height, left : left + width]


def to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, F, H, W, 3)`` -> float32 ``(B, 3, F, H, W)`` in [-1, 1] (VAE input)."""
    import torch  # here, so decode-only workers never import torch

    if not torch.is_tensor(frames):
        arr = np.asarray(frames)
        # Ray hands out read-only views of the object store; torch wants writable memory.
        frames = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    x = frames
    if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (B, F, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (B, 3, F, H, W)


# ---------------------------------------------------------------- captions
def read_caption(data: bytes, where: str = "caption") -> str:
    """Caption bytes -> stripped text; non-UTF-8 or empty captions raise ``SourceError``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(
            f"{where} is not valid UTF-8 (byte {err.start}): re-save it as UTF-8"
        ) from None
    return check_caption(text, where)


def check_caption(text: object, where: str = "caption") -> str:
    """A caption value from a manifest -> stripped text, or ``SourceError`` if unusable."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        raise SourceError(f"{where} is missing")
    if not isinstance(text, str):
        raise SourceError(f"{where} is not text ({type(text).__name__})")
    if "\ufffd" in text:
        raise SourceError(f"{where} is not valid UTF-8 (holds replacement characters)")
    text = text.strip()
    if not text:
        raise SourceError(f"{where} is empty")
    return text


# ---------------------------------------------------------------- decoding
_QUIET = False


def _quiet_ffmpeg() -> None:
    """ffmpeg prints every concealed macroblock error of a corrupt file; keep it to fatal ones."""
    global _QUIET
    if not _QUIET:
        import decord

        decord.logging.set_level(decord.logging.FATAL)
        _QUIET = True


def _open(src: str | Path | bytes, width: int = -1, height: int = -1):
    import decord

    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            return decord.VideoReader(
                io.BytesIO(bytes(src)), ctx=decord.cpu(0), width=width, height=height, num_threads=1
            )
        return decord.VideoReader(
            str(src), ctx=decord.cpu(0), width=width, height=height, num_threads=1
        )
    except Exception as err:  # noqa: BLE001 - decord raises RuntimeError, DECORDError, assert
        raise SourceError(_open_reason(src, err)) from None


def _open_reason(src: str | Path | bytes, err: Exception) -> str:
    msg = str(err)
    if "cannot find video stream" in msg:
        return "no video stream" + (" (audio-only file)" if _has_audio(src) else " in the file")
    if "Invalid frame count" in msg or "frame-count" in msg:
        return "not a video (no frames or broken metadata)"
    return "not a readable video (corrupt, truncated or not a video container)"


def _has_audio(src: str | Path | bytes) -> bool:
    import decord

    try:
        data = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else str(src)
        decord.AudioReader(data, ctx=decord.cpu(0))
        return True
    except Exception:  # noqa: BLE001 - no decodable audio either
        return False


def decode_clips(
    src: str | Path | bytes,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float = 0.0,
    clips: int = 1,
    start: float | None = None,
    end: float | None = None,
) -> DecodedVideo:
    """Decode the clips of one video: uint8 ``(num_frames, height, width, 3)`` each.

    ``src`` is a local path or the file's bytes. Unusable sources raise ``SourceError``.
    """
    _quiet_ffmpeg()
    if isinstance(src, (bytes, bytearray)) and len(src) == 0:
        raise SourceError("empty file (0 bytes)")
    if not isinstance(src, (bytes, bytearray)) and Path(src).stat().st_size == 0:
        raise SourceError("empty file (0 bytes)")
    probe = _open(src)
    total = len(probe)
    native_fps = float(probe.get_avg_fps())
    try:
        h0, w0 = probe[0].shape[:2]
    except Exception:  # noqa: BLE001
        raise SourceError("corrupt video: the first frame cannot be decoded") from None
    plans, clip_fps = plan_clips(total, native_fps, num_frames, target_fps, clips, start, end)
    hc, wc = cover_size(h0, w0, height, width)
    reader = probe if (hc, wc) == (h0, w0) else _open(src, width=wc, height=hc)
    del probe
    out = []
    for idx in plans:
        try:
            frames = reader.get_batch(idx.tolist()).asnumpy()  # (F, hc, wc, 3)
        except Exception:  # noqa: BLE001 - truncated streams fail inside the decoder
            raise SourceError(
                f"corrupt or truncated video: frames {int(idx[0])}..{int(idx[-1])} of {total} "
                "cannot be decoded"
            ) from None
        if frames.shape[0] != num_frames:
            raise SourceError(f"corrupt video: decoded {frames.shape[0]} of {num_frames} frames")
        out.append(np.ascontiguousarray(center_crop(frames, height, width), dtype=np.uint8))
    return DecodedVideo(clips=out, native_fps=native_fps, total_frames=total, clip_fps=clip_fps)
