"""`dcm distill`: Ray Train + DeepSpeed distillation of the semantic and detail experts.

    python -m pipelines.distill --config pipelines/configs/shapes-tiny.yaml [--stage both]

One TorchTrainer fit per stage (METHOD.md sections 5 and 6); ``both`` runs semantic and
then detail, the detail stage initialised from the semantic stage's best
``ray.train.Checkpoint`` (never a path edited by hand). The per-worker loop is
``pipelines.train_loop``; checkpoints (DeepSpeed state + the exported inference artifact)
are ``pipelines.checkpoints``; MLflow is ``pipelines.tracking``.

Run directory ``<train.out>/<run name>/``: ``<stage>/checkpoint_*`` (Ray Train storage,
best ``train.keep_checkpoints`` by ``train.checkpoint_metric`` plus the latest),
``<stage>/result.json`` (the finished stage) and ``mlflow.db`` + ``mlartifacts/`` (default
tracking store). Re-running the same run name resumes: finished stages are skipped, an
unfinished one continues from its latest checkpoint (step, optimiser, RNG, and the count of
micro-batches used in the current epoch, which it skips). Resume is not bit-exact: Ray Data
streams blocks to the workers in whatever order they finish, so the skipped and the following
batches need not be the rows an uninterrupted run would have seen at those steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pipelines.args
from dcm.config import Config, ConfigError
from dcm.files import is_remote
from pipelines.checkpoints import ARTIFACT, best_checkpoint, check_detail_start
from pipelines.registry import publish
from pipelines.tracking import PARENT, Tracker
from pipelines.train_loop import (
    DIVERGED_FILE,
    STAGES,
    DivergedError,
    StageSettings,
    ValidationInputs,
    diverged_message,
    read_diverged,
    record_selection,
    stage_steps,
)
from pipelines.worker_entry import distill_worker

RESULT = "result.json"
log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """What a distillation run produced (for ``both``: the detail stage, plus ``stages``)."""

    artifact_dir: Path  # the exported dual-expert artifact of the best checkpoint
    checkpoint: Any  # its ray.train.Checkpoint (DeepSpeed state + artifact)
    mlflow_run_id: str | None  # the stage's run; for ``both`` the parent run
    metrics: dict[str, Any]  # the reported metrics of that checkpoint
    stage: str = "semantic"
    stages: dict[str, DistillResult] = field(default_factory=dict)
    # tracking.register_as: {"name", "version", "uri", "model_id", "run_id"} of the version
    registered: dict[str, Any] | None = None
    # does the final student beat the untrained one (step-0 validation)? None: not measured
    beats_step0: bool | None = None


# ---------------------------------------------------------------- inputs
def run_dir(cfg: Config) -> str:
    """``<train.out>/<run name>``: absolute for local paths, as given for URIs."""
    if is_remote(cfg.train.out):
        return f"{cfg.train.out.rstrip('/')}/{cfg.run_name}"
    return str(Path(cfg.train.out).expanduser().resolve() / cfg.run_name)


def training_data(cfg: Config) -> Any:
    """The latent rows: ingest's parquet shards or its online stream (a ray.data.Dataset)."""
    from pipelines import ingest

    if cfg.data.mode == "parquet":
        if not cfg.data.latents:
            raise ConfigError("data.mode is 'parquet' but data.latents is empty: pass --data DIR")
        return ingest.read_latents(cfg.data.latents)
    if not cfg.data.input:
        raise ConfigError("data.input is empty: pass --data with an ingest folder or raw videos")
    return ingest.stream_latents(cfg)


