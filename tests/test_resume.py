"""Fault tolerance of the distillation runner on 2 CPU workers.

A worker process is SIGKILLed after the first checkpoint is registered: Ray Train restarts
the group (FailureConfig(max_failures=1)), the loop resumes from that checkpoint and the
run completes with a continuous step count. Re-running the same run name with more steps
then continues from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_distill import distill_config, shapes_latents

from dcm.config import ConfigError
from pipelines.train_loop import cosine_factor

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _train_workers() -> list[int]:
    """Pids of the Ray Train workers of this test session's cluster (our descendants)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def checkpoint_registered(stage_dir: Path) -> bool:
    """Ray Train has registered a checkpoint of this stage (docs/RUNTIME.md). A checkpoint
    folder, state.json included, is copied before the controller records it in its snapshot;
    a run stopped in between restarts from the checkpoint before, or from step 0."""
    try:
        snapshot = json.loads((stage_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def _kill_a_worker_after_first_checkpoint(stage_dir: Path, stop: threading.Event, log: list):
    """SIGKILL one RayTrainWorker once Ray has registered a checkpoint of the stage."""
    try:
        while not stop.is_set():
            workers = _train_workers() if checkpoint_registered(stage_dir) else []
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                log.append(workers[-1])
                return
            time.sleep(0.1)
    except Exception as err:  # noqa: BLE001 - reported by the test, not lost in the thread
        log.append(err)


@pytest.fixture(scope="module")
def killed_run(ray_cluster, tmp_path_factory):
    from pipelines.distill import run_dir, run_distill

    bundle, latents = shapes_latents(tmp_path_factory)
    out = tmp_path_factory.mktemp("resume_runs")
    cfg = distill_config(
        bundle, latents, out,
        "train.stage=semantic", "train.steps_semantic=5", "train.checkpoint_every=2",
        "train.max_failures=1", "train.run_name=crash1", "sample.eval_steps=[2]",
        "sample.steps=2", "method.ema_decay=0.9",  # the EMA target is restored too
        "train.average_decay=0.99",  # and the exported weight average
        "train.lr_decay=cosine",  # and the rate schedule (DeepSpeed's client scheduler)
    )  # fmt: skip
    stop, killed = threading.Event(), []
    watcher = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint,
        args=(Path(run_dir(cfg)) / "semantic", stop, killed),
        daemon=True,
    )
    watcher.start()
    try:
        result = run_distill(cfg)
    finally:
        stop.set()
        watcher.join(timeout=10)
    return cfg, result, killed


@pytest.mark.timeout(480)
def test_killed_worker_restarts_from_last_checkpoint(killed_run):
    from mlflow import MlflowClient

    from pipelines.distill import run_dir

    cfg, result, killed = killed_run
    assert len(killed) == 1 and isinstance(killed[0], int), f"no worker was killed: {killed}"
    assert result.metrics["step"] == 5.0
    # The restarted group resumed from a registered checkpoint, not from step 0.
    resumed = int(result.metrics["resumed_from"])
    assert resumed in (2, 4)
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir(cfg)) / 'mlflow.db'}")
    steps = {m.step for m in client.get_metric_history(result.mlflow_run_id, "train/loss")}
    assert steps == set(range(1, 6))  # continuous: every step logged, none skipped
    history = client.get_metric_history(result.mlflow_run_id, "resumed_from")
    assert max(m.value for m in history) == resumed
    # the cosine rate goes on from the restored step, not from the top
    base, total = cfg.train.lr_semantic, cfg.train.steps_semantic
    for m in client.get_metric_history(result.mlflow_run_id, "train/lr"):
        assert m.value == pytest.approx(base * cosine_factor(total)(m.step), abs=1e-12), m.step


@pytest.mark.timeout(480)
def test_checkpoints_export_the_weight_average_and_keep_it_for_resume(killed_run):
    """train.average_decay: the artifact holds the average (restored after the kill and
    saved with each checkpoint), the DeepSpeed state the live weights training goes on from."""
    from safetensors.torch import load_file

    cfg, result, _ = killed_run
    folder = Path(result.checkpoint.path)
    exported = load_file(folder / "artifact" / "experts.safetensors")
    replicated = torch.load(folder / "replicated.pt", weights_only=False)
    assert set(replicated) == {"ema", "average"}
    average = replicated["average"]
    assert average["updates"] == json.loads((folder / "state.json").read_text())["step"]
    live = torch.load(next((folder / "ds").glob("mp_rank_*_model_states.pt")), weights_only=False)
    trained = average["shadow"]
    assert trained and set(trained) <= set(exported)
    moved = 0
    for name, value in trained.items():
        assert torch.equal(exported[name], value.float())
        moved += not torch.equal(live["module"][name].float(), value.float())
    assert moved > len(trained) // 2  # the average trails the live weights


@pytest.mark.timeout(480)
def test_rerun_with_more_steps_continues_from_the_latest_checkpoint(killed_run):
    from pipelines.distill import run_distill

    cfg, first, _ = killed_run
    # a lower rate too (what a rerun after a divergence sets): the config's rate wins over
    # the one the optimiser state brings back
    lr = cfg.train.lr_semantic / 4
    more = cfg.replace(
        **{"train.steps_semantic": 7, "train.max_failures": 0, "train.lr_semantic": lr}
    )
    result = run_distill(more)
    assert result.metrics["step"] == 7.0
    assert result.metrics["resumed_from"] == 5.0
    assert result.mlflow_run_id == first.mlflow_run_id  # the same MLflow run goes on
    # the decay's base is the config's new rate, over the new length, from step 5 on
    from mlflow import MlflowClient

    from pipelines.distill import run_dir

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir(cfg)) / 'mlflow.db'}")
    rates = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "train/lr")}
    assert rates[6] == pytest.approx(lr * cosine_factor(7)(6), rel=1e-6)
    assert result.metrics["train/lr"] == pytest.approx(0.0, abs=1e-12)


def test_an_interrupted_save_is_not_a_checkpoint(tmp_path):
    """A folder a crash left without state.json is refused with one clear sentence."""
    from pipelines.checkpoints import TrainState, read_state

    (tmp_path / "ds").mkdir()
    with pytest.raises(ConfigError, match="incomplete"):
        read_state(tmp_path)
    (tmp_path / "state.json").write_text(
        '{"stage": "semantic", "step": 4, "epoch": 1, "batch_in_epoch": 0, "samples": 16, '
        '"metrics": {}, "version": 1}'
    )
    assert read_state(tmp_path) == TrainState("semantic", 4, 1, 0, 16, {})
