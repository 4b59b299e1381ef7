"""Anti-aliased renderer of shapes-world scenes: a seed and a caption -> uint8 frames.

Each object is drawn from a signed distance d (pixels, negative inside) with coverage
clip(0.5 - d, 0, 1), which gives one-pixel anti-aliased edges without supersampling.
Objects move at constant speed along a straight line (or stay still) and always stay fully
inside the frame, so a centroid track sees the whole motion.
"""

from __future__ import annotations

import random

import numpy as np

from dcm.shapes.grammar import Scene, parse_caption

# Saturated, hue-separated colours (the metrics classify pixels by hue; backgrounds are grey).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 45, 45),
    "green": (45, 200, 70),
    "blue": (55, 95, 245),
    "yellow": (240, 215, 40),
}
PLAIN_GREY = 52
CHECKER_GREYS = (40, 70)
CHECKER_CELL = 8  # pixels

# Geometry as fractions of the frame's shorter side (64 px -> radius 9, travel 24).
RADIUS = 0.14
TRAVEL = 0.375
MARGIN = 2  # pixels between an object and the frame edge
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy), image y grows downwards
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "still": (0.0, 0.0),
}


def geometry(height: int, width: int) -> tuple[float, float]:
    """(radius, travel) in pixels for a frame size."""
    side = min(height, width)
    return RADIUS * side, TRAVEL * side


def _sdf(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        half = 0.85 * r  # about the circle's area
        return np.maximum(np.abs(dx) - half, np.abs(dy) - half)
    raise ValueError(f"unknown shape {shape!r}")


def _triangle_sdf(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Signed distance (approximate, exact near edges) to the upward triangle."""
    ax, ay = cx, cy - r  # apex
    bx, by = cx + r, cy + 0.8 * r  # base right
    px, py = cx - r, cy + 0.8 * r  # base left
    out = np.full(xx.shape, -np.inf)
    for (x0, y0), (x1, y1) in (((ax, ay), (bx, by)), ((bx, by), (px, py)), ((px, py), (ax, ay))):
        ex, ey = x1 - x0, y1 - y0
        norm = np.hypot(ex, ey)
        # clockwise order on screen (y down): the outward normal is (ey, -ex) / norm
        out = np.maximum(out, ((xx - x0) * ey - (yy - y0) * ex) / norm)
    return out


def coverage(shape: str, height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, (H, W) float32; pixel centres at +0.5."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if shape == "triangle":
        d = _triangle_sdf(xx, yy, cx, cy, r)
    else:
        d = _sdf(shape, xx, yy, cx, cy, r)
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def background(kind: str, height: int, width: int, rng: random.Random) -> np.ndarray:
    """(H, W, 3) float32 grey background: uniform, or a low-contrast checkerboard."""
    if kind == "plain":
        return np.full((height, width, 3), PLAIN_GREY, np.float32)
    oy, ox = rng.randrange(CHECKER_CELL), rng.randrange(CHECKER_CELL)
    yy, xx = np.mgrid[0:height, 0:width]
    cells = ((yy + oy) // CHECKER_CELL + (xx + ox) // CHECKER_CELL) % 2
    grey = np.where(cells == 0, CHECKER_GREYS[0], CHECKER_GREYS[1]).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def tracks(
    scene: Scene, rng: random.Random, num_frames: int, height: int, width: int
) -> list[np.ndarray]:
    """Centre positions (F, 2) as (x, y) per object: start drawn so the whole path fits."""
    r, travel = geometry(height, width)
    for _ in range(100):  # redraw until two objects never overlap (occlusion hides shapes)
        paths = _draw_tracks(scene, rng, num_frames, height, width, r, travel)
        if len(paths) < 2 or np.hypot(*(paths[0] - paths[1]).T).min() > 2.4 * r:
            break
    return paths


def _draw_tracks(
    scene: Scene,
    rng: random.Random,
    num_frames: int,
    height: int,
    width: int,
    r: float,
    travel: float,
) -> list[np.ndarray]:
    lo = r + MARGIN
    out = []
    for obj in scene.objects:
        dx, dy = DIRECTIONS[obj.motion]
        # start range per axis: the path [start, start + d*travel] stays inside [lo, size-lo]
        start = []
        for d, size in ((dx, width), (dy, height)):
            a, b = lo - min(0.0, d * travel), size - lo - max(0.0, d * travel)
            start.append(rng.uniform(a, b))
        frac = np.linspace(0.0, 1.0, num_frames)[:, None]
        out.append(np.asarray(start)[None, :] + frac * np.asarray([dx, dy])[None, :] * travel)
    return out


def render_scene(
    scene: Scene, seed: int, num_frames: int = 17, height: int = 64, width: int = 64
) -> np.ndarray:
    """Render a scene deterministically from `seed`: uint8 (F, H, W, 3)."""
    rng = random.Random(seed)
    bg = background(scene.background, height, width, rng)
    r, _ = geometry(height, width)
    paths = tracks(scene, rng, num_frames, height, width)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        img = bg.copy()
        for obj, path in zip(scene.objects, paths, strict=True):
            alpha = coverage(obj.shape, height, width, path[f, 0], path[f, 1], r)[..., None]
            img = img * (1.0 - alpha) + np.asarray(PALETTE[obj.colour], np.float32) * alpha
        frames[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def render_caption(
    caption: str, seed: int, num_frames: int = 17, height: int = 64, width: int = 64
) -> np.ndarray:
    """Parse a caption of the grammar and render it: uint8 (F, H, W, 3)."""
    return render_scene(parse_caption(caption), seed, num_frames, height, width)