def _first_rows(cfg: Config, dataset: Any, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` latent rows from the start of the data (parquet: read directly, no Ray)."""
    if cfg.data.mode != "parquet":
        return dataset.take(n)
    import pyarrow.parquet as pq

    from dcm import latents as lt

    manifest = lt.read_manifest(cfg.data.latents)
    fs, _ = lt.filesystem(cfg.data.latents)
    rows: list[dict[str, Any]] = []
    for path in lt.shard_paths(cfg.data.latents, manifest):
        columns = lt.columns(manifest.pooled_dim)
        table = pq.read_table(path, filesystem=fs, columns=columns).slice(0, n - len(rows))
        cols = lt.table_to_rows(
            table, manifest.latent_shape, manifest.text_shape, manifest.pooled_dim
        )
        rows += [{k: v[i] for k, v in cols.items()} for i in range(table.num_rows)]
        if len(rows) >= n:
            break
    return rows


def validation_inputs(cfg: Config, dataset: Any) -> ValidationInputs:
    """Fixed validation prompts (encoded), the empty prompt, and the latent shape.

    Prompts: ``sample.prompts`` (encoded here with the bundle's text encoder), else the
    first ``train.val_prompts`` distinct captions of the data (already encoded in the rows).
    The empty prompt comes from the ingest folder, else from the bundle's text encoder.
    """
    rows = _first_rows(cfg, dataset, max(cfg.train.val_prompts * 8, 8))
    if not rows:
        raise ConfigError("the training data holds no clips: check data.latents / data.input")
    latent_shape = [int(s) for s in np.asarray(rows[0]["latents"]).shape]  # (C, T, h, w)
    encoder = None

    def encode(prompts: list[str]) -> Any:
        nonlocal encoder
        if encoder is None:
            from dcm.bundle import load_bundle

            encoder = load_bundle(
                cfg.model.path, components=("text_encoder",),
                text_max_length=cfg.model.text_max_length,
            )  # fmt: skip
        return encoder.encode_text(prompts)

    if cfg.sample.prompts:
        captions = list(cfg.sample.prompts)
        cond = encode(captions)
        text, mask = cond.text.float().numpy(), cond.mask.numpy()
        pooled = None if cond.pooled is None else cond.pooled.float().numpy()
    else:
        picked: dict[str, dict[str, Any]] = {}
        for row in rows:
            picked.setdefault(str(row["caption"]), row)
        chosen = list(picked.values())[: cfg.train.val_prompts]
        captions = [str(r["caption"]) for r in chosen]
        text = np.stack([np.asarray(r["text"], np.float32) for r in chosen])  # (P, L, D)
        mask = np.stack([np.asarray(r["text_mask"]) for r in chosen])  # (P, L)
        pooled = None  # HunyuanVideo rows carry the pooled CLIP text (P_rows, P)
        if "pooled" in chosen[0]:
            pooled = np.stack([np.asarray(r["pooled"], np.float32) for r in chosen])
    if cfg.data.mode == "parquet":
        from dcm.latents import read_empty_pooled, read_empty_prompt

        null_text, null_mask = read_empty_prompt(cfg.data.latents)
        null_text, null_mask = null_text[None], null_mask[None]  # (1, L, D), (1, L)
        null_pooled = read_empty_pooled(cfg.data.latents)
        null_pooled = None if null_pooled is None else null_pooled[None]  # (1, P)
    else:
        null = encode([""])
        null_text, null_mask = null.text.float().numpy(), null.mask.numpy()
        null_pooled = None if null.pooled is None else null.pooled.float().numpy()
    return ValidationInputs(
        captions=captions, text=text, mask=mask, null_text=null_text, null_mask=null_mask,
        latent_shape=tuple(latent_shape), pooled=pooled, null_pooled=null_pooled,
    )  # fmt: skip


def _use_gpu(cfg: Config) -> bool:
    """train.use_gpu: true / false, or 'auto' = a GPU per worker when Ray sees GPUs."""
    if cfg.train.use_gpu != "auto":
        return bool(cfg.train.use_gpu)
    from pipelines.cluster import cluster_gpus

    return cluster_gpus() >= 1


# ---------------------------------------------------------------- one stage
def make_trainer(settings: StageSettings, dataset: Any, callbacks: Any = ()) -> Any:
    """The TorchTrainer of one stage: ``train_loop`` on ``train.num_workers`` workers, each
    handed ``settings``. Ray Train keeps its state in ``<run_dir>/<stage>``: the same run
    name resumes from the latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, t = settings.cfg, settings.cfg.train
    gpu = _use_gpu(cfg)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return TorchTrainer(
        distill_worker,  # train_loop, by way of a module the controller can import cheaply
        train_loop_config=settings.loop_config(),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=settings.stage,
            storage_path=run_dir(cfg),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=t.checkpoint_metric,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks),
        ),
        datasets={"train": dataset},
    )


def _finished(cfg: Config, stage: str) -> DistillResult | None:
    """The recorded result of a stage this run name already finished (same step count)."""
    if is_remote(run_dir(cfg)):
        return None
    file = Path(run_dir(cfg)) / stage / RESULT
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    if data.get("steps") != stage_steps(cfg, stage) or not Path(data["checkpoint"]).is_dir():
        return None  # more steps asked for (continue), or the checkpoint is gone
    from ray.train import Checkpoint

    ckpt = Checkpoint(data["checkpoint"])
    return DistillResult(
        Path(data["artifact_dir"]),
        ckpt,
        data.get("mlflow_run_id"),
        data["metrics"],
        stage,
        beats_step0=data.get("beats_step0"),
    )


def _local_artifact(checkpoint: Any, cfg: Config, stage: str) -> Path:
    """The checkpoint's artifact folder as a local path (downloaded for remote storage)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path) / ARTIFACT
    local = Path(cfg.train.out if not is_remote(cfg.train.out) else ".").resolve()
    target = local / "artifacts" / cfg.run_name / stage
    checkpoint.to_directory(str(target))
    return target / ARTIFACT


def run_stage(
    cfg: Config,
    stage: str,
    tracker: Tracker,
    parent_id: str | None = None,
    init_checkpoint: Any = None,
    dataset: Any = None,
    val: ValidationInputs | None = None,
    callbacks: Any = (),
    close_on_error: bool = True,
) -> DistillResult:
    """Fit one stage (or pick up its recorded result) and log its artifact to MLflow.

    The one stage runner: ``dcm distill`` and every sweep trial (which adds its Tune
    ``callbacks``) run a stage through here. A sweep trial passes ``close_on_error=False``:
    when ASHA stops a trial, its dying actor raises out of ``fit()`` after the sweep has
    already closed the run as KILLED, so the sweep's driver alone sets the ending status.
    """
    done = _finished(cfg, stage)
    if done is not None:
        log.info("stage %s already finished: %s", stage, done.artifact_dir)
        return done
    check_detail_start(stage, cfg.train.init_from, init_checkpoint)
    dataset = training_data(cfg) if dataset is None else dataset
    val = validation_inputs(cfg, dataset) if val is None else val  # its captions name val/score
    # what every worker gets; checked (the stage) before the MLflow run opens
    stage_dir = f"{run_dir(cfg)}/{stage}"  # Ray Train's folder of this stage
    marker = f"{stage_dir}/{DIVERGED_FILE}"
    read_diverged(marker, remove=True)  # a rerun (lower rate) starts without the old one
    settings = StageSettings(
        cfg, stage, val, init_checkpoint=init_checkpoint,
        torch_extensions_dir=os.environ.get("TORCH_EXTENSIONS_DIR", ""), diverged_marker=marker,
    )  # fmt: skip
    logger = tracker.open_run(stage, parent_id)
    settings = dataclasses.replace(settings, logger=logger)
    trainer = make_trainer(settings, dataset, callbacks)
    try:
        result = trainer.fit()
    except Exception:
        if close_on_error:
            tracker.close_run(logger, "FAILED")
        raise
    diverged = read_diverged(marker)
    if diverged is not None:
        tracker.close_run(logger, "FAILED")
        kept = f"the checkpoints before it stay in {stage_dir}"
        if result.checkpoint is None:
            kept = "no checkpoint had been written yet"
        raise DivergedError(
            diverged_message(stage, settings.lr, diverged["step"], diverged["metrics"], kept)
        )
    final = dict(result.metrics or {})  # the last checkpoint's report: the final student's
    checkpoint, metrics = best_checkpoint(result, cfg.train.checkpoint_metric)
    artifact = _local_artifact(checkpoint, cfg, stage)
    logger.log_artifacts(artifact, "artifact")
    beats = record_selection(logger, cfg, stage, val.captions, final, metrics)
    tracker.close_run(logger)
    out = DistillResult(
        artifact, checkpoint, logger.run_id, dict(metrics), stage, beats_step0=beats
    )
    if not is_remote(run_dir(cfg)):
        record = {
            "stage": stage, "steps": settings.steps, "checkpoint": checkpoint.path,
            "artifact_dir": str(artifact), "mlflow_run_id": logger.run_id,
            "metrics": _plain_metrics(metrics), "beats_step0": beats,
        }  # fmt: skip
        file = Path(run_dir(cfg)) / stage / RESULT
        file.write_text(json.dumps(record, indent=2, sort_keys=True))
    return out


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------- the run
def run_distill(cfg: Config, stage: str | None = None, *, dataset: Any = None) -> DistillResult:
    """Distil ``stage`` (default ``train.stage``): 'semantic', 'detail' or 'both'."""
    from pipelines.cluster import init_ray, shutdown

    stage = stage or cfg.train.stage
    cfg = pipelines.args.absolute_paths(cfg)  # Train workers run in their own working directories
    if stage not in (*STAGES, "both"):
        raise ConfigError(f"stage '{stage}' is not allowed: choose semantic, detail or both")
    check_detail_start(stage, cfg.train.init_from)
    ctx = init_ray(cfg.ray, model=cfg.model.path)
    try:
        dataset = training_data(cfg) if dataset is None else dataset  # bad input fails first
        val = validation_inputs(cfg, dataset)
        if not is_remote(run_dir(cfg)):
            Path(run_dir(cfg)).mkdir(parents=True, exist_ok=True)
        tracker = Tracker(cfg, run_dir(cfg))
        if stage != "both":
            return publish(cfg, run_stage(cfg, stage, tracker, dataset=dataset, val=val), tracker)
        parent = tracker.open_run(PARENT)
        try:
            sem = run_stage(cfg, "semantic", tracker, parent.run_id, dataset=dataset, val=val)
            det = run_stage(
                cfg, "detail", tracker, parent.run_id, sem.checkpoint, dataset=dataset, val=val
            )
        except Exception:
            tracker.close_run(parent, "FAILED")
            raise
        parent.log_metrics({f"{s}/{k}": v for s, r in (("semantic", sem), ("detail", det))
                            for k, v in r.metrics.items() if k.startswith("val/")}, step=0)  # fmt: skip
        tracker.close_run(parent)
        return publish(cfg, DistillResult(
            det.artifact_dir, det.checkpoint, parent.run_id, det.metrics, "both",
            stages={"semantic": sem, "detail": det}, beats_step0=det.beats_step0,
        ), tracker)  # fmt: skip
    finally:
        shutdown(ctx)


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcm distill", description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="ingest folder (parquet) or raw videos (online stream)")
    parser.add_argument("--stage", choices=("semantic", "detail", "both"), help="train.stage")
    parser.add_argument("--out", help="root of run directories (train.out)")
    pipelines.args.add_common(parser)
    args = parser.parse_args(argv)
    cfg = pipelines.args.resolve(
        args,
        **pipelines.args.data_keys(args.data),
        **{"train.stage": args.stage, "train.out": args.out},
    )
    result = run_distill(cfg)
    summary = {
        "stage": result.stage,
        "artifact": str(result.artifact_dir),
        "checkpoint": result.checkpoint.path,
        "mlflow_run_id": result.mlflow_run_id,
        "val/score": result.metrics.get("val/score"),
        "beats_step0": result.beats_step0,
        "registered": (result.registered or {}).get("uri"),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(pipelines.args.run_main(main))
