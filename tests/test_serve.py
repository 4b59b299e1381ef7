"""The Serve endpoint over real HTTP on 127.0.0.1: one app per module on the session cluster.

Tiny random bundles (default + two variants built from other seeds); small clips (5-9 frames
of 32-64 px) keep each request well under a second on two cores. Each test sets up the
replica count it needs (``one_replica()``: the autoscaler goes back to one replica seconds
after the load stops), so the tests pass in any order.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from dcm.config import load_config
from dcm.tiny import build_tiny_bundle
from dcm.video import read_video

KEY = "test-key-123"
KEY_ENV = "DCM_TEST_SERVE_KEY"
AUTH = {"X-API-Key": KEY}
ROOT = Path(__file__).parents[1]
SERVE_YAML = ROOT / "serve" / "config.yaml"
RAYSERVICE = ROOT / "clusters" / "kuberay" / "rayservice.yaml"
SMALL = {"num_frames": 5, "height": 32, "width": 32, "steps": 2}

pytestmark = [pytest.mark.ray]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, monkeypatch_module):
    """(base URL, config) of the app: auth on, two variants, fast autoscaling. Any test may
    be its first user: each test's timeout includes starting it (up to 3 minutes)."""
    from pipelines.serve import start, stop

    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_bundle(root / "base", seed=0)
    # variants: another random bundle, and a detail-expert artifact on the base bundle
    variants = {
        "a": str(build_tiny_bundle(root / "a", seed=1)),
        "b": str(detail_artifact(base, root / "b")),
        "broken": str(root / "empty"),  # exists but holds no model
    }
    (root / "empty").mkdir()
    monkeypatch_module.setenv(KEY_ENV, KEY)
    cfg = load_config(preset="shapes-tiny").replace(
        **{
            "model.path": str(base),
            "serve.port": free_port(),
            "serve.variants": variants,
            "serve.api_key_env": KEY_ENV,
            "serve.job_store": str(root / "jobs"),
            "serve.max_height": 64,
            "serve.max_width": 64,
            "serve.max_frames": 17,
            "serve.replica_cpus": 0.5,
            "serve.min_replicas": 1,
            "serve.max_replicas": 2,
            "serve.upscale_delay_s": 1.0,
            "serve.downscale_delay_s": 2.0,  # back to one replica soon after a load test
            "serve.max_models_per_replica": 1,  # a second variant evicts the first
            "serve.metrics_interval_s": 0.5,
            "serve.look_back_period_s": 2.0,
            "serve.max_batch_size": 4,
            # a burst's requests wait 0.2 s for each other, so that batches form even where
            # the ingress hands them over one by one (an idle machine; seen failing at 0 s)
            "serve.batch_wait_timeout_s": 0.2,
            "serve.max_ongoing_requests": 4,
            "serve.max_queued": 8,
            "serve.retry_after_s": 3,
            "serve.request_timeout_s": 60.0,
        }
    )
    url = start(cfg)
    yield url, cfg
    stop()


def detail_artifact(bundle, out):
    """A distilled-style artifact: the bundle's model with a (perturbed) detail-expert LoRA."""
    import torch

    from dcm.generate import VideoGenerator

    cfg = load_config(preset="shapes-tiny")
    student = VideoGenerator.load(str(bundle), "cpu", cfg).student
    student.enable_detail_expert(cfg.lora)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:  # LoRA B starts at 0: move it so the expert differs
                param.add_(0.5)
    return student.save_artifact(out, cfg, str(bundle))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def generate(
    url: str, timeout: float = 60, headers: dict | None = None, **body
) -> requests.Response:
    payload = {"prompt": "a red circle moves left", **SMALL, **body}
    return requests.post(
        f"{url}/v1/generate", json=payload, headers=headers or AUTH, timeout=timeout
    )


def decode(resp: requests.Response, tmp_path, name: str) -> np.ndarray:
    suffix = "gif" if resp.headers["content-type"] == "image/gif" else "mp4"
    path = tmp_path / f"{name}.{suffix}"
    path.write_bytes(resp.content)
    return read_video(path)  # (F, H, W, 3) uint8


def generator_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["dcm"].deployments["Generator"].replica_states)


