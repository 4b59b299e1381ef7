"""The shapes metrics against known answers: ground truth high, noise / static / wrong low."""

from __future__ import annotations

import numpy as np
import pytest

from dcm.shapes.dataset import iter_clips
from dcm.shapes.grammar import COLOURS, MOTIONS, SHAPES, Scene, ShapeObject
from dcm.shapes.metrics import KEYS, classify_shape, score_batch, score_video
from dcm.shapes.render import coverage, render_scene
from dcm.video import read_video, write_video


@pytest.fixture(scope="module")
def clips():
    return list(iter_clips(24, seed=5, split="train", two_prob=0.25))


def _replace(scene: Scene, **kw) -> Scene:
    first = scene.objects[0]
    obj = ShapeObject(
        kw.get("colour", first.colour), kw.get("shape", first.shape), kw.get("motion", first.motion)
    )
    return Scene((obj, *scene.objects[1:]), scene.background)


def test_ground_truth_scores_high_raw_and_through_mp4(clips, tmp_path):
    raw = score_batch([f for _, f in clips], [s.caption() for s, _ in clips])
    assert raw["summary"] >= 0.95 and raw["adherence"] >= 0.97
    assert set(KEYS) <= set(raw) and all(0.0 <= raw[k] <= 1.0 for k in KEYS)
    assert len(raw["per_video"]) == len(clips) and raw["summary_std"] >= 0.0
    decoded = [
        read_video(write_video(tmp_path / f"{i}.mp4", f, 8)) for i, (_, f) in enumerate(clips[:8])
    ]
    mp4 = score_batch(decoded, [s.caption() for s, _ in clips[:8]])
    assert mp4["summary"] >= 0.95


def test_noise_static_and_wrong_captions_score_near_chance(clips):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8) for _ in range(6)]
    assert score_batch(noise, [s.caption() for s, _ in clips[:6]])["summary"] < 0.05
    moving = [(s, f) for s, f in clips if all(o.motion != "still" for o in s.objects)]
    static = [np.repeat(f[:1], len(f), axis=0) for _, f in moving]
    res = score_batch(static, [s.caption() for s, _ in moving])
    assert res["summary"] < 0.05 and res["colour"] > 0.95  # right colour, no motion
    # chance: each video against the caption of a different composition
    wrong = []
    for i, (scene, frames) in enumerate(clips):
        other = next(
            s
            for s, _ in clips[i + 1 :] + clips[:i]
            if s.objects[0].triple != scene.objects[0].triple
        )
        wrong.append(score_video(frames, other.caption())["summary"])
    assert np.mean(wrong) < 0.15


def test_each_attribute_is_checked_on_its_own(clips):
    scene, frames = next(
        (s, f) for s, f in clips if len(s.objects) == 1 and s.objects[0].motion != "still"
    )
    obj = scene.objects[0]
    other_colour = next(c for c in COLOURS if c != obj.colour)
    other_shape = next(s for s in SHAPES if s != obj.shape)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[obj.motion]
    assert score_video(frames, _replace(scene, colour=other_colour))["colour"] == 0.0
    assert score_video(frames, _replace(scene, shape=other_shape))["shape"] < 0.2
    for motion in set(MOTIONS) - {obj.motion}:
        assert score_video(frames, _replace(scene, motion=motion))["direction"] < 0.1
    assert score_video(frames, _replace(scene, motion=opposite))["summary"] < 0.1


def test_shape_classifier_on_clean_masks():
    for shape in SHAPES:
        for r, cx in ((9.0, 30.3), (7.0, 20.8), (12.0, 33.0)):
            mask = coverage(shape, 64, 64, cx, 31.7, r) > 0.5
            assert classify_shape(mask) == shape


def test_quality_terms_react_to_jerk_flicker_and_blur():
    scene = Scene((ShapeObject("blue", "circle", "right"),), "plain")
    frames = render_scene(scene, 2)
    base = score_video(frames, scene)
    assert base["smoothness"] > 0.9 and base["flicker"] > 0.95 and base["sharpness"] > 0.95
    # jerky: frames shuffled in pairs -> the track jumps back and forth
    order = np.arange(len(frames))
    order[1:-1:2], order[2::2] = (
        order[2::2][: len(order[1:-1:2])],
        order[1:-1:2][: len(order[2::2])],
    )
    assert score_video(frames[order], scene)["smoothness"] < base["smoothness"] - 0.2
    # flicker: the whole background brightness jumps every frame
    flick = frames.astype(int) + np.where(np.arange(len(frames)) % 2, 12, -12)[:, None, None, None]
    assert score_video(np.clip(flick, 0, 255).astype(np.uint8), scene)["flicker"] < 0.2
    # blur: 5x5 box blur halves the edge energy
    f = frames.astype(np.float32)
    blur = sum(np.roll(np.roll(f, dy, 1), dx, 2) for dy in range(-2, 3) for dx in range(-2, 3)) / 25
    assert score_video(blur.round().astype(np.uint8), scene)["sharpness"] < 0.7


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        score_video(
            np.zeros((17, 64, 64, 3), np.float32), "a red circle moves left on a plain background"
        )
    with pytest.raises(ValueError, match="captions"):
        score_batch([np.zeros((17, 64, 64, 3), np.uint8)], [])
