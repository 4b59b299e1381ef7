"""Captions of the shapes world: a tiny grammar, its parser, and the train / held-out split.

A caption names one or two objects (colour, shape, motion) and the background:

    "a red circle moves left on a plain background"
    "a blue square stays still and a yellow triangle moves up on a checkered background"

Objects of one caption have different colours, so the metrics can find each object by colour.
The held-out split is a fixed set of (colour, shape, motion) triples that never appear in a
training caption; every colour, shape and motion still appears in training with the others.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dcm.config import ConfigError

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
BACKGROUNDS: tuple[str, ...] = ("plain", "checkered")
SPLITS: tuple[str, ...] = ("train", "heldout")

# Every word a caption can contain (the word-level tokenizer's vocabulary).
VOCAB: tuple[str, ...] = (
    ("a", "moves", "stays", "and", "on", "background") + COLOURS + SHAPES + MOTIONS + BACKGROUNDS
)


class CaptionError(ConfigError):
    """A caption is not a sentence of the shapes grammar."""


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    motion: str  # one of MOTIONS

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    def phrase(self) -> str:
        verb = "stays still" if self.motion == "still" else f"moves {self.motion}"
        return f"a {self.colour} {self.shape} {verb}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str

    def caption(self) -> str:
        return (
            " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"
        )


def heldout_triples() -> frozenset[tuple[str, str, str]]:
    """12 of the 60 (colour, shape, motion) triples: one motion per (colour, shape) pair,
    cycling so each motion is held out for 2-3 pairs and each colour/shape keeps 4 motions."""
    out = set()
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            out.add((colour, shape, MOTIONS[(ci + 2 * si) % len(MOTIONS)]))
    return frozenset(out)


def triples(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, motion) triples allowed in `split` ('train' or 'heldout')."""
    if split not in SPLITS:
        raise CaptionError(f"split={split!r} is not allowed: choose 'train' or 'heldout'")
    held = heldout_triples()
    every = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    return [t for t in every if (t in held) == (split == "heldout")]


def sample_scene(rng: random.Random, split: str = "train", two_prob: float = 0.0) -> Scene:
    """One random scene of `split`; with probability `two_prob` it holds two objects.

    In a held-out two-object scene the first object is a held-out triple and the second any
    triple of a different colour (a held-out composition either way).
    """
    pool = triples(split)
    first = ShapeObject(*rng.choice(pool))
    objects = [first]
    if rng.random() < two_prob:
        second_pool = [t for t in triples("train") if t[0] != first.colour]
        objects.append(ShapeObject(*rng.choice(second_pool)))
    return Scene(tuple(objects), rng.choice(BACKGROUNDS))


def all_captions(split: str) -> list[str]:
    """Every one-object caption of `split` (both backgrounds), in a fixed order."""
    return [Scene((ShapeObject(*t),), bg).caption() for t in triples(split) for bg in BACKGROUNDS]


_OBJECT = r"a (\w+) (\w+) (?:moves (\w+)|stays (still))"
_CAPTION = re.compile(rf"^{_OBJECT}(?: and {_OBJECT})? on a (\w+) background$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; CaptionError names what does not fit the grammar."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    match = _CAPTION.match(text)
    if not match:
        raise CaptionError(
            f"caption {caption!r} is not in the shapes grammar: write e.g. "
            f"'a red circle moves left on a plain background'"
        )
    groups = match.groups()
    objects = []
    for colour, shape, moving, still in (groups[0:4], groups[4:8]):
        if colour is None:
            continue
        motion = moving or still
        for word, allowed, what in (
            (colour, COLOURS, "colour"),
            (shape, SHAPES, "shape"),
            (motion, MOTIONS, "motion"),
        ):
            if word not in allowed:
                raise CaptionError(
                    f"caption {caption!r}: unknown {what} '{word}' (choose from {', '.join(allowed)})"
                )
        objects.append(ShapeObject(colour, shape, motion))
    background = groups[8]
    if background not in BACKGROUNDS:
        raise CaptionError(
            f"caption {caption!r}: unknown background '{background}' "
            f"(choose from {', '.join(BACKGROUNDS)})"
        )
    if len(objects) == 2 and objects[0].colour == objects[1].colour:
        raise CaptionError(f"caption {caption!r}: the two objects must have different colours")
    return Scene(tuple(objects), background)
