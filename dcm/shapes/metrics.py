"""Quality of a shapes-world video judged from its decoded pixels and its caption alone.

Per object of the caption (found by its colour's hue; backgrounds are grey):

- colour: fraction of frames holding one compact blob of that colour of plausible size;
- shape: fraction of frames whose blob classifies as the caption's shape (fill of the
  bounding box: circle pi/4, square 1, triangle 1/2; a triangle's centroid sits low);
- direction: the centroid track's least-squares displacement against the caption's motion
  (full credit from 60% of the rendered travel; "still" must move under 15% of it).

Adherence per object is the geometric mean of the three (a video must get every attribute
right), averaged over objects. Quality terms: smoothness = exp(-track jerk), flicker =
background change between frames, sharpness = RMS edge strength against a ground-truth render of
the same caption. summary = adherence * (0.75 + 0.25 * quality), in [0, 1].
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Sequence

import numpy as np

from dcm.shapes.grammar import Scene, ShapeObject, parse_caption
from dcm.shapes.render import DIRECTIONS, PALETTE, geometry, render_scene

HUE_TOL = 25.0  # degrees around a palette hue that count as that colour
FULL_CHROMA, MIN_CHROMA = 0.55, 0.08  # chroma of full membership; below MIN the hue is noise
SHAPE_PROTOTYPES = {  # (bounding-box fill, centroid offset below the box centre / box height)
    "circle": (np.pi / 4, 0.0),
    "square": (1.0, 0.0),
    "triangle": (0.5, 1.0 / 6.0),
}
FULL_TRAVEL, STILL_TRAVEL = 0.6, 0.15  # fractions of the rendered travel
JERK_SCALE = 0.05  # of the rendered travel per frame^3
FLICKER_FREE, FLICKER_SCALE = 1.5, 4.0  # grey levels of mean background change
SHARPNESS_SLACK = 0.85  # edge-energy ratio that still gets full credit
KEYS = (
    "colour",
    "shape",
    "direction",
    "adherence",
    "smoothness",
    "flicker",
    "sharpness",
    "quality",
    "summary",
)


def _hue_chroma(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma (max - min) in [0, 1] of uint8 (F, H, W, 3) frames.

    Chroma, unlike saturation, is linear in coverage when a colour is blended over grey, so
    soft centroids stay sub-pixel accurate at anti-aliased edges; the hue does not change.
    """
    rgb = frames.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0, delta


