"""The per-worker Ray Train loop of one distillation stage (METHOD.md sections 4-6).

``train_loop(config)`` runs on every TorchTrainer worker. Top to bottom:

1. device and precision policy: bf16 + NCCL on GPU, fp32 + gloo on CPU (the maths in
   ``dcm.steps`` knows neither);
2. models: the frozen teacher (loaded once, bf16 on GPU, never given to an optimiser), the
   student ``DualExpert`` (stage 1: a copy of the teacher, all weights train; stage 2: the
   stage-1 artifact with the detail expert enabled) and, in stage 2, the discriminator;
3. optimisers: the student in a DeepSpeed engine (ZeRO 2 by default, 3 and CPU offload by
   config, clipping, gradient accumulation, torch AdamW so nothing JIT-builds);
4. resume from ``ray.train.get_checkpoint()`` (step, optimiser, data position, RNG);
5. the loop: per optimiser step ``grad_accum`` micro-batches from this worker's shard,
   the stage's step function, backward + step; log, validate, checkpoint on cadence.

The discriminator is a plain torch module with its own torch AdamW (betas (0, 0.999),
METHOD.md section 6), replicated on every worker; its gradients are averaged with one
all_reduce per optimiser step. A second DeepSpeed engine would attach ZeRO gradient hooks
to it, and the student's backward must not trigger those; the heads are small, so
replication costs little memory.
"""

from __future__ import annotations

import copy
import math
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dcm.backbones.base import Backbone, Cond, cast_keeping_fp32, fp32_modules, make_backbone
from dcm.bundle import load_bundle
from dcm.config import Config, ConfigError, from_dict
from dcm.discriminator import Discriminator
from dcm.ema import ema_update
from dcm.evaluation import is_shapes
from dcm.experts import DualExpert
from dcm.files import is_remote
from dcm.guidance import with_embedded_guidance
from dcm.schedule import Schedule
from dcm.steps import DetailStep, SemanticStep
from dcm.teacher_sampler import TeacherSampler
from pipelines.checkpoints import (
    ARTIFACT,
    TrainState,
    check_detail_start,
    restore,
    write_checkpoint,
)
from pipelines.tracking import RunLogger

STAGES = ("semantic", "detail")


# ---------------------------------------------------------------- policies
def deepspeed_config(cfg: Config, micro_batch: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of the student engine (ZeRO stage, offload, precision)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload and t.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if t.offload and t.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu},  # fp32 master weights, bf16 compute (METHOD.md 5)
        # our torch AdamW (no FusedAdam / CPUAdam JIT build), also with offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _bundle_path(path: str) -> str:
    """What the artifact records as its bundle: 'bundled:..' as is, local folders absolute."""
    if path.startswith("bundled:") or is_remote(path) or not Path(path).exists():
        return path
    return str(Path(path).resolve())


# ---------------------------------------------------------------- models
def build_student(cfg: Config, stage: str, teacher_transformer: nn.Module, init: Any) -> DualExpert:
    """Stage 1: a copy of the teacher; stage 2: the stage-1 artifact + the detail expert."""
    if stage == "semantic":
        return DualExpert(copy.deepcopy(teacher_transformer))
    if init is not None:  # the semantic stage's ray.train.Checkpoint
        with init.as_directory() as folder:
            student = DualExpert.load_artifact(Path(folder) / ARTIFACT)
        import pyarrow.fs

        # a temporary copy (remote storage) is gone now: no fp32 source for frozen weights
        if not isinstance(init.filesystem, pyarrow.fs.LocalFileSystem):
            student.frozen_source = None
    else:
        check_detail_start(stage, cfg.train.init_from)
        student = DualExpert.load_artifact(cfg.train.init_from)
    if student.has_detail:
        raise ConfigError("the detail stage must start from a semantic-only artifact")
    student.enable_detail_expert(cfg.lora)
    return student


