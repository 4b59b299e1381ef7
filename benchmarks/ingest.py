"""Ingest throughput: clips/s of the Ray Data pipeline and its decode/encode time split,
against the VAE's own encode throughput measured in the same run, and the parquet mode's
rows/s, MB/s and bytes per row.

    python benchmarks/ingest.py                 # CPU: shapes bundle, 17 x 64 x 64 clips
    python benchmarks/ingest.py --tiny wan      # CPU: a `dcm tiny-model --backbone wan` folder
    python benchmarks/ingest.py --gpu           # GPU: full-size Wan2.1 VAE (random weights),
                                                #      81 x 480 x 832 clips from 720p sources

Two passes over the same sources. Online mode (``stream_latents``: decode tasks -> encoder
actor pool -> the driver) times the pipeline without storage. Parquet mode (``run_ingest``
into a fresh folder: the writer tasks write the shards) gives:

- parquet_rows_per_s / parquet_mb_per_s: clips and shard bytes written per second of the
  run (cluster start excluded, model loading included);
- row_bytes: one latent row in memory (float32 latents + text + mask [+ pooled]);
  disk_bytes_per_row: shard bytes on disk per row (``ingest.dtype``, zstd);
- writer_pids: the processes that wrote the shards (never the driver).

Online figures:

- vae_clips_per_s: the bundle's ``encode_video`` alone on ready pixel tensors (same batch
  size, device and dtype as the actors), after a warm-up batch;
- pipeline_clips_per_s: clips encoded per second from the end of the encoders' first batch
  to the end of their last (steady state: warm-up excluded, but every wait for decoded
  clips counted); end_to_end_clips_per_s also counts cluster, actor and model start-up;
- decode_task_s / encode_task_s: seconds spent inside decode tasks / encoder actor calls;
- ratio = pipeline / vae; the GPU target is >= 0.8.

The GPU bundle has the full-size Wan VAE but a tiny text encoder (UMT5-XXL is not part of
the target); the text encoder's time is included in the actors' encode time regardless.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.ingest")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import machine  # noqa: E402


def _online_skipped() -> dict[str, float]:
    nan = float("nan")
    keys = ("end_to_end_s", "end_to_end_clips_per_s", "pipeline_clips_per_s")
    return {**dict.fromkeys(keys, nan), "clips": 0, "decode_task_s": nan, "encode_task_s": nan,
            "row_bytes": 0, "inputs": 0, "rejects": 0}  # fmt: skip


def make_sources(folder: Path, count: int, frames: int, height: int, width: int, fps: int) -> Path:
    """``count`` synthetic mp4s (ffmpeg testsrc2, each a different start time) + captions.jsonl."""
    import imageio_ffmpeg

    folder.mkdir(parents=True, exist_ok=True)
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    lines = []
    for i in range(count):
        path = folder / f"src{i:03d}.mp4"
        if not path.is_file():
            subprocess.run(
                [
                    ffmpeg,
                    "-y",
                    "-loglevel",
                    "error",
                    "-f",
                    "lavfi",
                    "-i",
                    f"testsrc2=size={width}x{height}:rate={fps}",
                    "-ss",
                    str(i % 7),
                    "-frames:v",
                    str(frames),
                    "-c:v",
                    "libx264",
                    "-preset",
                    "veryfast",
                    "-pix_fmt",
                    "yuv420p",
                    str(path),
                ],
                check=True,
            )
        lines.append(json.dumps({"path": path.name, "caption": f"a test pattern number {i}"}))
    manifest = folder / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def gpu_bundle(folder: Path) -> Path:
    """A tiny bundle whose VAE is replaced by the full-size Wan2.1 VAE with random weights."""
    from diffusers import AutoencoderKLWan

    from dcm.tiny import build_tiny_bundle

    if (folder / "vae" / "config.json").is_file() and (folder / ".full_vae").is_file():
        return folder
    build_tiny_bundle(folder)
    torch.manual_seed(0)
    AutoencoderKLWan().save_pretrained(folder / "vae")  # the Wan2.1 defaults: z_dim 16
    (folder / ".full_vae").write_text("AutoencoderKLWan() defaults, random weights\n")
    return folder


def vae_throughput(cfg, batch: int, reps: int) -> dict[str, float]:
    """The VAE's own encode throughput (clips/s) on random pixels, as the actors run it."""

    from dcm.bundle import load_bundle

    gpu = cfg.ingest.actor_gpus > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    bundle = load_bundle(cfg.model.path, device=device, dtype=dtype, components=("vae",))
    d = cfg.data
    pixels = torch.rand(batch, 3, d.num_frames, d.height, d.width, device=device) * 2 - 1
    gen = torch.Generator(device=device).manual_seed(0)

    def once() -> None:
        bundle.encode_video(pixels.to(dtype), cfg.data.posterior, gen)
        if gpu:
            torch.cuda.synchronize()

    once()  # warm-up (cuDNN autotune, allocator)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    seconds = (time.perf_counter() - t0) / reps
    out = {"vae_s_per_batch": seconds, "vae_clips_per_s": batch / seconds}
    if gpu:
        out["vae_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def pipeline_throughput(cfg) -> dict[str, float]:
    """Consume the online stream once; steady-state and end-to-end clips/s, time split."""
    from pipelines.ingest import stream_latents, stream_summary

    t0 = time.perf_counter()
    ds = stream_latents(cfg)
    clips, row_bytes = 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clips += len(batch["clip"])
        if not row_bytes:  # what one latent row weighs as stored (float32 latents + text)
            tensors = ("latents", "text", "text_mask", "pooled")
            row_bytes = sum(batch[k].nbytes for k in tensors if k in batch) // len(batch["clip"])
    end = time.perf_counter()
    summary = stream_summary(ds)
    steady = summary["steady_clips_per_s"]  # encoder-side window, first batch excluded
    return {
        "clips": clips,
        "inputs": summary["inputs"],
        "rejects": len(summary["rejects"]),
        "end_to_end_s": end - t0,
        "end_to_end_clips_per_s": clips / (end - t0),
        "pipeline_clips_per_s": steady,
        "decode_task_s": summary["times"]["decode"],
        "encode_task_s": summary["times"]["encode"],
        "row_bytes": row_bytes,
    }


def parquet_throughput(cfg, out: Path) -> dict[str, float]:
    """One ``run_ingest`` into a fresh folder: rows/s, MB/s and bytes per row on disk."""
    import json as _json
    import shutil

    from dcm import latents as lt
    from pipelines.ingest import STATE_DIR, run_ingest

    shutil.rmtree(out, ignore_errors=True)
    summary = run_ingest(cfg.replace(**{"ingest.out": str(out)}))
    shards = sorted(out.glob("shard-*.parquet"))
    disk = sum(p.stat().st_size for p in shards)
    pids = {
        f["pid"]
        for p in (out / STATE_DIR).glob("done-*.json")
        for f in _json.loads(p.read_text())["files"]
    }
    m = lt.read_manifest(out)
    floats = math.prod(m.latent_shape) + math.prod(m.text_shape) + m.pooled_dim
    return {
        "memory_bytes_per_row": 4 * floats + m.text_shape[0],  # float32 tensors + int8 mask
        "parquet_rows": summary.clips,
        "parquet_s": summary.seconds,
        "parquet_rows_per_s": summary.clips / summary.seconds,
        "parquet_mb_per_s": disk / 1e6 / summary.seconds,
        "disk_bytes_per_row": disk / max(summary.clips, 1),
        "shards": len(shards),
        "writer_pids": sorted(pids),
        "driver_pid": os.getpid(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="full-size Wan VAE at 81x480x832 on a GPU")
    p.add_argument(
        "--full-vae",
        action="store_true",
        help="the --gpu model and sources on CPU (small --frames/--height/--width)",
    )
    p.add_argument("--videos", type=int, default=0, help="source videos (default 24 CPU / 24 GPU)")
    p.add_argument("--frames", type=int, default=0, help="clip frames (4k+1)")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--batch", type=int, default=0, help="encode batch size")
    p.add_argument("--actors", type=int, default=1, help="encoder actors")
    p.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray cluster (0 = all)")
    p.add_argument("--reps", type=int, default=3, help="timed VAE-only batches")
    p.add_argument("--model", default="", help="bundle (CPU default: bundled:shapes or a tiny one)")
    p.add_argument(
        "--tiny",
        choices=("wan", "hunyuanvideo"),
        default="",
        help="CPU: a `dcm tiny-model` folder of this backbone with its smoke config",
    )
    p.add_argument("--dtype", default="", help="ingest.dtype: float32 (default) or bfloat16")
    p.add_argument("--rows-per-shard", type=int, default=0, help="ingest.rows_per_shard")
    p.add_argument("--skip-online", action="store_true", help="parquet mode only")
    p.add_argument("--work", default="", help="folder for sources and bundles (default: temp)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)

    from dcm.bundle import BundleError, resolve_model_path
    from dcm.config import load_config

    work = Path(args.work or tempfile.mkdtemp(prefix="dcm-bench-ingest-"))
    config_file = None
    if args.gpu and not torch.cuda.is_available():
        log.error("--gpu needs a CUDA device (use --full-vae to run that model on CPU)")
        return 2
    if args.gpu or args.full_vae:
        frames, height, width = args.frames or 81, args.height or 480, args.width or 832
        src_h, src_w, src_frames = 720, 1280, frames + 16
        model = args.model or str(gpu_bundle(work / "bundle-full-vae"))
        batch, videos = args.batch or 1, args.videos or 24
        device = {
            "ingest.actor_gpus": 1.0,
            "ingest.actor_cpus": 2.0,
            "ingest.decode_cpus": 1.0,
            "ray.object_store_mb": 16384,
        }
        if not args.gpu:  # --full-vae on CPU: same model, CPU resources
            src_h, src_w = 2 * height, 2 * width
            device = {"ingest.actor_gpus": 0.0, "ingest.actor_cpus": 0.5, "ingest.decode_cpus": 0.5}
    else:
        frames, height, width = args.frames or 17, args.height or 64, args.width or 64
        src_h, src_w, src_frames = 96, 128, 2 * frames
        model = args.model
        if args.tiny:
            from pipelines.tiny_model import SMOKE_CONFIG, write_tiny_model

            folder = work / f"tiny-{args.tiny}"
            if not (folder / SMOKE_CONFIG).is_file():
                write_tiny_model(args.tiny, folder)
            model, config_file = str(folder), folder / SMOKE_CONFIG
        if not model:
            try:
                resolve_model_path("bundled:shapes")
                model = "bundled:shapes"
            except BundleError:  # the shapes teacher is not built here: a tiny random one
                from dcm.tiny import build_tiny_bundle

                model = str(build_tiny_bundle(work / "bundle-tiny"))
        batch, videos = args.batch or 2, args.videos or 24
        device = {"ingest.actor_gpus": 0.0, "ingest.actor_cpus": 0.5, "ingest.decode_cpus": 0.5}
    manifest = make_sources(work / f"sources-{src_h}x{src_w}", videos, src_frames, src_h, src_w, 16)
    overrides = {
        "model.path": model,
        "data.input": str(manifest),
        "data.num_frames": frames,
        "data.height": height,
        "data.width": width,
        "ingest.encode_batch_size": batch,
        "ingest.encode_actors": args.actors,
        "ray.dashboard": False,
        "ray.num_cpus": args.cpus or (os.cpu_count() or 2),
        **device,
    }
    if args.dtype:
        overrides["ingest.dtype"] = args.dtype
    if args.rows_per_shard:
        overrides["ingest.rows_per_shard"] = args.rows_per_shard
    preset = "wan2.1-t2v-1.3b" if args.gpu or args.full_vae else "shapes-tiny"
    if config_file is not None:
        preset = None  # the tiny folder's smoke config names its preset
    cfg = load_config(config_file, preset, [f"{k}={v}" for k, v in overrides.items()])
    log.info(
        "%d sources %dx%dx%d -> clips %dx%dx%d, batch %d, model %s",
        *(videos, src_frames, src_h, src_w, frames, height, width, batch, model),
    )

    vae = vae_throughput(cfg, batch, args.reps)
    log.info("VAE alone: %.3f clips/s", vae["vae_clips_per_s"])
    from pipelines.cluster import init_ray, shutdown

    ctx = init_ray(cfg.ray, model=cfg.model.path)
    try:
        pipe = _online_skipped() if args.skip_online else pipeline_throughput(cfg)
        store = parquet_throughput(cfg, work / "latents")
    finally:
        shutdown(ctx)
    ratio = pipe["pipeline_clips_per_s"] / vae["vae_clips_per_s"]
    result = {
        "mode": "gpu" if args.gpu else "cpu",
        "frames": frames,
        "height": height,
        "width": width,
        "batch": batch,
        "videos": videos,
        **vae,
        **pipe,
        **store,
        "ratio_vs_vae": ratio,
        "target": 0.8 if args.gpu else None,
        "backbone": cfg.model.backbone,
        "dtype": cfg.ingest.dtype,
        "machine": machine(torch.device("cuda" if args.gpu else "cpu"), load=True),
    }
    busy = pipe["encode_task_s"] / max(pipe["end_to_end_s"] * args.actors, 1e-9)
    log.info(
        "online: %.3f clips/s steady, %.3f end to end (%d clips, %.1f s); VAE alone %.3f "
        "clips/s; ratio %.2f%s",
        *(pipe["pipeline_clips_per_s"], pipe["end_to_end_clips_per_s"], pipe["clips"]),
        *(pipe["end_to_end_s"], vae["vae_clips_per_s"], ratio),
        " (target >= 0.80)" if args.gpu else "",
    )
    log.info(
        "time split: decode %.1f task-s, encode %.1f actor-s (encoder busy %.0f%% of the wall)",
        pipe["decode_task_s"], pipe["encode_task_s"], 100 * busy,
    )  # fmt: skip
    log.info(
        "parquet: %d rows in %.1f s = %.3f rows/s, %.3f MB/s; %.0f bytes per row in memory, "
        "%.0f on disk (%s); %d shards written by pids %s (driver %d)",
        *(store["parquet_rows"], store["parquet_s"], store["parquet_rows_per_s"]),
        *(store["parquet_mb_per_s"], store["memory_bytes_per_row"], store["disk_bytes_per_row"]),
        *(result["dtype"], store["shards"], store["writer_pids"], store["driver_pid"]),
    )
    print(json.dumps(result, indent=2))  # the result, for pipes
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if (not args.gpu or ratio >= 0.8) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
