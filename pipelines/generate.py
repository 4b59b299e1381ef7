"""`dcm generate`: write one video from a bundle or a distilled artifact.

    python -m pipelines.generate --prompt "a red circle moves left" --steps 4 --out out.mp4
    python -m pipelines.generate --model runs/x/artifact --prompt "..." --split 30 --out a.mp4
    python -m pipelines.generate --prompt "..." --teacher --out teacher.mp4

No Ray here: one process, one model, one file. Flags map onto config keys (`--model` ->
model.path, `--steps` -> sample.steps, sizes -> sample.*), so `--set` and `--config` work too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.args import add_common, model_or_default, resolve, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcm generate",
        description="Generate a video with the DCM experts (or the teacher) and write it as mp4/GIF.",
    )
    p.add_argument(
        "--model",
        help="bundle folder, distilled artifact, bundled:shapes-dcm (default, when built), bundled:shapes (the teacher) or hub id",
    )
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--steps", type=int, help="student steps (default sample.steps)")
    p.add_argument("--split", type=int, help="expert boundary index b (default: the model's)")
    p.add_argument("--teacher", action="store_true", help="sample the base model with guidance")
    p.add_argument(
        "--teacher-steps", type=int, help="teacher Euler steps (default sample.teacher_steps)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--frames", type=int, help="frames, k*4+1 (default data.num_frames)")
    p.add_argument("--height", type=int, help="height in pixels (default data.height)")
    p.add_argument("--width", type=int, help="width in pixels (default data.width)")
    p.add_argument("--out", required=True, help="output file, .mp4 or .gif")
    p.add_argument(
        "--base-model",
        help="for an artifact: its base model folder when the recorded one is not found",
    )
    p.add_argument(
        "--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'"
    )
    return add_common(p)


def _device(name: str) -> str:
    import torch

    from dcm.config import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(
        args,
        **{
            # no --model: the bundled distilled student (the teacher with --teacher)
            "model.path": args.model if args.teacher else model_or_default(args, args.model),
            "sample.steps": args.steps,
            "sample.teacher_steps": args.teacher_steps,
            "sample.num_frames": args.frames,
            "sample.height": args.height,
            "sample.width": args.width,
            "model.base": args.base_model,
        },
    )
    from dcm.config import ConfigError

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ConfigError(f"--out {out}: the file must end in .mp4 or .gif")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from dcm.generate import VideoGenerator
    from dcm.video import write_video

    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    from pipelines.registry import with_local_model

    cfg = with_local_model(cfg)  # models:/NAME/VERSION -> its exported folder
    gen = VideoGenerator.load(cfg.model.path, device=_device(args.device), cfg=cfg)
    frames = gen.generate(
        [args.prompt],
        steps=cfg.sample.steps,
        seed=args.seed,
        split=args.split,
        teacher=args.teacher,
        teacher_steps=cfg.sample.teacher_steps,
    )
    path = write_video(out, frames[0], fps=gen.fps)
    # what made the video (split, trained split, sizes, seed) next to it
    meta = out.with_name(out.name + ".json")
    meta.write_text(json.dumps({**gen.last_meta, "prompt": args.prompt}, indent=2) + "\n")
    t = gen.last_timings
    who = (
        gen.teacher_description(cfg.sample.teacher_steps)
        if args.teacher
        else f"{gen.source} experts"
    )
    f, h, w = frames.shape[1:4]
    print(path)
    print(
        f"{who}: {f}x{h}x{w}, {int(t['nfe'])} network evaluations; encode {t['encode_s']:.2f} s, "
        f"denoise {t['denoise_s']:.2f} s, decode {t['decode_s']:.2f} s, total {t['total_s']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