# ---------------------------------------------------------------- data
def _cond(text: Any, mask: Any, device: torch.device, pooled: Any = None) -> Cond:
    return Cond(
        text=torch.as_tensor(np.asarray(text, np.float32)).to(device),  # (B, L, D)
        mask=torch.as_tensor(np.asarray(mask)).long().to(device),  # (B, L)
        # (B, P) HunyuanVideo's pooled CLIP text; the steps add the embedded guidance
        pooled=None
        if pooled is None
        else torch.as_tensor(np.asarray(pooled, np.float32)).to(device),
    )


def micro_batches(shard: Any, size: int, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, numpy rows) forever, cycling epochs; skips ``skip`` batches
    of the first epoch (the data position of a resumed run)."""
    while True:
        n = 0
        for rows in shard.iter_batches(batch_size=size, batch_format="numpy", drop_last=True):
            if n >= skip:
                yield epoch, n, rows
            n += 1
        if n == 0:
            raise ConfigError(
                f"a worker's data shard holds fewer than train.global_batch / workers = {size} "
                "clips: ingest more clips or lower train.global_batch"
            )
        epoch, skip = epoch + 1, 0


def to_batch(rows: dict[str, np.ndarray], bundle: Any, null: Cond, device: torch.device) -> dict:
    """Latent rows -> the step functions' batch (normalised latents, Cond, null Cond)."""
    raw = torch.as_tensor(np.asarray(rows["latents"], np.float32))  # (B, C, T, h, w) RAW
    return {
        "x0": bundle.normalize(raw).to(device),
        "cond": _cond(rows["text"], rows["text_mask"], device, rows.get("pooled")),
        "null_cond": null,
    }


