"""MLflow helpers of the distillation runner: sqlite default, nested runs, resume, disabled."""

from __future__ import annotations

import pytest

from dcm.config import ConfigError, load_config
from pipelines.tracking import PARENT, RunLogger, Tracker, tracking_uri

pytestmark = pytest.mark.timeout(120)


def _cfg(tmp_path, *extra: str):
    return load_config(None, "shapes-tiny", [f"train.out={tmp_path}", "train.run_name=r1", *extra])


def test_default_uri_is_sqlite_in_the_run_dir_and_remote_needs_a_uri(tmp_path):
    cfg = _cfg(tmp_path)
    assert tracking_uri(cfg, tmp_path / "r1") == f"sqlite:///{tmp_path / 'r1' / 'mlflow.db'}"
    given = _cfg(tmp_path, "tracking.uri=http://127.0.0.1:5000")
    assert tracking_uri(given, "s3://bucket/runs/r1") == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match="tracking.uri"):
        tracking_uri(_cfg(tmp_path, "train.out=s3://bucket/runs"), "s3://bucket/runs/r1")


def test_nested_runs_params_metrics_artifacts_and_resume(tmp_path):
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    tracker = Tracker(cfg, run_dir)
    parent = tracker.open_run(PARENT)
    child = tracker.open_run("semantic", parent.run_id)
    child.log_metrics({"train/loss": 0.5, "val/score": float("nan"), "step": 1}, step=1)
    child.log_metrics({"train/loss": 0.25}, step=2)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "experts.safetensors").write_bytes(b"x")
    child.log_artifacts(tmp_path / "art", "artifact")
    tracker.close_run(child)

    assert (run_dir / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["dcm_stage"] == "semantic" and run.data.tags["dcm_run"] == "r1"
    assert run.data.params["method.split"] == str(cfg.method.split)
    assert run.data.params["stage"] == "semantic"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(child.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert "val/score" not in run.data.metrics  # non-finite values are dropped, not logged
    assert [f.path for f in client.list_artifacts(child.run_id, "artifact")] == [
        "artifact/experts.safetensors"
    ]
    # the artifact store lives in the run directory too
    assert (run_dir / "mlartifacts").is_dir()

    # Re-running the same run name finds the same runs (a resumed run keeps its history).
    again = Tracker(cfg, run_dir)
    assert again.open_run("semantic", parent.run_id).run_id == child.run_id
    assert again.open_run(PARENT).run_id == parent.run_id
    assert client.get_run(child.run_id).info.status == "RUNNING"


def test_a_given_sqlite_store_keeps_its_artifacts_next_to_it(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever directory the job was started from (MLflow's default)."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    cfg = _cfg(tmp_path, f"tracking.uri=sqlite:///{store / 'mlflow.db'}")
    tracker = Tracker(cfg, tmp_path / "r1")
    run = tracker.open_run("semantic")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "experts.safetensors").write_bytes(b"x")
    run.log_artifacts(tmp_path / "art", "artifact")
    tracker.close_run(run)
    assert (store / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_disabled_tracking_is_a_no_op(tmp_path):
    cfg = _cfg(tmp_path, "tracking.enabled=false")
    tracker = Tracker(cfg, tmp_path / "r1")
    logger = tracker.open_run("semantic")
    assert logger == RunLogger() and not logger.enabled
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.log_artifacts(tmp_path)
    tracker.close_run(logger)
    assert not (tmp_path / "r1").exists()