def one_replica(timeout: float = 120.0) -> str:
    """Wait until one generator replica runs and no other starts or stops (after a load
    test the autoscaler removes the second one within seconds); its id."""
    deadline, calm = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and calm < 4:
        calm = calm + 1 if generator_states() == {"RUNNING": 1} else 0
        time.sleep(0.5)
    assert generator_states() == {"RUNNING": 1}, generator_states()
    (replica,) = replica_ids()
    return replica


def replica_ids() -> list[str]:
    import ray

    prefix = "SERVE_REPLICA::dcm#Generator#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n[len(prefix) :] for n in names if n.startswith(prefix)]


# ---------------------------------------------------------------- without Ray
def test_batched_rows_match_solo_generation(tmp_path):
    from dcm.generate import VideoGenerator
    from serve.batching import generate_group, group_by_shape

    gen = VideoGenerator.load(str(build_tiny_bundle(tmp_path / "b", seed=0)), "cpu", load_config())
    prompts, seeds = ["a red circle", "a blue square moves up", "a star"], [3, 4, 3]
    shape = {"steps": 2, "num_frames": 5, "height": 32, "width": 32}
    group = [{"prompt": p, "seed": s, **shape} for p, s in zip(prompts, seeds, strict=True)]
    frames, timings = generate_group(gen, group)
    assert frames.shape == (3, 5, 32, 32, 3) and frames.dtype == np.uint8
    assert set(timings) == {"text", "denoise", "decode"}
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        solo = gen.generate([prompt], seed=seed, **shape)[0]
        assert np.abs(frames[i].astype(int) - solo).max() <= 1  # float batching noise only
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 2.0  # own seed per row
    assert not np.array_equal(frames[0], frames[2])  # same seed, other prompt

    items = [
        {"model": "default", "steps": 2, "num_frames": 5, "height": 32, "width": 32},
        {"model": "a", "steps": 2, "num_frames": 5, "height": 32, "width": 32},
        {"model": "default", "steps": 2, "num_frames": 5, "height": 32, "width": 32},
        {"model": "default", "steps": 4, "num_frames": 5, "height": 32, "width": 32},
    ]
    assert group_by_shape(items) == [[0, 2], [1], [3]]


class _Response:
    """A stand-in DeploymentResponse: awaitable after `delay`, records cancel()."""

    def __init__(self, result=None, exc=None, delay=0.0):
        self.result, self.exc, self.delay, self.cancelled = result, exc, delay, False

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        await asyncio.sleep(self.delay)
        if self.exc is not None:
            raise self.exc
        return self.result

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, response):
        self.response, self.model_id, self.generate = response, None, self

    def options(self, multiplexed_model_id):
        self.model_id = multiplexed_model_id
        return self

    def remote(self, params):
        return self.response


def test_generator_failures_map_to_http_errors():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from serve.app import call_generator
    from serve.limits import RequestError

    params = {"model": "default"}
    ok = _Handle(_Response({"video": b"v"}))
    assert asyncio.run(call_generator(ok, params, 5.0)) == {"video": b"v"}
    assert ok.model_id is None  # the default model is not multiplexed
    asyncio.run(call_generator(ok, {"model": "a"}, 5.0))
    assert ok.model_id == "a"

    cases = [
        (_Response(delay=5.0), 504, "timeout"),
        (_Response(exc=BackPressureError(4, 4)), 503, "overloaded"),
        (_Response(exc=ActorDiedError()), 503, "unavailable"),
        (_Response({"error": {"field": None, "message": "bad size"}}), 422, "invalid_request"),
        (_Response({"error": {"field": None, "message": "x", "status": 500}}), 500, "internal"),
    ]
    for response, status, kind in cases:
        with pytest.raises(RequestError) as err:
            asyncio.run(call_generator(_Handle(response), params, 0.2))
        assert (err.value.status, err.value.kind) == (status, kind)
    assert cases[0][0].cancelled  # a timed-out request is cancelled on the replica