# ---------------------------------------------------------------- validation
class Validator:
    """Quality of the student on fixed prompts and seeds, by the documented metric.

    Every rank samples (ZeRO-3 needs all ranks in each forward) with dcm's sampler at each
    step count of sample.eval_steps + sample.steps; rank 0 decodes, scores, writes mp4 + GIF
    and logs them. ``val/score`` (the value at sample.steps, higher is better) is what
    ``train.checkpoint_metric`` ranks checkpoints by (``validation_metric`` names it):

    - shapes world (every prompt a caption of its grammar): the shapes metrics' summary of
      the decoded videos (``dcm/shapes/metrics.py``);
    - any other prompts: fidelity to the teacher, the PSNR in dB of the decoded student video
      against the decoded video of the teacher on its OWN scheduler (``dcm.teacher_sampler``,
      sample.teacher_steps + guidance) from the same noise; SSIM is logged next to it.

    The train loop runs it at step 0 too (the untrained student), so every curve starts
    there and the final student can be compared with where it started.
    """

    def __init__(self, cfg: Config, val: dict[str, Any], device: torch.device, rank: int) -> None:
        self.cfg, self.device, self.rank = cfg, device, rank
        self.captions: list[str] = list(val["captions"])
        self.cond = _cond(val["text"], val["mask"], device, val.get("pooled"))
        self.null = _cond(val["null_text"], val["null_mask"], device, val.get("null_pooled"))
        # the student samples with the embedded guidance it was trained with (HunyuanVideo)
        self.student_cond = with_embedded_guidance(self.cond, cfg.method, len(self.captions))
        self.shape = tuple(int(s) for s in val["latent_shape"])  # (C, T, h, w)
        self.schedule = Schedule.from_config(cfg.method)
        self.counts = sorted({*cfg.sample.eval_steps, cfg.sample.steps})
        self.shapes_world = is_shapes(self.captions)
        self.decoder = None
        if rank == 0:
            self.decoder = load_bundle(cfg.model.path, device=device, components=("vae",))
        self.teacher_sampler = TeacherSampler.from_bundle(cfg.model.path, self.schedule)
        self._teacher_videos: dict[int, np.ndarray] = {}  # seed -> (P, F, H, W, 3) uint8

    def _noise(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((len(self.captions), *self.shape), generator=g).to(self.device)

    def _sigmas(self, n: int) -> list[float]:
        preset = self.cfg.sample.sigma_preset if n == self.cfg.sample.steps else ""
        return self.schedule.sampling_sigmas(n, preset)

    @torch.no_grad()
    def __call__(self, model: Any, teacher: Backbone, step: int, logger: RunLogger) -> dict:
        from dcm.generate import to_uint8
        from dcm.sampler import sample

        metrics: dict[str, float] = {}
        out = Path(tempfile.mkdtemp(prefix="dcm-val-"))
        for n in self.counts:
            videos = []
            for seed in self.cfg.sample.seeds:
                with _autocast(self.device):
                    x = sample(
                        model, self._noise(seed), self.student_cond, self._sigmas(n), self.schedule
                    )
                if self.rank == 0:
                    videos.append(to_uint8(self.decoder.decode(x)))  # (P, F, H, W, 3)
            if self.rank != 0:
                continue
            scores = self._score(videos, teacher)
            metrics.update({f"val/{k}_{n}steps": v for k, v in scores.items()})
            if n == self.cfg.sample.steps:
                metrics.update({f"val/{k}": v for k, v in scores.items()})
            self._write(out, n, videos)
        if self.rank == 0:
            logger.log_artifacts(out, f"validation/step_{step:06d}")
        _rmtree(out)
        return metrics

    def _score(self, videos: list[np.ndarray], teacher: Backbone) -> dict[str, float]:
        if self.shapes_world:
            from dcm.shapes.metrics import score_batch

            flat = [v for batch in videos for v in batch]
            res = score_batch(flat, self.captions * len(videos))
            return {"score": float(res["summary"]), "adherence": float(res["adherence"]),
                    "quality": float(res["quality"])}  # fmt: skip
        from dcm.video_metrics import psnr, ssim

        psnrs, ssims = [], []
        for seed, batch in zip(self.cfg.sample.seeds, videos, strict=True):
            ref = self.teacher_video(seed, teacher)
            psnrs += [psnr(v, r) for v, r in zip(batch, ref, strict=True)]
            ssims += [ssim(v, r) for v, r in zip(batch, ref, strict=True)]
        return {"score": float(np.mean(psnrs)), "psnr": float(np.mean(psnrs)),
                "ssim": float(np.mean(ssims))}  # fmt: skip

    def teacher_video(self, seed: int, teacher: Backbone) -> np.ndarray:
        """The teacher's decoded videos (P, F, H, W, 3) for ``seed``: its own scheduler at
        sample.teacher_steps with guidance, the same noise as the student (cached)."""
        from dcm.generate import to_uint8

        if seed not in self._teacher_videos:
            s = self.cfg.sample
            with _autocast(self.device):
                z = self.teacher_sampler.sample(
                    teacher, self._noise(seed), self.cond, self.null, s.teacher_steps,
                    self.cfg.method,
                )  # fmt: skip
            self._teacher_videos[seed] = to_uint8(self.decoder.decode(z))
        return self._teacher_videos[seed]

    def _write(self, out: Path, n: int, videos: list[np.ndarray]) -> None:
        from dcm.video import write_video

        fps = self.cfg.model.fps
        for seed, batch in zip(self.cfg.sample.seeds, videos, strict=True):
            for i, frames in enumerate(batch):
                write_video(out / f"prompt{i}_seed{seed}_{n}steps.mp4", frames, fps)
        write_video(out / f"prompt0_seed{self.cfg.sample.seeds[0]}_{n}steps.gif", videos[0][0], fps)


def validation_metric(cfg: Config, captions: list[str]) -> str:
    """What ``val/score`` measures for these validation prompts (logged with the run)."""
    if is_shapes(captions):
        return "shapes summary of the decoded videos (dcm/shapes/metrics.py), higher is better"
    grid = Schedule.from_config(cfg.method)
    teacher = TeacherSampler.from_bundle(cfg.model.path, grid).describe(
        cfg.sample.teacher_steps, cfg.method
    )
    return f"PSNR dB of decoded frames to the {teacher} (same noise), higher is better"


def record_selection(
    logger: RunLogger, cfg: Config, stage: str, captions: list[str], final: dict, chosen: dict
) -> bool | None:
    """After a stage: log how its checkpoint was chosen and flag a student that ends no
    better than it started. Returns whether the final student beats step 0 (None: unknown).

    MLflow tags: ``dcm_selection_metric`` (train.checkpoint_metric), ``dcm_val_score`` (what
    it measures), ``dcm_best_step`` (the exported checkpoint), ``dcm_beats_step0`` and, for a
    final val/score at or below the step-0 score, ``dcm_quality_flag`` plus a warning line.
    """
    beats = final.get("val/beats_step0")
    verdict = None if beats is None else bool(beats)
    tags = {
        "dcm_selection_metric": cfg.train.checkpoint_metric,
        "dcm_val_score": validation_metric(cfg, captions),
        "dcm_best_step": str(int(chosen.get("step", 0))),
        "dcm_beats_step0": "unknown" if verdict is None else str(verdict).lower(),
    }
    if verdict is False:
        tags["dcm_quality_flag"] = "final student does not beat the untrained student (step 0)"
        print(
            f"[dcm distill {stage}] WARNING: the final student's val/score "
            f"{final.get('val/score', float('nan')):.4f} does not beat the untrained student's "
            f"{final.get('val/score_step0', float('nan')):.4f} (step 0); flagged in MLflow "
            "(tag dcm_quality_flag)", file=sys.stderr, flush=True,
        )  # fmt: skip
    if logger.enabled:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=logger.uri)
        for key, val in tags.items():
            client.set_tag(logger.run_id, key, val)
    return verdict


