"""The MLflow model registry: log a distilled model as a pyfunc, register it, fetch it back.

- ``register_model``: export the artifact as a diffusers folder, log it as an MLflow
  ``pyfunc`` (``pipelines.pyfunc.DCMVideoModel``) in a run, register it under a name and put
  the run's metrics on the version (tags) and on the logged model;
- ``local_model``: the one resolver of ``--model`` for the stages: ``models:/NAME/VERSION``
  (or ``models:/NAME@alias``, ``runs:/...``) is fetched once into a cache and becomes the
  exported diffusers folder inside it; any other path comes back unchanged
  (``VideoGenerator.load`` tells artifacts, exported folders and bundles apart).

The store is ``tracking.uri`` when set, else ``MLFLOW_TRACKING_URI`` (a registry is one
``--set tracking.uri=sqlite:///runs/x/mlflow.db`` away).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from dcm.config import ConfigError

log = logging.getLogger(__name__)

URI_SCHEMES = ("models:/", "runs:/")
MODEL_NAME = "model"  # the logged model's name inside its run
DONE = ".dcm-complete"


def is_model_uri(path: str | Path | None) -> bool:
    return str(path or "").startswith(URI_SCHEMES)


def _store(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ConfigError(
            "a models:/ URI needs the MLflow store holding the registry: set tracking.uri "
            "(--set tracking.uri=sqlite:///RUN_DIR/mlflow.db) or MLFLOW_TRACKING_URI"
        )
    return uri


def _cache_root() -> Path:
    return Path(os.environ.get("DCM_MODEL_CACHE", Path.home() / ".cache" / "dcm" / "models"))


def local_model(path: str | Path, tracking_uri: str | None = None, part: str = "model") -> str:
    """``--model`` as a local path: registry URIs are fetched (once) to their exported folder
    (``part="model"``) or the distilled artifact it was exported from (``part="artifact"``)."""
    text = str(path)
    if not is_model_uri(text):
        return text
    store = _store(tracking_uri)
    key = hashlib.sha256(f"{store}|{text}".encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.split(":/", 1)[1])
    dest = _cache_root() / f"{name.strip('_')}-{key}"
    if not (dest / DONE).is_file():
        import mlflow.artifacts

        if dest.exists():
            shutil.rmtree(dest)  # an interrupted download
        dest.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=text, dst_path=str(dest), tracking_uri=store, registry_uri=store
            )
        except Exception as err:  # noqa: BLE001 - unknown name/version, store down: one sentence
            shutil.rmtree(dest, ignore_errors=True)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"could not fetch '{text}' from the MLflow store {store}: {first}"
            ) from None
        (dest / DONE).write_text(text)
    return str(_model_part(dest, text, part))


def _model_part(model_dir: Path, uri: str, part: str) -> Path:
    """An artifact ('model': the exported folder, 'artifact') of a downloaded pyfunc model."""
    from mlflow.models import Model

    if not (model_dir / "MLmodel").is_file():
        raise ConfigError(f"'{uri}' is not an MLflow model (no MLmodel file): register it with dcm")
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(part)
    if not entry:
        raise ConfigError(f"'{uri}' is not a DCM pyfunc model with a '{part}' artifact")
    return model_dir / entry["path"]


def register_model(
    exported: str | Path,
    tracking_uri: str,
    run_id: str,
    name: str,
    metrics: dict[str, Any] | None = None,
    artifact: str | Path | None = None,
) -> dict[str, Any]:
    """Log the exported folder (and the ``artifact`` it came from, for ``dcm export`` of a
    registered model) as a pyfunc in ``run_id`` and register it as ``name``.

    Returns {"name", "version", "uri" ("models:/NAME/VERSION"), "model_id", "run_id"}.
    The run's numeric metrics go on the logged model and, as tags, on the version.
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from pipelines.pyfunc import ARTIFACT_KEY, DCMVideoModel, signature

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    plain = {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=DCMVideoModel(),
            artifacts={
                ARTIFACT_KEY: str(exported),
                **({"artifact": str(artifact)} if artifact else {}),
            },
            signature=signature(),
            registered_model_name=name,
            pip_requirements=_requirements(),
        )
        if plain:
            mlflow.log_metrics(plain, model_id=info.model_id)
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for key, val in plain.items():
        client.set_model_version_tag(name, version, key, repr(val))
    client.update_model_version(
        name, version, description=f"DCM few-step model from run {run_id}; metrics in its tags"
    )
    return {
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "model_id": info.model_id,
        "run_id": run_id,
    }


def _requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc (no inference run: that would load the model)."""
    out = []
    for dist in ("torch", "diffusers", "transformers", "peft", "safetensors", "mlflow"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def publish(cfg: Any, result: Any, tracker: Any) -> Any:
    """After a distill run: export its model, log it as a pyfunc in the run's MLflow run and
    register it under ``tracking.register_as`` (once per run: a re-run finds its version).

    ``result`` is a ``pipelines.distill.DistillResult``; its ``registered`` is set to
    ``register_model``'s answer. A no-op without a name or with tracking disabled.
    """
    name = cfg.tracking.register_as
    if not name or not tracker.enabled or not result.mlflow_run_id:
        return result
    import tempfile

    from mlflow import MlflowClient

    from dcm.export import export_diffusers
    from dcm.files import is_remote

    uri, run_id = tracker.uri, result.mlflow_run_id
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        v = max(found, key=lambda m: int(m.version))
        result.registered = {
            "name": name, "version": str(v.version), "uri": f"models:/{name}/{v.version}",
            "model_id": getattr(v, "model_id", None), "run_id": run_id,
        }  # fmt: skip
        return result
    root = tracker.run_dir
    base = Path(tempfile.mkdtemp(prefix="dcm-export-")) if is_remote(str(root)) else Path(root)
    exported = export_diffusers(
        result.artifact_dir, base / "export" / "diffusers", cfg, overwrite=True
    )
    result.registered = register_model(
        exported, uri, run_id, name, result.metrics, artifact=result.artifact_dir
    )
    log.info("registered %s (%s)", result.registered["uri"], uri)
    return result


def with_local_model(cfg: Any) -> Any:
    """``cfg`` with a registry URI in model.path replaced by its fetched local folder."""
    if not is_model_uri(cfg.model.path):
        return cfg
    return cfg.replace(**{"model.path": local_model(cfg.model.path, cfg.tracking.uri)})
