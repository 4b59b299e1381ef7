"""The synthetic shapes world: the one place this project can measure video quality offline.

One or two coloured shapes move (or stay still) over a plain or checkered grey background:

- ``grammar``: captions, their parser and the train / held-out composition split;
- ``render``: deterministic anti-aliased frames from a caption and a seed;
- ``dataset``: mp4 + ``captions.jsonl`` datasets in the format ingest reads;
- ``metrics``: prompt adherence and quality scored from decoded pixels alone;
- ``bundle/``: the tiny teacher (diffusers format) trained by ``pipelines/pretrain.py``,
  loaded as ``bundled:shapes``.
"""

from dcm.shapes.dataset import iter_clips, write_dataset
from dcm.shapes.grammar import Scene, ShapeObject, all_captions, parse_caption
from dcm.shapes.metrics import score_batch, score_video
from dcm.shapes.render import render_caption, render_scene

__all__ = [
    "Scene",
    "ShapeObject",
    "all_captions",
    "iter_clips",
    "parse_caption",
    "render_caption",
    "render_scene",
    "score_batch",
    "score_video",
    "write_dataset",
]
