"""Draw the README's picture of the bundled teacher: ground truth above teacher, per prompt.

    python docs/teacher_sheet.py [--model bundled:shapes] [--prompts 4] [--out docs/images]

Held-out captions (compositions never seen in training), 50 Euler steps with the preset's
CFG, seed 0. Writes teacher.png (one row per video, 8 frames) and teacher.gif (animated).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from dcm.config import load_config
from dcm.generate import VideoGenerator
from dcm.shapes.grammar import all_captions, parse_caption
from dcm.shapes.render import render_scene
from dcm.video import contact_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--out", default=str(Path(__file__).parent / "images"))
    args = parser.parse_args()
    cfg = load_config(preset="shapes-tiny")
    d = cfg.data
    captions = all_captions("heldout")
    random.Random(0).shuffle(captions)  # a fixed mix of shapes, colours and motions
    captions = captions[: args.prompts]
    gen = VideoGenerator.load(args.model, cfg=cfg)
    videos = []
    for caption in captions:
        truth = render_scene(parse_caption(caption), 0, d.num_frames, d.height, d.width)
        made = gen.generate([caption], seed=0, teacher=True, teacher_steps=50)[0]
        videos += [truth, made]
        print(f"{caption}: ground truth row, then teacher row")
    out = Path(args.out)
    contact_sheet(videos, out / "teacher.png", columns=8)
    contact_sheet(videos, out / "teacher.gif", columns=2, fps=cfg.model.fps)
    print(f"wrote {out / 'teacher.png'} and {out / 'teacher.gif'}")


if __name__ == "__main__":
    main()