def step0_verdict(metrics: dict[str, float], baseline: float | None) -> dict[str, float]:
    """``val/score_step0`` and, with a score, ``val/beats_step0`` (1 when the student now
    scores above the untrained student of step 0, else 0)."""
    if baseline is None:
        return {}
    out = {"val/score_step0": float(baseline)}
    if "val/score" in metrics:
        out["val/beats_step0"] = float(metrics["val/score"] > baseline)
    return out


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- helpers of the loop
def _average_grads(params: list[nn.Parameter], world: int) -> None:
    """All-reduce (mean) the discriminator's gradients across workers, in one buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _mean_across(values: dict[str, float], device: torch.device, world: int) -> dict[str, float]:
    """Mean of each value over the workers (every rank must call it)."""
    if world == 1 or not values:
        return values
    keys = sorted(values)
    buf = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return {k: float(v) / world for k, v in zip(keys, buf.tolist(), strict=True)}


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _due(step: int, every: int, total: int) -> bool:
    """True every ``every`` steps and at the last step (``every`` = 0: only the last)."""
    return step == total or (every > 0 and step % every == 0)


def optimizer_step(
    stage: str,
    step_fn: Any,
    engine: Any,
    teacher: Backbone,
    disc: nn.Module | None,
    disc_opt: torch.optim.Optimizer | None,
    batches: list[dict[str, Any]],
    generator: torch.Generator,
    grad_clip: float,
    world: int,
    target: nn.Module | None = None,
    ema_decay: float = 0.0,
) -> dict[str, float]:
    """One optimiser step over ``len(batches)`` micro-batches (gradient accumulation).

    Stage 1: backward of "loss". Stage 2: G backward + engine step, then D backward on the
    same detached features; the discriminator's gradients are averaged over the workers,
    clipped and stepped once per optimiser step. With an EMA ``target`` (METHOD.md 4.4,
    option) it follows the student after the step. Returns the mean losses and norms.
    """
    device = batches[0]["x0"].device
    sums: dict[str, float] = {}
    for batch in batches:
        with _autocast(device):
            if stage == "semantic":
                out = step_fn(engine, teacher, batch, generator, target=target)
            else:
                out = step_fn(engine, teacher, disc, batch, generator, target=target)
        if stage == "semantic":
            engine.backward(out["loss"])
            engine.step()  # DeepSpeed steps (and clips) at the accumulation boundary
        else:
            engine.backward(out["loss_g"])
            engine.step()
            (out["loss_d"] / len(batches)).backward()
        for key, val in out.items():
            sums[key] = sums.get(key, 0.0) + float(val.detach()) / len(batches)
    if disc is not None and disc_opt is not None:
        _average_grads(list(disc.parameters()), world)
        sums["disc_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(disc.parameters(), grad_clip))
        disc_opt.step()
        disc_opt.zero_grad(set_to_none=True)
    if target is not None:
        pairs = [(t, p) for t, p in zip(target.parameters(), engine.module.parameters(), strict=True)
                 if p.requires_grad]  # fmt: skip
        ema_update([t for t, _ in pairs], [p for _, p in pairs], ema_decay)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        sums["grad_norm"] = float(grad_norm)
    return sums


# ---------------------------------------------------------------- the loop
def train_loop(config: dict[str, Any]) -> None:
    """One stage on one Ray Train worker; ``config`` comes from ``pipelines.distill``."""
    if config.get("torch_extensions_dir"):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg: Config = from_dict(config["cfg"])
    stage: str = config["stage"]
    logger: RunLogger = config["logger"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    total = t.steps_semantic if stage == "semantic" else t.steps_detail
    micro = t.global_batch // (world * t.grad_accum)
    if micro < 1 or micro * world * t.grad_accum != t.global_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by {world} workers x "
            f"train.grad_accum={t.grad_accum}"
        )

    # 1. device and precision policy
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    _seed_everything(t.seed * 1009 + rank)
    generator = torch.Generator(device=device).manual_seed(t.seed * 7919 + rank)

    # 2. models: the teacher's weights are loaded once; stage 1 copies them for the student
    bundle = load_bundle(
        cfg.model.path, components=("transformer",), text_max_length=cfg.model.text_max_length
    )
    student = build_student(cfg, stage, bundle.transformer, config.get("init_checkpoint"))
    student.set_checkpointing(t.activation_checkpointing)
    # bf16 on GPU except the modules diffusers keeps in float32 (rope, time embedder, norms)
    teacher = make_backbone(bundle.transformer).to(device=device)
    cast_keeping_fp32(teacher, dtype, fp32_modules(teacher))
    teacher.eval().requires_grad_(False)
    teacher.set_checkpointing(t.activation_checkpointing)  # the fake taps keep a graph
    bundle.transformer = None  # the teacher holds the only reference
    disc = disc_opt = None
    if stage == "detail":
        disc = Discriminator(
            teacher.num_taps(cfg.method.tap_every), teacher.dim, cfg.method.disc_hidden
        ).to(device)
        disc_opt = torch.optim.AdamW(
            disc.parameters(), lr=t.lr_disc, betas=t.disc_betas, eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )  # fmt: skip
    schedule = Schedule.from_config(cfg.method)
    step_fn = (SemanticStep if stage == "semantic" else DetailStep)(
        schedule, cfg.method, cfg.data.empty_prompt_prob
    )

    # 3. the student's optimiser inside a DeepSpeed engine
    lr = t.lr_semantic if stage == "semantic" else t.lr_detail
    opt = torch.optim.AdamW(
        student.trainable_parameters(), lr=lr, betas=t.betas, eps=t.adam_eps,
        weight_decay=t.weight_decay,
    )  # fmt: skip
    target = None  # the consistency target: the student itself, or an EMA copy of it
    if cfg.method.ema_decay > 0:
        if t.zero_stage == 3:
            raise ConfigError(
                "method.ema_decay > 0 keeps a whole EMA copy on every worker: use "
                "train.zero_stage <= 2, or method.ema_decay=0 (the reference)"
            )
        target = copy.deepcopy(student).requires_grad_(False).eval().to(device)  # fp32
    replicated = {"ema": target} if target is not None else {}
    if disc is not None:
        replicated.update(disc=disc, disc_opt=disc_opt)
    engine, _, _, _ = deepspeed.initialize(
        model=student, optimizer=opt, config=deepspeed_config(cfg, micro, on_gpu)
    )

    # 4. resume (a re-run of the same run name, or a restart after a worker failure)
    state = TrainState(stage=stage)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore(checkpoint, engine, rank, generator, replicated)
        if rank == 0:
            print(f"[dcm distill {stage}] resumed at step {state.step}/{total}", file=sys.stderr)
    resumed_from = state.step

    # 5. data: this worker's shard, cycled; the null prompt for CFG and prompt dropout
    val = config["val"]
    null = _cond(val["null_text"], val["null_mask"], device, val.get("null_pooled"))
    shard = ray.train.get_dataset_shard("train")
    data = micro_batches(shard, micro, state.epoch, state.batch_in_epoch)
    validator = Validator(cfg, config["val"], device, rank)
    bundle_path = _bundle_path(cfg.model.path)

    # 5'. validate the untrained student (step 0) so that quality curves start there; its
    # score travels in the checkpoint state, so a resumed run still compares against it
    baseline = state.metrics.get("val/score_step0")
    if state.step == 0:
        engine.eval()
        first = validator(engine, teacher, 0, logger)
        engine.train()
        baseline = first.get("val/score")
        if rank == 0:
            logger.log_metrics({**first, **step0_verdict({}, baseline)}, 0)

    window: dict[str, float] = {}
    window_steps, t_window = 0, time.perf_counter()
    t_start, start_step = time.perf_counter(), state.step
    engine.train()
    for step in range(state.step + 1, total + 1):
        # 5a. one optimiser step = grad_accum micro-batches from this worker's shard
        batches = []
        for _ in range(t.grad_accum):
            epoch, index, rows = next(data)
            batches.append(to_batch(rows, bundle, null, device))
            state.epoch, state.batch_in_epoch = epoch, index + 1
        out = optimizer_step(
            stage, step_fn, engine, teacher, disc, disc_opt, batches, generator, t.grad_clip,
            world, target, cfg.method.ema_decay,
        )  # fmt: skip
        for key, val in out.items():
            window[key] = window.get(key, 0.0) + val
        state.step, state.samples = step, state.samples + t.global_batch
        window_steps += 1

        # 5b. log: losses averaged over the window and the workers, lr, speed, memory
        # (every cadence depends on the step only, so all ranks report together)
        save = _due(step, t.checkpoint_every, total)
        validate = save or bool(t.val_every and step % t.val_every == 0)
        log = save or validate or _due(step, t.log_every, total)
        metrics: dict[str, float] = {}
        if log:
            losses = _mean_across({k: v / window_steps for k, v in window.items()}, device, world)
            took = time.perf_counter() - t_window
            sps = window_steps * t.global_batch / max(took, 1e-9)
            metrics = {f"train/{k}": v for k, v in losses.items()}
            metrics.update({
                "train/lr": float(engine.get_lr()[0]),
                "perf/samples_per_s": sps,
                "perf/peak_mem_mb": _peak_memory_mb(device),
                "step": float(step),
                "epoch": float(state.epoch),
                "resumed_from": float(resumed_from),
            })  # fmt: skip
            if disc_opt is not None:
                metrics["train/lr_disc"] = float(disc_opt.param_groups[0]["lr"])
            if rank == 0:
                rate = (step - start_step) / max(time.perf_counter() - t_start, 1e-9)
                loss = losses.get("loss", losses.get("loss_g", math.nan))
                print(
                    f"[dcm distill {stage}] step {step}/{total} loss {loss:.4f} "
                    f"{sps:.2f} samples/s ETA {_eta((total - step) / max(rate, 1e-9))}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
            window, window_steps = {}, 0

        # 5c. validate (fixed prompts and seeds) and checkpoint (DeepSpeed state + artifact)
        if validate:
            engine.eval()
            metrics.update(validator(engine, teacher, step, logger))
            metrics.update(step0_verdict(metrics, baseline))
            engine.train()
            state.metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if rank == 0 and log:
            logger.log_metrics(metrics, step)
        if save:
            with write_checkpoint(
                engine, state, cfg, bundle_path, rank, generator, replicated
            ) as ckpt:
                ray.train.report(metrics, checkpoint=ckpt)  # carries val/score: best-k
        elif log:
            ray.train.report(metrics)
        if log:  # samples/s of the next window leaves validation and saving out
            t_window = time.perf_counter()
