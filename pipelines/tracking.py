"""MLflow for distillation runs and sweeps: the one module that talks to MLflow.

One run per stage, nested under a parent for `both`; a sweep has a parent run with one
child run per trial, the trial's stages nested below it.

The default store is sqlite inside the run directory (``sqlite:///<train.out>/<run>/mlflow.db``,
artifacts next to it in ``mlartifacts/``); ``tracking.uri`` points at an ``mlflow server``
or another sqlite file (a new experiment there keeps its artifacts next to that file).
``tracking.enabled=false`` makes every call a no-op.

The driver opens the runs (``Tracker``); training workers get a ``RunLogger`` that holds
only strings (URI and run id), so it pickles into the Ray Train loop config, and rank 0
logs through it. Runs carry the tags ``dcm_run`` and ``dcm_stage``: re-running the same
run name finds its runs again, so a resumed run keeps logging into the same MLflow runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcm.config import Config, ConfigError
from dcm.files import is_remote

PARENT = "both"  # dcm_stage tag of the parent run of a two-stage run
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch
SQLITE = "sqlite:///"  # prefix of a sqlite store URI; the rest is the database file's path


def tracking_uri(cfg: Config, run_dir: str | Path) -> str:
    """``tracking.uri``, or the sqlite file of the run directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if is_remote(run_dir):
        raise ConfigError(
            f"train.out='{cfg.train.out}' is remote, so the default sqlite MLflow store cannot "
            "live in the run directory: set tracking.uri (an mlflow server) or tracking.enabled=false"
        )
    return f"{SQLITE}{Path(run_dir).resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class RunLogger:
    """Logs into one MLflow run; ``run_id=None`` (tracking disabled) makes it a no-op."""

    uri: str | None = None
    run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.uri and self.run_id)

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(val), now, int(step))
            for key, val in metrics.items()
            if isinstance(val, (int, float)) and math.isfinite(float(val))
        ]
        client = self._client()
        for i in range(0, len(items), _BATCH):
            client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client().log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client().log_artifact(self.run_id, str(local_file), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            client = self._client()
            for key, value in tags.items():
                client.set_tag(self.run_id, key, value)


class Tracker:
    """Driver side: the experiment, the (parent and stage) runs, params and their status."""

    def __init__(self, cfg: Config, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.uri = tracking_uri(cfg, run_dir) if self.enabled else None
        self.run_dir = run_dir
        self._experiment_id: str | None = None

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self._client()
            name = self.cfg.tracking.experiment
            exp = client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if self.uri and self.uri.startswith(SQLITE):
                    # Artifacts next to the database file (the run directory by default).
                    # MLflow's own default is ./mlruns under whatever the working directory is.
                    db = Path(self.uri.removeprefix(SQLITE))
                    location = (db.resolve().parent / "mlartifacts").as_uri()
                self._experiment_id = client.create_experiment(name, artifact_location=location)
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def find_run(self, stage: str) -> str | None:
        """The id of this run name's existing MLflow run for ``stage`` (resume), if any."""
        if not self.enabled:
            return None
        runs = self._client().search_runs(
            [self.experiment_id()],
            filter_string=f"tags.dcm_run = '{self.cfg.run_name}' and tags.dcm_stage = '{stage}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def open_run(
        self,
        stage: str,
        parent_id: str | None = None,
        *,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        config: bool = True,
        resume: bool = True,
    ) -> RunLogger:
        """Find (``resume``) or create the MLflow run of ``stage`` under ``parent_id``.

        Params: the resolved config (unless ``config=False``) plus ``params``; ``tags`` are
        added to ``dcm_run`` / ``dcm_stage``. Default names: nested runs by their stage,
        standalone ones by run name + stage, the parent of ``both`` by the run name.
        """
        if not self.enabled:
            return RunLogger()
        client = self._client()
        run_id = self.find_run(stage) if resume else None
        if run_id is None:
            all_tags = {"dcm_run": self.cfg.run_name, "dcm_stage": stage, **(tags or {})}
            if parent_id:
                all_tags["mlflow.parentRunId"] = parent_id
            if name is None and stage == PARENT:
                name = self.cfg.run_name
            elif name is None:
                name = stage if parent_id else f"{self.cfg.run_name}-{stage}"
            run = client.create_run(self.experiment_id(), run_name=name, tags=all_tags)
            run_id = run.info.run_id
            flat = {**self.cfg.flat(), "stage": stage} if config else {}
            self._log_params(run_id, {**flat, **(params or {})})
        else:
            self.reopen(run_id)
        return RunLogger(self.uri, run_id)

    def _log_params(self, run_id: str, flat: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        client = self._client()
        for i in range(0, len(params), _BATCH):
            client.log_batch(run_id, params=params[i : i + _BATCH])

    def child_runs(self, parent_id: str | None, stage: str) -> list[Any]:
        """The MLflow runs of ``stage`` nested directly under ``parent_id``."""
        if not self.enabled or parent_id is None:
            return []
        return self._client().search_runs(
            [self.experiment_id()],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.dcm_stage = '{stage}'",
            max_results=10000,
        )

    def close_run(self, logger: RunLogger, status: str = "FINISHED") -> None:
        if logger.enabled:
            self._client().set_terminated(logger.run_id, status=status)

    def reopen(self, run_id: str | None) -> None:
        """Mark an existing run RUNNING again (a resumed sweep's parent)."""
        if self.enabled and run_id:
            self._client().update_run(run_id, status="RUNNING")

    def logger(self, run_id: str | None) -> RunLogger:
        """A RunLogger for an existing run id (None when tracking is off)."""
        return RunLogger(self.uri, run_id) if self.enabled and run_id else RunLogger()
