"""The shapes world: grammar and split, deterministic anti-aliased renders, dataset writer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from dcm.config import ConfigError
from dcm.shapes.dataset import iter_clips, read_manifest, write_dataset
from dcm.shapes.grammar import (
    COLOURS,
    MOTIONS,
    SHAPES,
    VOCAB,
    CaptionError,
    Scene,
    ShapeObject,
    all_captions,
    heldout_triples,
    parse_caption,
    sample_scene,
    triples,
)
from dcm.shapes.render import PALETTE, render_caption, render_scene
from dcm.video import read_video


def test_captions_round_trip_through_the_parser():
    for split in ("train", "heldout"):
        for caption in all_captions(split):
            assert parse_caption(caption).caption() == caption
            assert set(caption.split()) <= set(VOCAB)
    two = "a blue square stays still and a yellow triangle moves up on a checkered background"
    scene = parse_caption(two.upper() + ".")
    assert scene.objects == (
        ShapeObject("blue", "square", "still"),
        ShapeObject("yellow", "triangle", "up"),
    )
    assert scene.background == "checkered" and scene.caption() == two


@pytest.mark.parametrize(
    ("caption", "needle"),
    [
        ("a dog runs", "not in the shapes grammar"),
        ("a purple circle moves left on a plain background", "unknown colour 'purple'"),
        ("a red star moves left on a plain background", "unknown shape 'star'"),
        ("a red circle moves sideways on a plain background", "unknown motion 'sideways'"),
        ("a red circle moves left on a wavy background", "unknown background 'wavy'"),
        (
            "a red circle moves left and a red square moves up on a plain background",
            "different colours",
        ),
    ],
)
def test_bad_captions_name_the_problem(caption, needle):
    with pytest.raises(CaptionError, match=needle):
        parse_caption(caption)
    assert issubclass(CaptionError, ConfigError)


def test_heldout_split_is_disjoint_and_covers_every_word():
    train, held = set(triples("train")), set(triples("heldout"))
    assert held == heldout_triples() and len(held) == 12 and len(train) == 48
    assert not train & held
    # every colour, shape and motion is still seen in training, with every other attribute
    for c in COLOURS:
        assert {s for (cc, s, _) in train if cc == c} == set(SHAPES)
        assert {m for (cc, _, m) in train if cc == c} == set(MOTIONS)
    with pytest.raises(CaptionError, match="split"):
        triples("test")
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng, "heldout", two_prob=0.5)
        assert scene.objects[0].triple in held
        assert len({o.colour for o in scene.objects}) == len(scene.objects)


def test_render_is_deterministic_antialiased_and_inside_the_frame():
    caption = "a red circle moves right on a plain background"
    a, b = render_caption(caption, seed=3), render_caption(caption, seed=3)
    assert a.shape == (17, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_caption(caption, seed=4))
    red = np.asarray(PALETTE["red"])
    full = (np.abs(a.astype(int) - red).sum(-1) < 6).sum(axis=(1, 2))
    assert full.min() > 150  # the whole disk (radius 9) is visible in every frame
    # anti-aliasing: edge pixels lie strictly between background and colour
    between = (a[..., 0] > 60) & (a[..., 0] < 220)
    assert between.sum(axis=(1, 2)).min() > 10
    # the object stays clear of the border, and moves right
    xs = [np.nonzero(np.abs(f.astype(int) - red).sum(-1) < 6)[1].mean() for f in a]
    assert np.all(np.diff(xs) > 0) and 20 < xs[-1] - xs[0] < 28
    border = np.concatenate([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], axis=1)
    assert np.all(border == 52)


def test_two_objects_never_overlap_and_checkered_background_is_grey():
    scene = Scene(
        (ShapeObject("green", "square", "left"), ShapeObject("blue", "triangle", "right")),
        "checkered",
    )
    for seed in range(5):
        frames = render_scene(scene, seed)
        for colour in ("green", "blue"):
            mask = np.abs(frames.astype(int) - PALETTE[colour]).sum(-1) < 6
            assert mask.sum(axis=(1, 2)).min() > 80
    bg = render_scene(Scene((ShapeObject("red", "circle", "still"),), "checkered"), 0)[0]
    grey = bg[bg.max(-1) == bg.min(-1)]  # (N, 3) pixels without colour
    assert len(grey) > 0.8 * 64 * 64 and set(np.unique(grey).tolist()) == {40, 70}


def test_write_dataset_manifest_and_videos(tmp_path):
    manifest = write_dataset(tmp_path / "train", n=4, seed=1, split="train", two_prob=0.5)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [sorted(x) for x in lines] == [["caption", "path"]] * 4
    rows = read_manifest(manifest)
    for row, (scene, frames) in zip(rows, iter_clips(4, seed=1, two_prob=0.5), strict=True):
        assert row["caption"] == scene.caption()
        back = read_video(row["path"])
        assert back.shape == frames.shape
        assert np.abs(back.astype(int) - frames).mean() < 3
    held = write_dataset(tmp_path / "held", n=6, seed=1, split="heldout", two_prob=0.0)
    for row in read_manifest(held):
        assert parse_caption(row["caption"]).objects[0].triple in heldout_triples()
    # same seed, same data; the splits never share a clip
    again = write_dataset(tmp_path / "again", n=4, seed=1, split="train", two_prob=0.5)
    assert again.read_text() == manifest.read_text()


def test_reseed_keeps_the_scenes_and_changes_the_renders():
    """iter_clips(reseed=r): the same scenes (captions) as reseed 0, rendered otherwise."""
    base = list(iter_clips(3, seed=4, split="heldout"))
    again = list(iter_clips(3, seed=4, split="heldout", reseed=1))
    assert [s.caption() for s, _ in again] == [s.caption() for s, _ in base]
    assert all(not np.array_equal(a, b) for (_, a), (_, b) in zip(base, again, strict=True))
    same = list(iter_clips(3, seed=4, split="heldout", reseed=0))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(base, same, strict=True))