def _palette_hue(colour: str) -> float:
    r, g, b = (c / 255.0 for c in PALETTE[colour])
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def colour_weight(
    frames: np.ndarray, colour: str, hue_chroma: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Soft membership (F, H, W) in [0, 1] of each pixel to a palette colour."""
    hue, chroma = hue_chroma if hue_chroma is not None else _hue_chroma(frames)
    dist = np.abs((hue - _palette_hue(colour) + 180.0) % 360.0 - 180.0)
    return np.clip(chroma / FULL_CHROMA, 0.0, 1.0) * ((dist < HUE_TOL) & (chroma > MIN_CHROMA))


def _blobs(weight: np.ndarray, radius: float) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per frame: (soft centroid (x, y), hard mask) of one compact blob, or None.

    Robust to stray pixels: keep mask pixels within 2.2 r of the median pixel; they must be
    most of the mask, of plausible area and spread (a disk's spread is 0.71 r).
    """
    h, w = weight.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    min_area, max_area = 0.35 * 1.8 * radius**2, 2.2 * np.pi * radius**2
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for wf in weight:
        mask = wf > 0.5
        if mask.sum() < min_area:
            out.append(None)
            continue
        mx, my = np.median(xx[mask]), np.median(yy[mask])
        near = np.hypot(xx - mx, yy - my) < 2.2 * radius
        kept = mask & near
        area = kept.sum()
        if area < 0.8 * mask.sum() or not min_area <= area <= max_area:
            out.append(None)
            continue
        spread = np.sqrt(xx[kept].var() + yy[kept].var())
        if spread > 1.1 * radius:
            out.append(None)
            continue
        soft = wf * near
        c = np.asarray([(soft * xx).sum(), (soft * yy).sum()]) / soft.sum()
        out.append((c, kept))
    return out


def classify_shape(mask: np.ndarray) -> str:
    """Nearest shape prototype of one blob's hard mask (H, W)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = mask.sum() / float((y1 - y0) * (x1 - x0))
    offset = ((ys + 0.5).mean() - (y0 + y1) / 2.0) / (y1 - y0)
    feats = np.asarray([fill, 2.0 * offset])  # offset weighted up: fill alone confuses AA edges
    dists = {
        name: np.linalg.norm(feats - np.asarray([f, 2.0 * o]))
        for name, (f, o) in SHAPE_PROTOTYPES.items()
    }
    return min(dists, key=dists.get)


def _direction_score(
    track: np.ndarray, times: np.ndarray, n: int, motion: str, travel: float
) -> float:
    """Least-squares displacement over the clip (n frames) against the caption's motion."""
    if times.max() == times.min():
        return 0.0
    slope = np.polyfit(times, track, 1)[0]  # (2,) px per frame
    disp = slope * (n - 1) / travel  # whole-clip displacement as a fraction of the travel
    ux, uy = DIRECTIONS[motion]
    if motion == "still":
        return float(np.clip(1.0 - max(np.hypot(*disp) - STILL_TRAVEL, 0.0) / 0.3, 0.0, 1.0))
    along = disp[0] * ux + disp[1] * uy
    across = abs(disp[0] * uy - disp[1] * ux)
    s_along = np.clip(along / FULL_TRAVEL, 0.0, 1.0)
    s_across = np.clip(1.0 - max(across - 0.2, 0.0) / 0.3, 0.0, 1.0)
    return float(s_along * s_across)


def _object_scores(
    weight: np.ndarray, obj: ShapeObject, radius: float, travel: float
) -> tuple[dict[str, float], np.ndarray | None]:
    blobs = _blobs(weight, radius)
    n = len(weight)
    found = [i for i, b in enumerate(blobs) if b is not None]
    colour = len(found) / n
    shape = sum(classify_shape(blobs[i][1]) == obj.shape for i in found) / n
    direction, track = 0.0, None
    if n > 1 and len(found) >= max(2, n // 2):
        track = np.stack([blobs[i][0] for i in found])  # (K, 2) as (x, y)
        times = np.asarray(found, np.float64)
        direction = _direction_score(track, times, n, obj.motion, travel)
    # geometric mean: every attribute must be right for the object to count
    adherence = float(np.cbrt(colour * shape * direction))
    return (
        {"colour": colour, "shape": shape, "direction": direction, "adherence": adherence},
        track,
    )


def _jerk_score(track: np.ndarray | None, travel: float) -> float:
    if track is None:
        return 0.0
    if len(track) < 4:
        return 1.0
    jerk = np.abs(np.diff(track, n=3, axis=0)).mean()
    return float(np.exp(-jerk / (JERK_SCALE * travel)))


def _edge_energy(frames: np.ndarray) -> float:
    """RMS luminance gradient: blur lowers it (unlike the mean absolute gradient), noise raises it."""
    lum = frames.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    gx = np.square(np.diff(lum, axis=2)).mean()
    gy = np.square(np.diff(lum, axis=1)).mean()
    return float(np.sqrt(gx + gy))


def _flicker_score(frames: np.ndarray, object_masks: np.ndarray) -> float:
    if len(frames) < 2:
        return 1.0
    diff = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(-1)  # (F-1, H, W)
    # background = no object pixel in either neighbouring frame
    moving = object_masks[1:] | object_masks[:-1]
    bg = ~moving
    if bg.sum() == 0:
        return 0.0
    level = float(diff[bg].mean())
    return float(np.exp(-max(level - FLICKER_FREE, 0.0) / FLICKER_SCALE))


def score_video(
    frames: np.ndarray, caption: str | Scene, reference_seed: int = 0
) -> dict[str, float]:
    """Score uint8 frames (F, H, W, 3) against a caption of the grammar; values in [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    scene = caption if isinstance(caption, Scene) else parse_caption(caption)
    f, h, w, _ = frames.shape
    radius, travel = geometry(h, w)
    per_obj, tracks = [], []
    object_masks = np.zeros((f, h, w), bool)
    hue_chroma = _hue_chroma(frames)
    for obj in scene.objects:
        weight = colour_weight(frames, obj.colour, hue_chroma)  # (F, H, W)
        scores, track = _object_scores(weight, obj, radius, travel)
        per_obj.append(scores)
        tracks.append(track)
        object_masks |= weight > 0.05
    object_masks = _dilate(object_masks, 2)
    out = {k: float(np.mean([s[k] for s in per_obj])) for k in per_obj[0]}
    out["smoothness"] = float(np.mean([_jerk_score(t, travel) for t in tracks]))
    out["flicker"] = _flicker_score(frames, object_masks)
    ratio = _edge_energy(frames) / max(
        _reference_energy(scene.caption(), reference_seed, f, h, w), 1e-6
    )
    out["sharpness"] = float(min(1.0, min(ratio, 1.0 / max(ratio, 1e-6)) / SHARPNESS_SLACK))
    out["quality"] = (out["smoothness"] + out["flicker"] + out["sharpness"]) / 3.0
    out["summary"] = out["adherence"] * (0.75 + 0.25 * out["quality"])
    return {k: out[k] for k in KEYS}


@functools.lru_cache(maxsize=256)
def _reference_energy(caption: str, seed: int, f: int, h: int, w: int) -> float:
    """Edge energy of the ground-truth render of a caption (cached: captions repeat)."""
    return _edge_energy(render_scene(parse_caption(caption), seed, f, h, w))


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation of (F, H, W) masks by a (2k+1)^2 box, without scipy."""
    out = mask.copy()
    for axis in (1, 2):
        acc = out.copy()
        for s in range(1, k + 1):
            acc |= np.roll(out, s, axis=axis) | np.roll(out, -s, axis=axis)
        out = acc
    return out


def score_batch(
    videos: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]
) -> dict[str, object]:
    """Score several videos: per-key mean and std plus the per-video dicts."""
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions")
    rows = [score_video(v, c) for v, c in zip(videos, captions, strict=True)]
    out: dict[str, object] = {"n": len(rows), "per_video": rows}
    for k in KEYS:
        vals = np.asarray([r[k] for r in rows], np.float64)
        out[k] = float(vals.mean()) if len(vals) else 0.0
        out[f"{k}_std"] = float(vals.std()) if len(vals) else 0.0
    return out
