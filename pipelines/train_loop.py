"""The per-worker Ray Train loop of one distillation stage (METHOD.md sections 4-6).

The driver (``pipelines.distill.run_stage``) builds one ``StageSettings`` per stage and hands
it to every TorchTrainer worker; ``train_loop`` runs ``StageWorker`` there, in named phases:

1. ``__init__``: device and precision policy, bf16 + NCCL on GPU, fp32 + gloo on CPU (the
   maths in ``dcm.steps`` knows neither), seeds;
2. ``build_models``: the frozen teacher (loaded once, bf16 on GPU, never given to an
   optimiser), the student ``DualExpert`` (stage 1: a copy of the teacher, all weights
   train; stage 2: the stage-1 artifact with the detail expert enabled) and, in stage 2,
   the discriminator;
3. ``build_engine``: the student in a DeepSpeed engine (ZeRO 2 by default, 3 and CPU
   offload by config, clipping, gradient accumulation, torch AdamW so nothing JIT-builds);
4. ``resume`` from ``ray.train.get_checkpoint()`` (step, optimiser, data position, RNG);
5. ``open_data``: this worker's shard, the null prompt, the validator; a step-0 validation;
6. per step ``optimisation_step`` (``grad_accum`` micro-batches, the stage's step function,
   backward + step) and ``report`` (log, validate, checkpoint on cadence).

The discriminator is a plain torch module with its own torch AdamW (betas (0, 0.999),
METHOD.md section 6), replicated on every worker; its gradients are averaged with one
all_reduce per optimiser step. A second DeepSpeed engine would attach ZeRO gradient hooks
to it, and the student's backward must not trigger those; the heads are small, so
replication costs little memory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from dcm.ema import Ema, ema_update, mean_warmup
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
log = logging.getLogger(__name__)


def stage_steps(cfg: Config, stage: str) -> int:
    """Optimiser steps of a stage (train.steps_semantic / train.steps_detail)."""
    return cfg.train.steps_semantic if stage == "semantic" else cfg.train.steps_detail


@dataclass(frozen=True)
class ValidationInputs:
    """The fixed validation prompts, encoded once by the driver
    (``pipelines.distill.validation_inputs``), and the latent shape to sample."""

    captions: list[str]  # P prompts
    text: np.ndarray  # (P, L, D) float32 text states
    mask: np.ndarray  # (P, L)
    null_text: np.ndarray  # (1, L, D) the empty prompt
    null_mask: np.ndarray  # (1, L)
    latent_shape: tuple[int, ...]  # (C, T, h, w)
    pooled: np.ndarray | None = None  # (P, Q) HunyuanVideo's pooled CLIP text
    null_pooled: np.ndarray | None = None  # (1, Q)

    def cond(self, device: torch.device) -> Cond:
        return _cond(self.text, self.mask, device, self.pooled)

    def null_cond(self, device: torch.device) -> Cond:
        return _cond(self.null_text, self.null_mask, device, self.null_pooled)


@dataclass(frozen=True)
class StageSettings:
    """What every worker of one stage needs, built once by the driver
    (``pipelines.distill.run_stage``). It crosses into Ray Train's ``train_loop_config`` as
    ``loop_config()`` (the config as plain data) and comes back by ``from_loop_config``."""

    cfg: Config
    stage: str  # "semantic" or "detail"
    val: ValidationInputs
    logger: RunLogger = field(default_factory=RunLogger)  # the stage's MLflow run
    init_checkpoint: Any = None  # detail stage: the semantic stage's ray.train.Checkpoint
    torch_extensions_dir: str = ""  # where pipelines.prebuild put DeepSpeed's JIT op
    diverged_marker: str = ""  # where rank 0 records a divergence (write_diverged)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(
                f"stage '{self.stage}' is not allowed: choose one of {', '.join(STAGES)}"
            )

    @property
    def steps(self) -> int:
        return stage_steps(self.cfg, self.stage)

    @property
    def lr(self) -> float:
        t = self.cfg.train
        return t.lr_semantic if self.stage == "semantic" else t.lr_detail

    def loop_config(self) -> dict[str, Any]:
        """The TorchTrainer's ``train_loop_config``: these fields, the config and the
        validation inputs as plain dicts (no class of this module inside, so Ray's Train
        controller unpickles it without importing the model stack: ``pipelines.worker_entry``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        val = {f.name: getattr(self.val, f.name) for f in dataclasses.fields(self.val)}
        return {**fields, "cfg": self.cfg.to_dict(), "val": val}

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> StageSettings:
        """The settings back from ``loop_config()`` on a worker."""
        val = ValidationInputs(**config["val"])
        return cls(**{**config, "cfg": from_dict(config["cfg"]), "val": val})


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
        # fp32 weights, bf16 compute (METHOD.md 5). Not DeepSpeed's "bf16" section: that casts
        # the student to bf16 and, DeepSpeed 0.19, switches the caller's autocast off inside
        # engine.forward, so the first GPU step fed fp32 latents to a bf16 conv and raised
        # (H200, 2026-12-04). "torch_autocast" keeps the weights fp32 and runs the engine's
        # forward under the same bf16 autocast as the rest of the step.
        "torch_autocast": {"enabled": on_gpu, "dtype": "bfloat16"},
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


def _autocast(device: torch.device, bf16: bool | None = None) -> Any:
    """bf16 autocast on GPU, none on CPU; ``bf16=True`` asks for it anywhere (the CPU check
    of the GPU policy, benchmarks/distill.py --bf16)."""
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


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

    def __init__(self, cfg: Config, val: ValidationInputs, device: torch.device, rank: int) -> None:
        self.cfg, self.device, self.rank = cfg, device, rank
        self.captions: list[str] = list(val.captions)
        self.cond, self.null = val.cond(device), val.null_cond(device)
        # the student samples with the embedded guidance it was trained with (HunyuanVideo)
        self.student_cond = with_embedded_guidance(self.cond, cfg.method, len(self.captions))
        self.shape = tuple(int(s) for s in val.latent_shape)  # (C, T, h, w)
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
        from dcm.sampler import fresh_seed, sample

        metrics: dict[str, float] = {}
        out = Path(tempfile.mkdtemp(prefix="dcm-val-"))
        for n in self.counts:
            videos = []
            for seed in self.cfg.sample.seeds:
                with _autocast(self.device):
                    x = sample(
                        model,
                        self._noise(seed),
                        self.student_cond,
                        self._sigmas(n),
                        self.schedule,
                        renoise=self.cfg.sample.renoise,
                        fresh=lambda k, s=seed: self._noise(fresh_seed(s, k)),
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
        log.warning(
            "%s: the final student's val/score %.4f does not beat the untrained student's "
            "%.4f (step 0); flagged in MLflow (tag dcm_quality_flag)",
            stage, final.get("val/score", math.nan), final.get("val/score_step0", math.nan),
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


DIVERGED_FILE = "diverged.json"  # in <run dir>/<stage>/: what a diverged stage left


class DivergedError(ConfigError):
    """A stage whose losses or validation became NaN or infinite (a user setting to fix)."""


def nonfinite(metrics: dict[str, float]) -> list[str]:
    """The ``train/`` and ``val/`` metrics that are NaN or infinite."""
    return sorted(
        k for k, v in metrics.items()
        if k.startswith(("train/", "val/")) and isinstance(v, float) and not math.isfinite(v)
    )  # fmt: skip


def diverged_message(stage: str, lr: float, step: int, names: list[str], kept: str = "") -> str:
    """One sentence for a stage that diverged: where, what, which setting, what is kept."""
    return (
        f"stage '{stage}' diverged at step {step} ({', '.join(names) or 'losses'} not finite "
        f"with train.lr_{stage}={lr:g}): lower train.lr_{stage}, or look for NaN or inf "
        "in the training latents (data.latents / data.input)" + (f"; {kept}" if kept else "")
    )


def write_diverged(marker: str, step: int, names: list[str]) -> None:
    """Record where a stage diverged, for the driver (``read_diverged``): Ray Train's
    result only carries the metrics of checkpoint reports, and these weights get none."""
    from dcm.files import write_atomic
    from dcm.latents import filesystem

    fs, path = filesystem(marker)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    write_atomic(path, json.dumps({"step": step, "metrics": names}), fs=fs)


def read_diverged(marker: str, remove: bool = False) -> dict[str, Any] | None:
    """What ``write_diverged`` left at ``marker`` (None when nothing); ``remove`` deletes it."""
    import pyarrow.fs as pafs

    from dcm.latents import filesystem

    fs, path = filesystem(marker)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        record = json.loads(src.read().decode())
    if remove:
        fs.delete_file(path)
    return record


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
    bf16: bool | None = None,
) -> dict[str, float]:
    """One optimiser step over ``len(batches)`` micro-batches (gradient accumulation).

    Stage 1: backward of "loss". Stage 2: G backward + engine step, then D backward on the
    same detached features; the discriminator's gradients are averaged over the workers,
    clipped and stepped once per optimiser step. With an EMA ``target`` (METHOD.md 4.4,
    option) it follows the student after the step. ``bf16``: the autocast policy (default:
    on GPU only). Returns the mean losses and norms.
    """
    device = batches[0]["x0"].device
    sums: dict[str, float] = {}
    for batch in batches:
        with _autocast(device, bf16):
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


# ---------------------------------------------------------------- the loop, in phases
def cosine_factor(steps: int) -> Any:
    """step -> rate factor, 1 at step 0 falling to 0 at ``steps`` (half a cosine)."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def rate_schedule(optimizer: torch.optim.Optimizer, kind: str, steps: int) -> Any:
    """``train.lr_decay`` as a torch scheduler (None: constant). DeepSpeed steps it with the
    optimiser at each accumulation boundary and keeps its state in the checkpoint."""
    if kind == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(steps))


def rebase_schedule(scheduler: Any, lr: float) -> float:
    """A restored schedule on the config's rate (``set_rates``' rule, the config wins): its
    base becomes ``lr`` and every group takes base x factor at the restored step. Returns
    the saved base rate."""
    saved = float(scheduler.base_lrs[0])
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr * factor
    return saved


def set_rates(rates: dict[str, tuple[Any, float]]) -> dict[str, tuple[float, float]]:
    """Set every param group of each optimiser (``None``: none in this stage) to its config
    rate, keyed by the config field. A restored optimiser state brings back the saved rate;
    the config's wins, so a rerun after a divergence can lower it. Returns ``{field: (saved,
    config rate)}`` for the rates that changed."""
    changed: dict[str, tuple[float, float]] = {}
    for name, (optimizer, lr) in rates.items():
        if optimizer is None:
            continue
        saved = float(optimizer.param_groups[0]["lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        if not math.isclose(saved, lr):
            changed[name] = (saved, lr)
    return changed


def micro_batch_size(global_batch: int, world: int, grad_accum: int) -> int:
    """Samples per worker and micro-batch; the global batch must split evenly."""
    micro = global_batch // (world * grad_accum)
    if micro < 1 or micro * world * grad_accum != global_batch:
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by {world} workers x "
            f"train.grad_accum={grad_accum}"
        )
    return micro


@dataclass
class _Window:
    """Losses summed over the optimiser steps since the last log line, and its start time."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, float]) -> None:
        for key, val in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + val
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()}


