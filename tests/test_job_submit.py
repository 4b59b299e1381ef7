"""`ray job submit --working-dir . -- python -m pipelines.distill ...` against `ray start --head`.

The head is a separate local cluster bound to 127.0.0.1 with auth disabled on server and
client (RUNTIME.md), every port chosen free, and its own temp dir; the finalizer ends
exactly the processes of that temp dir, by pid (never `ray stop`, which would also stop
other clusters on the machine). The job runs the semantic stage for one step with
tracking disabled, ZeRO-3 and gradient accumulation, reading the raw shapes clips
through ingest's online stream (no parquet); it must leave a complete artifact and no
MLflow store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_distill import shapes_latents

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _processes_under(marker: str) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd and proc.info["pid"] != os.getpid():
            pids.append(proc.info["pid"])
    return pids


def _end(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(1.0)


def _submit(address: str, env: dict[str, str], entrypoint: list[str], key: str) -> tuple[dict, str]:
    """`ray job submit --working-dir .` the entrypoint; it must succeed. Returns the last JSON
    line of its log that holds ``key`` (the stage's printed summary) and the log."""
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
         *entrypoint],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    return json.loads(next(ln for ln in reversed(log.splitlines()) if key in ln)), log


@pytest.fixture(scope="module")
def head():
    """A `ray start --head` cluster on loopback; yields (dashboard address, client env)."""
    temp = tempfile.mkdtemp(prefix="rjob", dir="/tmp")  # short: unix socket paths
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(env_agent), "--num-cpus", "2", "--num-gpus", "0",
        "--object-store-memory", str(256 * 2**20), "--temp-dir", temp,
        "--include-dashboard", "true", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, env=env, check=True, timeout=180, capture_output=True)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _end(_processes_under(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.timeout(540)
def test_distill_runs_unchanged_through_ray_job_submit(head, ray_cluster, tmp_path_factory):
    address, env = head
    bundle, latents = shapes_latents(tmp_path_factory)  # ingest runs on the session cluster
    videos = latents.parent / "videos" / "captions.jsonl"  # raw clips: the online stream
    out = tmp_path_factory.mktemp("job_runs")
    entrypoint = [
        "python", "-m", "pipelines.distill",
        "--config", "pipelines/configs/shapes-tiny.yaml",
        "--data", str(videos), "--stage", "semantic", "--out", str(out),
        "--set", f"model.path={bundle}", "--set", "train.steps_semantic=1",
        "--set", "train.run_name=job1", "--set", "tracking.enabled=false",
        "--set", "sample.steps=2", "--set", "sample.eval_steps=[2]",
        # ZeRO-3 (artifact gathered from 2 ranks) and accumulation, at no extra fit
        "--set", "train.zero_stage=3", "--set", "train.grad_accum=2",
    ]  # fmt: skip
    summary, log = _submit(address, env, entrypoint, '"artifact"')
    assert summary["stage"] == "semantic" and summary["mlflow_run_id"] is None
    artifact = Path(summary["artifact"])
    assert (artifact / "experts.safetensors").is_file()
    assert (artifact / "dcm_artifact.json").is_file()
    assert artifact.is_relative_to(out / "job1" / "semantic")
    shards = sorted(p.name for p in (artifact.parent / "ds").glob("zero_pp_rank_*_model_states.pt"))
    assert len(shards) == 2  # ZeRO-3: each rank saved its parameter partition
    from dcm.experts import DualExpert

    model = DualExpert.load_artifact(artifact)  # strict: every weight whole, none partitioned
    assert not model.has_detail and min(p.numel() for p in model.parameters()) > 0
    assert "semantic: step 1/1" in log  # the progress line reached the client
    assert not (out / "job1" / "mlflow.db").exists()  # tracking.enabled=false


@pytest.mark.timeout(540)
def test_ablation_sweep_runs_through_ray_job_submit(head, ray_cluster, tmp_path_factory):
    """Issue #7: `python -m pipelines.sweep` as a `ray job submit` entrypoint. The ablation
    config cut to two variants (single-cm, dcm), one seed, a few steps, ASHA on, tracking
    off; the job's driver joins the head through RAY_ADDRESS and the trials run there."""
    address, env = head
    bundle, latents = shapes_latents(tmp_path_factory)  # ingest folder: parquet latents
    out = tmp_path_factory.mktemp("job_sweeps")
    variants = (
        "{single-cm: {train.stage: semantic, method.split: -1, method.tc_weight: 0.0}, dcm: {}}"
    )
    entrypoint = [
        "python", "-m", "pipelines.sweep",
        "--config", "pipelines/configs/ablation-shapes.yaml",
        "--data", str(latents), "--out", str(out),
        "--set", "name=ablation-job", "--set", f"model.path={bundle}",
        "--set", "train.steps_semantic=2", "--set", "train.steps_detail=1",
        "--set", "train.global_batch=2", "--set", "train.checkpoint_every=1",
        "--set", "train.log_every=1", "--set", "train.val_prompts=1",
        "--set", "sample.seeds=[0]", "--set", "sweep.space={train.seed: {grid: [0]}}",
        "--set", f"sweep.variants={variants}", "--set", "sweep.asha=true",
        "--set", "sweep.grace_period=1", "--set", "sweep.trial_cpus=0.5",
        "--set", "tracking.enabled=false",
    ]  # fmt: skip
    summary, _ = _submit(address, env, entrypoint, '"run_dir"')
    run_dir = out / "ablation-job"
    assert Path(summary["run_dir"]) == run_dir and summary["trials"] == 2
    assert summary["mlflow_parent_run_id"] is None

    # The sweep's run folder: sweep.json, one trial per variant, each a real distill run.
    info = json.loads((run_dir / "sweep.json").read_text())
    assert info["name"] == "ablation-job" and info["tracking_uri"] == ""
    assert info["baseline"]["teacher_steps"] == 50
    trials = json.loads((run_dir / "trials.json").read_text())
    assert sorted(t["params"]["variant"] for t in trials) == ["dcm", "single-cm"]
    assert all(t["status"] in ("finished", "stopped") and t["history"] for t in trials)
    assert any(t["status"] == "finished" for t in trials)  # ASHA keeps the first
    assert all(t["mlflow_run_id"] is None for t in trials)
    assert (run_dir / "trials").is_dir()  # the trials' Ray Train runs, under the sweep's folder
    assert "single-cm" in (run_dir / "report" / "variants.csv").read_text()
    assert not (run_dir / "mlflow.db").exists()  # tracking.enabled=false

    # best.yaml is a plain distill config that passes the distill dry run.
    best = run_dir / "best.yaml"
    assert Path(summary["best_config"]) == best
    check = subprocess.run(
        [sys.executable, "-m", "pipelines.distill", "--config", str(best), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-4000:]
    from dcm.config import load_config

    chosen = load_config(best)
    assert chosen.sweep.variants == {} and chosen.train.run_name == "ablation-job-best"
    assert chosen.data.latents == str(latents) and chosen.model.path == str(bundle)
