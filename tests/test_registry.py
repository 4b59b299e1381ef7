"""The MLflow model registry round trip on a real sqlite store.

A distill run's result is published (export -> pyfunc -> registered version with the run's
metrics); ``models:/NAME/VERSION`` then loads with ``mlflow.pyfunc.load_model``, feeds
``dcm generate`` and a Serve request, and gives the artifact's videos.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
from test_export import PROMPT, perturbed_artifact

from dcm.config import ConfigError, load_config
from dcm.generate import VideoGenerator
from dcm.video import read_video

NAME = "dcm-shapes"
SMALL = {"num_frames": 5, "height": 64, "width": 64}


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """uint8 videos equal up to one level on a handful of pixels."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return bool(diff.max() <= 1 and (diff > 0).mean() < 1e-3)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(store URI, artifact, publish result) after publishing one finished run."""
    from pipelines.distill import DistillResult
    from pipelines.registry import publish
    from pipelines.tracking import Tracker

    root = tmp_path_factory.mktemp("registry")
    mp = pytest.MonkeyPatch()
    mp.setenv("DCM_MODEL_CACHE", str(root / "cache"))  # where models:/ URIs are fetched to
    art = perturbed_artifact(root / "artifact")
    cfg = load_config(preset="shapes-tiny", overrides=[f"tracking.register_as={NAME}"])
    tracker = Tracker(cfg, root / "run")
    logger = tracker.open_run("both")
    logger.log_metrics({"val/score": 0.42}, step=0)
    tracker.close_run(logger)
    result = DistillResult(art, None, logger.run_id, {"val/score": 0.42, "step": 7}, "both")
    publish(cfg, result, tracker)
    again = DistillResult(art, None, logger.run_id, {}, "both")
    publish(cfg, again, tracker)  # a re-run of the same run finds its version
    assert again.registered["version"] == result.registered["version"]
    yield tracker.uri, art, result
    mp.undo()


def test_version_carries_the_run_and_its_metrics(registered):
    from mlflow import MlflowClient

    uri, _, result = registered
    assert result.registered["uri"] == f"models:/{NAME}/1"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    v = versions[0]
    assert v.run_id == result.mlflow_run_id
    assert float(v.tags["val/score"]) == 0.42 and float(v.tags["step"]) == 7.0
    logged = client.get_logged_model(result.registered["model_id"])
    assert {m.key: m.value for m in logged.metrics}["val/score"] == 0.42


def test_pyfunc_from_the_registry_makes_the_artifacts_videos(registered, monkeypatch):
    import mlflow.pyfunc

    uri, art, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    videos = model.predict([PROMPT], params={"steps": 2, "seed": 3, "num_frames": 5})
    assert videos.dtype == np.uint8 and videos.shape == (1, 5, 64, 64, 3)
    want = VideoGenerator.load(art).generate([PROMPT], steps=2, seed=3, **SMALL)
    assert close(videos, want)
    with pytest.raises(Exception, match="prompt"):
        model.predict({"text": ["x"]})


def test_dcm_generate_takes_a_models_uri(registered, tmp_path, capsys, monkeypatch):
    from pipelines.args import run_main
    from pipelines.generate import main
    from pipelines.registry import local_model

    uri, art, _ = registered
    out = tmp_path / "v.mp4"
    argv = ["--model", f"models:/{NAME}/1", "--prompt", PROMPT, "--steps", "2", "--seed", "3",
            "--frames", "5", "--out", str(out), "--set", f"tracking.uri={uri}"]  # fmt: skip
    assert run_main(main, argv) == 0
    frames = read_video(out)
    assert frames.shape == (5, 64, 64, 3)
    folder = local_model(f"models:/{NAME}/1", uri)
    assert VideoGenerator.load(folder).source == "exported"
    # dcm export of a registered model starts from the artifact logged with it
    from pipelines.export import main as export_main

    lora = tmp_path / "lora"
    assert run_main(export_main, ["--model", f"models:/{NAME}/1", "--format", "lora",
                                  "--out", str(lora), "--set", f"tracking.uri={uri}"]) == 0  # fmt: skip
    assert (lora / "dcm_detail_lora.safetensors").is_file()
    # unknown versions and missing stores are one sentence
    argv[1] = f"models:/{NAME}/9"
    assert run_main(main, argv) == 2
    assert "could not fetch 'models:/dcm-shapes/9'" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking.uri"):
        local_model("models:/x/1", "")


@pytest.mark.ray
def test_serve_answers_from_a_registered_model(registered, ray_cluster, tmp_path):
    from conftest import free_port

    from pipelines.serve import start, stop

    uri, art, _ = registered
    cfg = load_config(preset="shapes-tiny").replace(
        **{
            "model.path": f"models:/{NAME}/1",
            "tracking.uri": uri,
            "serve.port": free_port(),
            "serve.job_store": str(tmp_path / "jobs"),
            "serve.replica_cpus": 0.5,
            "serve.min_replicas": 1,
            "serve.max_replicas": 1,
        }
    )
    url = start(cfg, name="registry")
    try:
        body = {"prompt": PROMPT, "steps": 2, "seed": 3, "format": "mp4", **SMALL}
        resp = requests.post(f"{url}/v1/generate", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        (tmp_path / "s.mp4").write_bytes(resp.content)
        assert read_video(tmp_path / "s.mp4").shape == (5, 64, 64, 3)
    finally:
        stop()