class StageWorker:
    """One stage on one Ray Train worker. ``run`` calls the phases in order:

    ``build_models`` (teacher, student, discriminator, step function), ``build_engine``
    (optimisers, EMA target, DeepSpeed), ``resume``, ``open_data``, ``validate`` at step 0,
    then per step ``optimisation_step`` and ``report`` (log, validate, checkpoint).
    """

    def __init__(self, settings: StageSettings) -> None:
        import ray.train
        import ray.train.torch

        self.settings, self.cfg, self.t = settings, settings.cfg, settings.cfg.train
        self.stage, self.total, self.logger = settings.stage, settings.steps, settings.logger
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.micro = micro_batch_size(self.t.global_batch, self.world, self.t.grad_accum)
        # device and precision policy: bf16 + NCCL on GPU, fp32 + gloo on CPU
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.on_gpu else torch.float32
        _seed_everything(self.t.seed * 1009 + self.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(
            self.t.seed * 7919 + self.rank
        )

    # ------------------------------------------------------------ setup
    def build_models(self) -> None:
        """The frozen teacher, the student (the teacher's weights are loaded once; stage 1
        copies them), the stage-2 discriminator and the stage's step function."""
        cfg, t = self.cfg, self.t
        self.bundle = load_bundle(
            cfg.model.path, components=("transformer",), text_max_length=cfg.model.text_max_length
        )
        self.student = build_student(
            cfg, self.stage, self.bundle.transformer, self.settings.init_checkpoint
        )
        self.student.set_checkpointing(t.activation_checkpointing)
        # bf16 on GPU except the modules diffusers keeps in float32 (rope, time embedder, norms)
        teacher = make_backbone(self.bundle.transformer).to(device=self.device)
        cast_keeping_fp32(teacher, self.dtype, fp32_modules(teacher))
        teacher.eval().requires_grad_(False)
        teacher.set_checkpointing(t.activation_checkpointing)  # the fake taps keep a graph
        self.teacher = teacher
        self.bundle.transformer = None  # the teacher holds the only reference
        self.disc: nn.Module | None = None
        self.disc_opt: torch.optim.Optimizer | None = None
        if self.stage == "detail":
            self.disc = Discriminator(
                teacher.num_taps(cfg.method.tap_every), teacher.dim, cfg.method.disc_hidden
            ).to(self.device)
            self.disc_opt = torch.optim.AdamW(
                self.disc.parameters(), lr=t.lr_disc, betas=t.disc_betas, eps=t.adam_eps,
                weight_decay=t.weight_decay,
            )  # fmt: skip
        self.step_fn = (SemanticStep if self.stage == "semantic" else DetailStep)(
            Schedule.from_config(cfg.method), cfg.method, cfg.data.empty_prompt_prob
        )

    def build_engine(self) -> None:
        """The student's AdamW inside a DeepSpeed engine; the consistency target: the
        student itself, or an EMA copy of it (``method.ema_decay`` > 0, bootstrap target);
        and the float32 average of the trained weights (``train.average_decay`` > 0) that
        validation scores and checkpoints export."""
        t = self.t
        opt = torch.optim.AdamW(
            self.student.trainable_parameters(), lr=self.settings.lr, betas=t.betas,
            eps=t.adam_eps, weight_decay=t.weight_decay,
        )  # fmt: skip
        self.target: nn.Module | None = None
        # (never with ZeRO-3: the config refuses it; a 'teacher' target has no use for it)
        if self.cfg.method.ema_decay > 0 and self.step_fn.target_kind == "bootstrap":
            self.target = copy.deepcopy(self.student).requires_grad_(False).eval().to(self.device)
        # state identical on every rank, saved once per checkpoint (pipelines.checkpoints)
        self.replicated: dict[str, Any] = {"ema": self.target} if self.target is not None else {}
        if self.disc is not None:
            self.replicated.update(disc=self.disc, disc_opt=self.disc_opt)
        import deepspeed

        self.schedule = rate_schedule(opt, t.lr_decay, self.total)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.student, optimizer=opt, lr_scheduler=self.schedule,
            config=deepspeed_config(self.cfg, self.micro, self.on_gpu),
        )  # fmt: skip
        self.average: Ema | None = None
        if t.average_decay > 0:
            trained = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
            self.average = Ema(
                None, t.average_decay, mean_warmup, named=trained, dtype=torch.float32
            )
            self.replicated["average"] = self.average

    def averaged(self) -> Any:
        """A block with the averaged weights in the student (``train.average_decay``)."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def resume(self) -> TrainState:
        """The saved state of this stage (a re-run of the same run name, or a restart after
        a worker failure), else a fresh one."""
        import ray.train

        state = TrainState(stage=self.stage)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            state = restore(checkpoint, self.engine, self.rank, self.generator, self.replicated)
            student_lr = f"train.lr_{self.stage}"
            changed = set_rates({
                student_lr: (self.engine.optimizer if self.schedule is None else None,
                             self.settings.lr),
                "train.lr_disc": (self.disc_opt, self.t.lr_disc),
            })  # fmt: skip
            if self.schedule is not None:  # the base of the decay, not today's rate
                saved = rebase_schedule(self.schedule, self.settings.lr)
                if not math.isclose(saved, self.settings.lr):
                    changed[student_lr] = (saved, self.settings.lr)
            if self.rank == 0:
                log.info("%s: resumed at step %d/%d", self.stage, state.step, self.total)
                for name, (saved, lr) in changed.items():
                    log.info("%s: %s %g -> %g (the config's)", self.stage, name, saved, lr)
        self.resumed_from = state.step
        return state

    def open_data(self, state: TrainState) -> Iterator[tuple[int, int, dict]]:
        """This worker's shard, cycled from the state's data position; also the null prompt
        (CFG, prompt dropout) and the validator, which read the driver's validation inputs."""
        import ray.train

        self.null = self.settings.val.null_cond(self.device)
        shard = ray.train.get_dataset_shard("train")
        self.validator = Validator(self.cfg, self.settings.val, self.device, self.rank)
        self.bundle_path = _bundle_path(self.cfg.model.path)
        return micro_batches(shard, self.micro, state.epoch, state.batch_in_epoch)

    # ------------------------------------------------------------ per step
    def optimisation_step(self, data: Iterator, state: TrainState) -> dict[str, float]:
        """``grad_accum`` micro-batches from this worker's shard, then one optimiser step;
        moves the state's data position. Returns the step's mean losses and norms."""
        batches = []
        for _ in range(self.t.grad_accum):
            epoch, index, rows = next(data)
            batches.append(to_batch(rows, self.bundle, self.null, self.device))
            state.epoch, state.batch_in_epoch = epoch, index + 1
        losses = optimizer_step(
            self.stage, self.step_fn, self.engine, self.teacher, self.disc, self.disc_opt,
            batches, self.generator, self.t.grad_clip, self.world, self.target,
            self.cfg.method.ema_decay,
        )  # fmt: skip
        if self.average is not None:
            self.average.update()
        return losses

    def validate(self, step: int) -> dict[str, float]:
        """The validator's metrics of the current student, its averaged weights with
        ``train.average_decay`` (every rank samples)."""
        self.engine.eval()
        with self.averaged():
            metrics = self.validator(self.engine, self.teacher, step, self.logger)
        self.engine.train()
        return metrics

    def train_metrics(self, step: int, state: TrainState, window: _Window) -> dict[str, float]:
        """Losses averaged over the window and the workers, lr, speed, memory; rank 0 also
        writes the progress line."""
        losses = _mean_across(window.means(), self.device, self.world)
        sps = window.steps * self.t.global_batch / max(time.perf_counter() - window.started, 1e-9)
        metrics = {f"train/{k}": v for k, v in losses.items()}
        metrics.update({
            "train/lr": float(self.engine.get_lr()[0]),
            "perf/samples_per_s": sps,
            "perf/peak_mem_mb": _peak_memory_mb(self.device),
            "step": float(step),
            "epoch": float(state.epoch),
            "resumed_from": float(self.resumed_from),
        })  # fmt: skip
        if self.disc_opt is not None:
            metrics["train/lr_disc"] = float(self.disc_opt.param_groups[0]["lr"])
        if self.rank == 0:
            rate = (step - self.start_step) / max(time.perf_counter() - self.started, 1e-9)
            loss = losses.get("loss", losses.get("loss_g", math.nan))
            eta = _eta((self.total - step) / max(rate, 1e-9))
            log.info(
                "%s: step %d/%d loss %.4f %.2f samples/s ETA %s",
                self.stage, step, self.total, loss, sps, eta,
            )  # fmt: skip
        return metrics

    def report(
        self, step: int, state: TrainState, window: _Window, baseline: float | None
    ) -> _Window:
        """Log, validate and checkpoint on cadence; returns the window to go on with.

        Every cadence depends on the step only, so all ranks report together. A checkpoint
        (DeepSpeed state + artifact) always comes with a validation: its ``val/score`` is
        what Ray Train ranks the kept checkpoints by.
        """
        import ray.train

        t = self.t
        save = _due(step, t.checkpoint_every, self.total)
        validate = save or bool(t.val_every and step % t.val_every == 0)
        log_now = save or validate or _due(step, t.log_every, self.total)
        if not log_now:
            return window
        metrics = self.train_metrics(step, state, window)
        if validate:
            metrics.update(self.validate(step))
            metrics.update(step0_verdict(metrics, baseline))
        bad = nonfinite(metrics)  # val/ metrics live on rank 0: every rank takes the verdict
        if _mean_across({"bad": float(bool(bad))}, self.device, self.world)["bad"] > 0:
            # No checkpoint of these weights and no metric Tune's ASHA would ignore (NaN
            # compares false): the workers stop, the driver raises DivergedError from the
            # marker, and the earlier checkpoints stay.
            self.diverged = step
            if self.rank == 0:
                log.error("%s", diverged_message(self.stage, self.settings.lr, step, bad))
                if self.settings.diverged_marker:
                    write_diverged(self.settings.diverged_marker, step, bad)
            return window
        if validate:
            state.metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if self.rank == 0:
            self.logger.log_metrics(metrics, step)
        if save:
            weights = self.average.named() if self.average is not None else None
            with write_checkpoint(
                self.engine, state, self.cfg, self.bundle_path, self.rank, self.generator,
                self.replicated, weights,
            ) as ckpt:  # fmt: skip
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        return _Window()  # samples/s of the next window leaves validation and saving out

    # ------------------------------------------------------------ all of it
    def run(self) -> None:
        clock = [time.perf_counter()]

        def lap() -> float:  # seconds since the previous lap: where start-up time goes
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        self.build_models()
        laps = {"models": lap()}
        self.build_engine()
        laps["engine"] = lap()
        state = self.resume()
        data = self.open_data(state)
        laps["resume+data"] = lap()
        # the untrained student (step 0), so that quality curves start there; its score
        # travels in the checkpoint state, so a resumed run still compares against it
        baseline = state.metrics.get("val/score_step0")
        if state.step == 0:
            first = self.validate(0)
            baseline = first.get("val/score")
            if self.rank == 0:
                self.logger.log_metrics({**first, **step0_verdict({}, baseline)}, 0)
            laps["step-0 validation"] = lap()
        if self.rank == 0:
            log.info(
                "%s: ready to train in %.1f s (%s)", self.stage, clock[-1] - clock[0],
                ", ".join(f"{k} {v:.1f} s" for k, v in laps.items()),
            )  # fmt: skip
        window = _Window()
        self.started, self.start_step = time.perf_counter(), state.step
        self.engine.train()
        self.diverged = 0
        for step in range(state.step + 1, self.total + 1):
            window.add(self.optimisation_step(data, state))
            state.step, state.samples = step, state.samples + self.t.global_batch
            window = self.report(step, state, window, baseline)
            if self.diverged:
                return


def _worker_logging() -> None:
    """INFO lines of this package on the worker's stderr (Ray forwards it to the driver),
    unless the process already configured logging."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: ``config`` is ``StageSettings.loop_config()``."""
    settings = StageSettings.from_loop_config(config)
    if settings.torch_extensions_dir:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", settings.torch_extensions_dir)
    _worker_logging()
    StageWorker(settings).run()
