"""`dcm tiny-model`: a random, tiny, real-architecture model folder to smoke-test a cluster.

    dcm tiny-model --backbone wan|hunyuanvideo --out DIR

Writes a diffusers-format folder (the real component classes, random weights, sized for a
CPU) that the stock ``WanPipeline`` / ``HunyuanVideoPipeline.from_pretrained`` loads, plus
``DIR/dcm-smoke.yaml``: the backbone's preset shrunk to 17x64x64 clips and a few training
steps, so every stage can be tried on it in seconds:

    dcm ingest  --config DIR/dcm-smoke.yaml --input VIDEOS --out LATENTS
    dcm distill --config DIR/dcm-smoke.yaml --data LATENTS --out runs
    dcm generate --model runs/<name>/detail/checkpoint_*/artifact --prompt "..." --out a.mp4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from dcm.config import ConfigError, load_config

PRESET = {"wan": "wan2.1-t2v-1.3b", "hunyuanvideo": "hunyuanvideo"}
SMOKE_CONFIG = "dcm-smoke.yaml"


def smoke_config(backbone: str, model_dir: Path) -> dict[str, Any]:
    """The backbone's preset at CPU size: 17x64x64 clips, 2 + 2 steps, batch 2, one worker."""
    return {
        "preset": PRESET[backbone],
        "name": f"tiny-{backbone}-smoke",
        "model": {"path": str(model_dir), "vae_spatial_factor": 8, "patch_size": [1, 2, 2]},
        "method": {"disc_hidden": 32, "tap_every": 1},
        "lora": {"rank": 4, "alpha": 8.0},
        "data": {"num_frames": 17, "height": 64, "width": 64},
        "ingest": {"encode_batch_size": 2, "rows_per_shard": 64},
        "train": {
            "steps_semantic": 2,
            "steps_detail": 2,
            "lr_semantic": 1e-4,
            "lr_detail": 1e-4,
            "global_batch": 2,
            "num_workers": 1,
            "zero_stage": 2,  # one worker has nothing to shard (the 13B preset says 3)
            "cpus_per_worker": 0.5,
            "activation_checkpointing": False,
            "checkpoint_every": 0,
            "val_prompts": 1,
            "log_every": 1,
        },
        "sample": {"steps": 4, "eval_steps": [4], "teacher_steps": 4, "seeds": [0]},
    }


def write_tiny_model(backbone: str, out: str | Path, seed: int = 0) -> Path:
    """Build the folder and its smoke config; return the folder."""
    from dcm.tiny import build_tiny_bundle

    if backbone not in PRESET:
        raise ConfigError(f"--backbone {backbone!r} is not allowed: choose wan or hunyuanvideo")
    folder = Path(out).expanduser().resolve()
    if (folder / "model_index.json").exists():
        raise ConfigError(f"--out {folder} already holds a model: choose an empty folder")
    # Wan's VAE compresses 8x in space (the shapes teacher's tiny default is 4x)
    dims = {"vae_spatial_factor": 8} if backbone == "wan" else {}
    build_tiny_bundle(folder, backbone=backbone, seed=seed, **dims)
    cfg = smoke_config(backbone, folder)
    text = yaml.safe_dump(cfg, sort_keys=False)
    file = folder / SMOKE_CONFIG
    file.write_text(f"# written by `dcm tiny-model --backbone {backbone}`\n{text}")
    load_config(file)  # the config must be valid as written
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dcm tiny-model", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, choices=sorted(PRESET))
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    folder = write_tiny_model(args.backbone, args.out, args.seed)
    print(folder)
    print(f"config: {folder / SMOKE_CONFIG}  (dcm ingest --config {folder / SMOKE_CONFIG} ...)")
    return 0


if __name__ == "__main__":
    from pipelines.args import run_main

    sys.exit(run_main(main))
