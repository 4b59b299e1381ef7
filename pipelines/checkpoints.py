"""Distillation checkpoints: DeepSpeed state for resume + the exported inference artifact.

One checkpoint directory (assembled by Ray Train from every rank's temp folder):

    ds/                 engine.save_checkpoint(tag="ds") of every rank (ZeRO shards, optimiser)
    rng/rank<r>.pt      each rank's RNG states (torch, CUDA, numpy, python, the step generator)
    state.json          step, data position (epoch, micro-batches used), samples, stage, metrics
    replicated.pt       state kept whole and identical on every rank, by name: the
                        discriminator and its AdamW (detail stage), the EMA target,
                        the average of the trained weights (train.average_decay)
    artifact/           DualExpert.save_artifact: experts.safetensors + dcm_artifact.json,
                        loadable by dcm's sampler, VideoGenerator and Serve without DeepSpeed

Each rank writes into a local temp folder first and only then calls ``ray.train.report``;
Ray registers a checkpoint once every rank's copy has finished, so a crash during a save
leaves the previous checkpoint as the latest one (RUNTIME.md: save on every rank, then
report). ``state.json`` is written last: a folder without it is not a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcm.config import Config, ConfigError
from dcm.experts import ARTIFACT_JSON
from dcm.files import is_remote, write_json

DS_TAG = "ds"
STATE = "state.json"
REPLICATED = "replicated.pt"
ARTIFACT = "artifact"
RNG = "rng"
STATE_VERSION = 1


@dataclass
class TrainState:
    """Where a stage stands: with the DeepSpeed state, enough to continue it (the data
    position is a count of micro-batches, not the rows themselves: see pipelines.distill)."""

    stage: str
    step: int = 0  # optimiser steps done
    epoch: int = 0  # data epoch of the next micro-batch
    batch_in_epoch: int = 0  # micro-batches of that epoch already used
    samples: int = 0  # samples seen, all workers
    metrics: dict[str, float] = field(default_factory=dict)  # last validation metrics
    version: int = STATE_VERSION


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int) -> Iterator[None]:
    """Full parameters on every rank for the block (ZeRO-3 partitions them; 0-2 do not)."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def master_weights(student: nn.Module) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master copies of the trained low-precision parameters, by name, on
    the CPU. Collective (the partitions are all-reduced): every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in student.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            full = safe_get_full_fp32_param(p)
            if full is not None:
                out[name] = full.detach().to("cpu", torch.float32)
    return out


def export_artifact(
    student: nn.Module,
    out_dir: str | Path,
    cfg: Config,
    bundle_path: str,
    rank: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write the inference artifact (rank 0) from ``weights`` (float32 by name: the
    averaged trained weights), else from the fp32 master weights under bf16; every rank
    must call it (ZeRO-3 gathers, the masters are all-reduced)."""
    with gathered(student, cfg.train.zero_stage):
        masters = master_weights(student) if weights is None else weights
        if rank == 0:
            return student.save_artifact(out_dir, cfg, bundle_path, masters)
    return None


@contextlib.contextmanager
def write_checkpoint(
    engine: Any,
    state: TrainState,
    cfg: Config,
    bundle_path: str,
    rank: int,
    generator: torch.Generator,
    replicated: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Iterator[Any]:
    """Stage one checkpoint in a temp folder and yield it as a ``ray.train.Checkpoint``.

    ``replicated``: modules / optimisers identical on every rank (name -> object with
    ``state_dict``), saved once by rank 0. ``weights``: what the artifact exports instead
    of the live trained weights (``export_artifact``).
    """
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="dcm-ckpt-") as tmp:
        root = Path(tmp)
        engine.save_checkpoint(str(root), tag=DS_TAG)
        (root / RNG).mkdir()
        torch.save(rng_state(generator), root / RNG / f"rank{rank}.pt")
        export_artifact(engine.module, root / ARTIFACT, cfg, bundle_path, rank, weights)
        if rank == 0:
            if replicated:
                torch.save({k: v.state_dict() for k, v in replicated.items()}, root / REPLICATED)
            write_json(root / STATE, asdict(state))
        yield Checkpoint.from_directory(str(root))


def read_state(folder: str | Path) -> TrainState:
    """``state.json`` of a checkpoint folder, with a clear error for an incomplete one."""
    file = Path(folder) / STATE
    if not file.is_file():
        raise ConfigError(
            f"checkpoint '{folder}' has no {STATE}: it is incomplete (a save was interrupted); "
            "remove it or start a new run name"
        )
    data = json.loads(file.read_text())
    if data.get("version") != STATE_VERSION:
        raise ConfigError(f"{file}: state version {data.get('version')!r} is not {STATE_VERSION}")
    return TrainState(**data)


def restore(
    checkpoint: Any,
    engine: Any,
    rank: int,
    generator: torch.Generator,
    replicated: dict[str, Any] | None = None,
) -> TrainState:
    """Load a checkpoint written by ``write_checkpoint`` into the engine(s); return its state."""
    with checkpoint.as_directory() as folder:
        root = Path(folder)
        state = read_state(root)
        load_path, _ = engine.load_checkpoint(str(root), tag=DS_TAG)
        if load_path is None:
            raise ConfigError(f"checkpoint '{root}' holds no DeepSpeed state under {DS_TAG}/")
        if replicated:
            saved = torch.load(root / REPLICATED, map_location="cpu", weights_only=False)
            for name, obj in replicated.items():
                obj.load_state_dict(saved[name])
        rng_file = root / RNG / f"rank{rank}.pt"
        if rng_file.is_file():  # absent when the worker count changed: keep the fresh seed
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), generator)
    return state


def check_detail_start(stage: str, init_from: str, init_checkpoint: Any = None) -> None:
    """The detail stage starts from a semantic artifact: the semantic stage's checkpoint
    (``init_checkpoint``) or ``train.init_from``; anything else is a one-line ConfigError."""
    if stage != "detail" or init_checkpoint is not None:
        return
    if not init_from:
        raise ConfigError(
            "stage 'detail' needs a semantic artifact: set train.init_from or use --stage both"
        )
    if not is_remote(init_from) and not (Path(init_from) / ARTIFACT_JSON).is_file():
        raise ConfigError(
            f"train.init_from='{init_from}' is not a semantic artifact ({ARTIFACT_JSON} is "
            "missing there): point it at a semantic run's artifact/ folder"
        )


def best_checkpoint(result: Any, metric: str) -> tuple[Any, dict[str, Any]]:
    """The best (highest ``metric``) of a Ray Train result's kept checkpoints, else the latest."""
    ranked = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    if ranked:  # ties go to the later checkpoint
        return max(ranked, key=lambda cm: (float(cm[1][metric]), float(cm[1].get("step", 0))))
    if result.checkpoint is None:
        raise RuntimeError("the training run reported no checkpoint")
    return result.checkpoint, dict(result.metrics or {})