def test_server_faults_are_json_500s_with_the_request_id():
    from fastapi.testclient import TestClient

    from serve.api import ApiSettings, create_api
    from serve.limits import Limits
    from serve.schemas import ModelCard

    async def broken(params):
        raise RuntimeError("replica fault")

    async def ready():
        return False

    cfg = load_config(preset="shapes-tiny")
    settings = ApiSettings(
        Limits.from_config(cfg), (ModelCard(id="default", path="x", default=True),), (), 5
    )
    client = TestClient(create_api(settings, broken, ready), raise_server_exceptions=False)
    resp = client.post(
        "/v1/generate", json={"prompt": "a", **SMALL}, headers={"X-Request-Id": "r-1"}
    )
    assert resp.status_code == 500
    assert resp.json()["error"] == {
        "type": "internal",
        "field": None,
        "message": "internal error (request id r-1): see the server log",
        "request_id": "r-1",
    }
    assert client.get("/readyz").status_code == 503


def serve_files() -> dict[str, str]:
    """Name -> text of the committed Serve config files (the RayService's serveConfigV2)."""
    import yaml

    rayservice = yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"]
    return {"serve/config.yaml": SERVE_YAML.read_text(), "rayservice": rayservice}


@pytest.mark.parametrize("name", ["serve/config.yaml", "rayservice"])
def test_serve_config_files_are_what_dcm_serve_writes(name, tmp_path, monkeypatch, capsys):
    """serve/config.yaml and the RayService's Serve config are written from the serve
    section by the command in their header: running it again gives the same text."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import main
    from serve.settings import command_of

    text = serve_files()[name]
    ServeDeploySchema.model_validate(yaml.safe_load(text))
    argv = command_of(text)
    target = argv[argv.index("--write-config") + 1]
    monkeypatch.chdir(tmp_path)  # a relative target is written here, not over the original
    (tmp_path / "serve").mkdir()
    assert main(argv) == 0
    written = capsys.readouterr().out if target == "-" else (tmp_path / target).read_text()
    assert written == text, f"{name} is out of date: run `{' '.join(['dcm', 'serve', *argv])}`"


@pytest.mark.parametrize("name", ["serve/config.yaml", "rayservice"])
def test_dcm_serve_reads_a_written_file_back_to_the_same_config(name, tmp_path, capsys):
    """`dcm serve --config FILE` (and the builder, through the same args) resolves the file to
    the config of the command that wrote it, as far as Serve reads it (training-only keys
    such as train.* are left out of the file): the args and http_options lose nothing."""
    import yaml

    from dcm.config import from_dict
    from pipelines.serve import main
    from serve.settings import SERVE_READS, command_of

    text = serve_files()[name]
    (tmp_path / "served.yaml").write_text(text)
    argv = command_of(text)
    i = argv.index("--write-config")
    resolved = []
    for args in (argv[:i] + argv[i + 2 :], ["--config", str(tmp_path / "served.yaml")]):
        with pytest.raises(SystemExit) as done:
            main([*args, "--dry-run"])
        assert done.value.code == 0
        flat = from_dict(yaml.safe_load(capsys.readouterr().out)).flat()
        resolved.append({k: v for k, v in flat.items() if k.startswith(SERVE_READS)})
    assert len(resolved[0]) > 40 and resolved[0] == resolved[1]


def test_a_file_for_an_artifact_follows_the_artifact_when_it_is_rebuilt(tmp_path, capsys):
    """Written for a distilled artifact alone (no preset, no config), the Serve file names
    only the model: the artifact's own training config is its base, so the grid it was built
    with is read from the artifact, and a rebuild with another grid needs no new file."""
    import json
    import shutil

    import yaml

    from dcm.bundle import BUNDLED
    from dcm.config import from_dict
    from pipelines.serve import main
    from serve.settings import AppArgs

    student = tmp_path / "student"
    shutil.copytree(BUNDLED["shapes-dcm"], student)
    path = tmp_path / "served.yaml"
    assert main(["--model", str(student), "--port", "8123", "--write-config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    assert args == {"model": str(student)}  # port is an http option, not an app arg

    def grid(cfg_args: list[str]) -> tuple[int, int, int]:
        with pytest.raises(SystemExit):
            main([*cfg_args, "--dry-run"])
        cfg = from_dict(yaml.safe_load(capsys.readouterr().out))
        return cfg.method.grid_points, cfg.method.split, cfg.serve.port

    built = json.loads((student / "dcm_artifact.json").read_text())["config"]["method"]
    assert grid(["--config", str(path)]) == (built["grid_points"], built["split"], 8123)

    meta = json.loads((student / "dcm_artifact.json").read_text())  # rebuilt on 20 points
    meta["config"]["method"].update(grid_points=20, split=13)
    (student / "dcm_artifact.json").write_text(json.dumps(meta))
    assert grid(["--config", str(path)]) == (20, 13, 8123)
    cfg = AppArgs.parse(args).resolve()  # the builder Serve calls, same args
    assert (cfg.method.grid_points, cfg.method.split, cfg.model.path) == (20, 13, str(student))
    # A preset named beside the model is the base instead, as on every dcm command.
    preset = AppArgs.parse({"preset": "shapes-tiny", "model": str(student)}).resolve()
    assert (preset.method.grid_points, preset.method.split) == (50, 34)


def test_artifact_base_is_the_artifact_config_only_when_nothing_else_is_named():
    """One rule for `dcm` commands, Serve files and the Serve builder: the artifact's own
    training config is the base unless a config file or a preset is named."""
    from dcm.config import artifact_base

    base = artifact_base("bundled:shapes-dcm")
    assert base is not None and base["method"]["grid_points"] == 10
    assert base["model"]["path"].endswith("student")
    assert artifact_base("bundled:shapes-dcm", config="my.yaml") is None
    assert artifact_base("bundled:shapes-dcm", preset="shapes-tiny") is None
    assert artifact_base("bundled:shapes") is None  # a diffusers folder, not an artifact
    assert artifact_base(None) is None and artifact_base("") is None


def test_a_serve_file_naming_a_preset_does_not_import_torch():
    """The Serve controller reads its file without torch when the file names a preset or a
    config, even beside a model: only an artifact alone needs its files read."""
    code = (
        "import sys\n"
        "from serve.settings import AppArgs\n"
        "c = AppArgs.parse({'preset': 'shapes-tiny', 'model': 'bundled:shapes-dcm'}).resolve()\n"
        "assert c.method.grid_points == 50, c.method.grid_points\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_dcm_serve_maps_serve_file_options_onto_the_serve_section(tmp_path, capsys):
    """A hand-written Serve file's http_options and Generator options land on the serve
    fields that generator_options writes back (one table, both ways); flags win."""
    import yaml

    from dcm.config import from_dict
    from pipelines.args import run_main
    from pipelines.serve import main
    from serve.settings import generator_options

    options = {
        "max_ongoing_requests": 6,
        "max_queued_requests": 5,
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 7, "upscale_delay_s": 3.0},
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.5},
    }
    served = {
        "http_options": {"host": "127.0.0.1", "port": 8123},
        "applications": [
            {
                "name": "dcm",
                "import_path": "serve.app:build_app",
                "args": {"preset": "shapes-tiny", "max_batch_size": 3, "variants": {"x": "/m"}},
                "deployments": [{"name": "Generator", **options}],
            }
        ],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(served))
    argv = ["--config", str(tmp_path / "s.yaml"), "--port", "8555", "--dry-run"]
    with pytest.raises(SystemExit):
        main([*argv, "--set", "serve.max_queued=9"])
    s = from_dict(yaml.safe_load(capsys.readouterr().out)).serve
    assert (s.port, s.max_batch_size, s.variants) == (8555, 3, {"x": "/m"})
    written = generator_options(s)
    assert written["max_ongoing_requests"] == 6
    assert written["max_queued_requests"] == 9  # --set wins over the file
    for key in ("autoscaling_config", "ray_actor_options"):
        assert {k: written[key][k] for k in options[key]} == options[key]

    bad = {"name": "Generator", "graceful_shutdown_timeout_s": 3}
    served["applications"][0]["deployments"] = [bad]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(served))
    assert run_main(main, ["--config", str(tmp_path / "bad.yaml"), "--dry-run"]) == 2
    assert "Generator.graceful_shutdown_timeout_s' is not supported" in capsys.readouterr().err


def test_bad_builder_args_fail_in_one_sentence(tmp_path, monkeypatch):
    from dcm.config import ConfigError
    from pipelines.args import run_main
    from pipelines.serve import main
    from serve.app import build_app

    with pytest.raises(ConfigError, match="model.path: model path '/nope' does not exist"):
        build_app({"model": "/nope"})
    monkeypatch.delenv("DCM_UNSET_KEY", raising=False)
    bundle = build_tiny_bundle(tmp_path / "b")
    with pytest.raises(ConfigError, match="DCM_UNSET_KEY"):
        build_app({"model": str(bundle), "api_key_env": "DCM_UNSET_KEY"})
    with pytest.raises(ConfigError, match="reserved name"):
        build_app({"model": str(bundle), "variants": {"default": str(bundle)}})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({"model": str(bundle), "set": ["serve.max_batch_size=8"]})
    with pytest.raises(ConfigError, match="unknown arg 'max_replica'; did you mean 'max_replicas'"):
        build_app({"model": str(bundle), "max_replica": 3})
    with pytest.raises(ConfigError, match="'port' is not an app arg: set http_options.port"):
        build_app({"model": str(bundle), "port": 9000})
    (tmp_path / "bad.yaml").write_text(
        "applications:\n  - name: x\n    import_path: serve.app:build_app\n    args: {modle: x}\n"
    )
    assert run_main(main, ["--config", str(tmp_path / "bad.yaml")]) == 2


# ---------------------------------------------------------------- sequential requests
@pytest.mark.timeout(300)
def test_health_ready_docs_and_models(served):
    url, _ = served
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    docs = requests.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert "/v1/generate" in spec["paths"] and "/v1/models" in spec["paths"]
    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["default", "a", "b", "broken"]
    assert [m["default"] for m in models["data"]] == [True, False, False, False]


@pytest.mark.timeout(300)
def test_generate_mp4_and_gif_decode_to_the_requested_shape(served, tmp_path):
    url, _ = served
    resp = generate(url, num_frames=9, height=40, width=64, seed=7)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "video/mp4"
    assert resp.headers["x-request-id"]
    timing = resp.headers["server-timing"]
    for part in ("queue;dur=", "denoise;dur=", "generate;dur=", "video;dur=", "total;dur="):
        assert part in timing
    assert resp.headers["x-dcm-model"] == "default" and resp.headers["x-dcm-seed"] == "7"
    assert decode(resp, tmp_path, "a").shape == (9, 40, 64, 3)

    gif = generate(url, num_frames=5, height=40, width=32, seed=7, format="gif")
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert decode(gif, tmp_path, "b").shape == (5, 40, 32, 3)

    # the client's request id is kept; a random seed is reported back
    rid = requests.post(
        f"{url}/v1/generate",
        json={"prompt": "a blue square", **SMALL},
        headers={**AUTH, "X-Request-Id": "my-req-42"},
        timeout=60,
    )
    assert rid.status_code == 200 and rid.headers["x-request-id"] == "my-req-42"
    assert 0 <= int(rid.headers["x-dcm-seed"]) < 2**32


@pytest.mark.timeout(300)
def test_seeds_and_variants_change_the_video(served, tmp_path):
    url, _ = served
    clips = {}
    for name, model, seed in (
        ("d0", None, 3),
        ("d0b", None, 3),
        ("d1", None, 4),
        ("a", "a", 3),
        ("b", "b", 3),
    ):
        resp = generate(url, seed=seed, **({"model": model} if model else {}))
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-dcm-model"] == (model or "default")
        clips[name] = decode(resp, tmp_path, name).astype(np.float32)
    diff = {k: float(np.abs(clips[k] - clips["d0"]).mean()) for k in clips}
    assert diff["d0b"] < 1.0  # same model and seed: the same video
    assert diff["d1"] > 2.0 and diff["a"] > 2.0 and diff["b"] > 2.0
    assert float(np.abs(clips["a"] - clips["b"]).mean()) > 2.0

    unknown = generate(url, model="nope")
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "model"
    broken = generate(url, model="broken")  # a bad variant folder is the server's fault
    assert broken.status_code == 500 and "model 'broken' could not be loaded" in broken.text
    assert generate(url, model="a").status_code == 200  # and harms no other model


@pytest.mark.timeout(300)
def test_api_key_is_required(served):
    url, _ = served
    missing = generate(url, headers={"Content-Type": "application/json"})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "ApiKey"
    wrong = generate(url, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "forbidden"
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # probes stay open


def bad_requests(cfg) -> list[tuple[object, str | None]]:
    """(body, field the error must name or None) for invalid requests; raw bytes = not JSON."""
    s = cfg.serve
    cases: list[tuple[object, str | None]] = [
        ({"prompt": "x", "num_frames": 8}, "num_frames"),
        ({"prompt": "x", "num_frames": s.max_frames + 4}, "num_frames"),
        ({"prompt": "x", "num_frames": 0}, "num_frames"),
        ({"prompt": "x", "height": 36}, "height"),
        ({"prompt": "x", "width": s.max_width + 8}, "width"),
        ({"prompt": "x", "width": 0}, "width"),
        ({"prompt": "x", "steps": 1}, "steps"),
        ({"prompt": "x", "steps": s.max_steps + 1}, "steps"),
        ({"prompt": "x", "steps": "4"}, "steps"),
        ({"prompt": "x", "steps": 4.5}, "steps"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x" * (s.max_prompt_chars + 1)}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "format": "avi"}, "format"),
        ({"prompt": "x", "model": "missing"}, "model"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ([], None),
        ("just a string", None),
        (b"{not json", None),
        (b"", None),
        (b'{"prompt": "x", "steps": NaN}', "steps"),
        (b"\xff\xfe\x00garbage", None),
    ]
    rng = random.Random(0)
    fields = ["prompt", "steps", "seed", "num_frames", "height", "width", "format", "model"]
    junk = [
        None,
        True,
        -1,
        0,
        3,
        10**30,
        -(10**30),
        1.5,
        "",
        "9",
        [],
        {},
        [1, 2],
        {"a": 1},
        "x" * 50,
    ]
    for _ in range(140):
        body: dict[str, object] = {"prompt": "a red circle", **SMALL}
        for field in rng.sample(fields, rng.randint(1, 3)):
            body[field] = rng.choice(junk)
        if rng.random() < 0.2:
            body[rng.choice(["x", "Steps", "num-frames", "__proto__"])] = 1
        if _is_valid(body, cfg):
            continue
        cases.append((body, None))
    for _ in range(20):
        cases.append((bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))), None))
    return cases


def _is_valid(body: dict, cfg) -> bool:
    from pydantic import ValidationError

    from serve.limits import Limits, RequestError, check_request
    from serve.schemas import GenerateRequest

    try:
        check_request(GenerateRequest.model_validate(body, strict=True), Limits.from_config(cfg))
    except (ValidationError, RequestError):
        return False
    return True


@pytest.mark.timeout(300)
def test_fuzzed_bad_requests_get_4xx_never_5xx(served):
    url, cfg = served
    cases = bad_requests(cfg)
    assert len(cases) > 120
    session = requests.Session()
    for body, field in cases:
        if isinstance(body, bytes):
            resp = session.post(
                f"{url}/v1/generate",
                data=body,
                headers={**AUTH, "Content-Type": "application/json"},
                timeout=30,
            )
        else:
            resp = session.post(f"{url}/v1/generate", json=body, headers=AUTH, timeout=30)
        assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
        err = resp.json()["error"]
        assert err["message"] and err["request_id"], (body, err)
        if field is not None:
            assert err["field"] == field, (body, err)


# ---------------------------------------------------------------- load
def _hammer(url: str, threads: int, stop: threading.Event, out: list) -> None:
    """`threads` clients sending requests back to back until `stop` is set; responses go
    to `out` as they come."""

    def client(i: int) -> None:
        while not stop.is_set():
            resp = generate(url, seed=i, num_frames=9, height=64, width=64, steps=4)
            out.append(resp)  # list.append is atomic
            if resp.status_code == 503:
                time.sleep(0.2)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))


@pytest.mark.timeout(480)
def test_autoscaling_goes_from_one_to_two_replicas(served):
    url, _ = served
    one_replica()
    out: list[requests.Response] = []
    stop = threading.Event()
    seen: list[dict[str, int]] = []
    both: list[set] = []  # (replicas that answered, replicas running) once two run

    def answered_by() -> set:
        return {r.headers.get("x-dcm-replica") for r in list(out) if r.status_code == 200}

    def watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            seen.append(generator_states())
            if seen[-1] == {"RUNNING": 2} and len(answered_by()) == 2:
                both.extend([answered_by(), set(replica_ids())])  # before the load stops
                break
            time.sleep(0.25)
        stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    _hammer(url, threads=6, stop=stop, out=out)  # load until both replicas answer
    watcher.join()
    assert seen[0] == {"RUNNING": 1} and seen[-1] == {"RUNNING": 2}, seen
    assert both and both[0] == both[1], both
    assert all(r.status_code in (200, 503) for r in out), {r.status_code for r in out}


@pytest.mark.timeout(300)
def test_variants_are_evicted_beyond_max_models_per_replica(served):
    """max_models_per_replica=1: variant a, then b (evicts a), then a again is loaded again;
    a fourth request for a finds it loaded (X-DCM-Model-Loads counts the replica's loads)."""
    url, cfg = served
    assert cfg.serve.max_models_per_replica == 1
    replica = one_replica()
    resps = [generate(url, model=m) for m in ("a", "b", "a", "a")]
    assert [r.status_code for r in resps] == [200] * 4, [r.text for r in resps]
    assert {r.headers["x-dcm-replica"] for r in resps} == {replica}
    loads = [int(r.headers["x-dcm-model-loads"]) for r in resps]
    assert loads[2] == loads[0] + 1, loads  # a was evicted by b, then loaded again
    assert loads[3] == loads[2], loads  # and is kept while it is the one in use
    assert generate(url).headers["x-dcm-model-loads"] == "1"  # the default is never evicted


@pytest.mark.timeout(360)
def test_concurrent_same_shape_requests_are_batched(served, tmp_path):
    url, _ = served
    sizes: list[int] = []
    # Requests that arrive while a batch runs are batched together; on a loaded 2-core
    # machine one burst may still trickle in one by one, so try a few bursts.
    for _ in range(4):
        with ThreadPoolExecutor(8) as pool:
            resps = list(
                pool.map(lambda i: generate(url, seed=100 + i, prompt=f"shape {i}"), range(8))
            )
        bad = [r.text for r in resps if r.status_code != 200]
        assert not bad, bad
        sizes += [int(r.headers["x-dcm-batch-size"]) for r in resps]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, sizes
    # a batched request gives the video it would alone (per-sample noise from its seed)
    batched = next(r for r in resps if int(r.headers["x-dcm-batch-size"]) > 1)
    seed, i = int(batched.headers["x-dcm-seed"]), int(batched.headers["x-dcm-seed"]) - 100
    alone = generate(url, seed=seed, prompt=f"shape {i}")
    assert alone.status_code == 200
    a, b = decode(batched, tmp_path, "batched"), decode(alone, tmp_path, "alone")
    assert np.abs(a.astype(np.float32) - b).mean() < 1.0


@pytest.mark.timeout(300)
def test_full_queue_answers_503_with_retry_after(served):
    url, cfg = served
    # capacity is max_ongoing x replicas + max_queued = 16; 32 at once must overflow it
    barrier = threading.Barrier(32)

    def one(i: int) -> requests.Response:
        barrier.wait()
        return generate(url, seed=i, num_frames=9, height=64, width=64, steps=4, timeout=120)

    with ThreadPoolExecutor(32) as pool:
        resps = list(pool.map(one, range(32)))
    codes = [r.status_code for r in resps]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    busy = next(r for r in resps if r.status_code == 503)
    assert busy.headers["retry-after"] == str(cfg.serve.retry_after_s)
    assert busy.json()["error"]["type"] == "overloaded"


@pytest.mark.timeout(420)
def test_requests_succeed_again_after_a_replica_is_killed(served):
    """The only replica dies: requests answer 503 (or 504 while the replacement starts;
    never a crash) until the controller has replaced it, then 200 from the new one."""
    import ray

    url, _ = served
    dead = one_replica()
    ray.kill(
        ray.get_actor(f"SERVE_REPLICA::dcm#Generator#{dead}", namespace="serve"), no_restart=True
    )
    codes, served_by = [], []
    deadline = time.monotonic() + 180
    while codes[-3:] != [200, 200, 200] and time.monotonic() < deadline:
        resp = generate(url, timeout=120)
        codes.append(resp.status_code)
        served_by.append(resp.headers.get("x-dcm-replica"))
        if resp.status_code == 503:
            time.sleep(0.5)
    assert codes[-3:] == [200, 200, 200], codes
    assert set(codes) <= {200, 503, 504}, codes  # "unavailable" or "timeout", never a 500
    assert dead not in served_by
    assert dead not in replica_ids() and served_by[-1] in replica_ids()  # replaced
    assert json.loads(requests.get(f"{url}/readyz", timeout=10).text) == {"ready": True}
