"""`ray job submit --working-dir . -- python -m pipelines.sweep ...` against `ray start --head`.

The head is a separate local cluster bound to 127.0.0.1 with auth disabled on server and
client (RUNTIME.md), every port chosen free, and its own temp dir; the finalizer ends
exactly the processes of that temp dir, by pid (never `ray stop`, which would also stop
other clusters on the machine). The job is the shortened ablation sweep, whose trials are
real distill runs: it proves the job path (working dir upload, the driver joining the head
through RAY_ADDRESS, the workers' log lines reaching the client, the exit status) for every
stage entrypoint, which share `pipelines.args`. What the removed distill job also covered
runs in-process: online-stream training in tests/test_distill.py, ZeRO-3 with gradient
accumulation (and its resume) in tests/test_resume.py.
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
from test_resume import checkpoint_registered

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
def test_ablation_sweep_runs_through_ray_job_submit(head, ray_cluster, tmp_path_factory):
    """Issue #7: `python -m pipelines.sweep` as a `ray job submit` entrypoint. The ablation
    config cut to two variants (single-cm, dcm), one seed, a few steps, ASHA on, MLflow on
    sqlite; the job's driver joins the head through RAY_ADDRESS and the trials run there,
    each a real distill run. (The suite's only run of a whole sweep: tests/test_sweep.py
    proves ASHA's stopping and the sweep's parts in-process.)"""
    from mlflow import MlflowClient

    from dcm.config import load_config

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
        "--set", "sweep.grace_period=1",  # the config's 2 x 0.49 CPUs leave Ray Data 1 of 2
    ]  # fmt: skip
    summary, log = _submit(address, env, entrypoint, '"run_dir"')
    assert "semantic: step 1/2" in log  # a trial worker's progress line reached the client
    run_dir = out / "ablation-job"
    assert Path(summary["run_dir"]) == run_dir and summary["trials"] == 2

    # The sweep's run folder: sweep.json, one trial per variant, each a real distill run.
    info = json.loads((run_dir / "sweep.json").read_text())
    assert info["name"] == "ablation-job" and info["tracking_uri"].startswith("sqlite:///")
    trials = json.loads((run_dir / "trials.json").read_text())
    assert sorted(t["params"]["variant"] for t in trials) == ["dcm", "single-cm"]
    assert all(t["status"] in ("finished", "stopped") and t["history"] for t in trials)
    assert any(t["status"] == "finished" for t in trials)  # ASHA keeps the first
    assert (run_dir / "trials").is_dir()  # the trials' Ray Train runs, under the sweep's folder

    # MLflow: the parent, one child per trial with metrics, each stage nested below it.
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"best/val/score", "teacher/val/score", "trials"} <= set(parent.data.metrics)
    exp = [parent.info.experiment_id]
    children = client.search_runs(exp, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(t["mlflow_run_id"] for t in trials)
    for child in children:
        assert "sweep/best" in child.data.metrics and "sweep/variant" in child.data.params
        stages = client.search_runs(exp, f"tags.mlflow.parentRunId = '{child.info.run_id}'")
        names = sorted(s.data.tags["dcm_stage"] for s in stages)
        single = child.data.params["sweep/variant"] == "single-cm"
        if child.info.status == "FINISHED":
            assert names == (["semantic"] if single else ["detail", "semantic"])
        assert any(k.startswith("train/") for s in stages for k in s.data.metrics)
    assert {"best.yaml", "report"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # The report compares the variants with the teacher at 50 steps.
    assert info["baseline"]["teacher_steps"] == 50
    variants_csv = (run_dir / "report" / "variants.csv").read_text()
    assert "single-cm" in variants_csv and "teacher (50 steps)" in variants_csv
    # ... and at every sampling step count, read back from the trials' MLflow stage runs.
    ablation_csv = (run_dir / "report" / "ablation.csv").read_text().splitlines()
    assert {tuple(r.split(",")[:2]) for r in ablation_csv[1:]} == {
        ("single-cm", "2"),
        ("single-cm", "4"),
        ("dcm", "2"),
        ("dcm", "4"),
    }

    # best.yaml is a plain distill config that passes the distill dry run.
    best = run_dir / "best.yaml"
    assert Path(summary["best_config"]) == best
    check = subprocess.run(
        [sys.executable, "-m", "pipelines.distill", "--config", str(best), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-4000:]
    chosen = load_config(best)
    assert chosen.sweep.variants == {} and chosen.train.run_name == "ablation-job-best"
    assert chosen.data.latents == str(latents) and chosen.model.path == str(bundle)


def _job(address: str, env: dict[str, str], verb: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job VERB --address ADDRESS ARGS...` (submit, stop, status, logs)."""
    return subprocess.run(
        [str(BIN / "ray"), "job", verb, "--address", address, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.timeout(540)
def test_a_stopped_sweep_job_resumes_where_it_stopped(head, ray_cluster, tmp_path_factory):
    """`dcm sweep --resume` after `ray job stop`: two trials in sequence (seeds 0 and 1, the
    semantic stage, a checkpoint every step). The job is stopped once the first trial has
    finished and Ray has registered a checkpoint of the second; the resubmitted job with --resume
    keeps the first trial as it was (its stage is not run again), continues the second from
    its checkpoint under the same trial id, and closes the one parent MLflow run with one
    child per trial."""
    from mlflow import MlflowClient

    address, env = head
    bundle, latents = shapes_latents(tmp_path_factory)
    out = tmp_path_factory.mktemp("resume_sweeps")
    entrypoint = [
        "python", "-m", "pipelines.sweep", "--preset", "shapes-tiny",
        "--data", str(latents), "--out", str(out),
        "--set", "name=resumed", "--set", f"model.path={bundle}", "--set", "data.mode=parquet",
        "--set", "train.stage=semantic", "--set", "train.steps_semantic=8",
        "--set", "train.global_batch=2", "--set", "train.checkpoint_every=1",
        "--set", "train.keep_checkpoints=8", "--set", "train.log_every=1",
        "--set", "train.val_prompts=1", "--set", "sample.seeds=[0]",
        "--set", "sample.eval_steps=[]", "--set", "sweep.searcher=grid",
        "--set", "sweep.space={train.seed: {grid: [0, 1]}}", "--set", "sweep.asha=false",
        "--set", "sweep.max_concurrent=1", "--set", "sweep.trial_cpus=0.5",
        "--set", "sweep.teacher_baseline=false",
    ]  # fmt: skip
    job = "sweep-resume-first"
    started = _job(address, env, "submit", "--submission-id", job, "--no-wait",
                   "--working-dir", ".", "--", *entrypoint)  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    trials = out / "resumed" / "trials"

    def stage_dirs() -> list[Path]:
        return sorted(trials.glob("*/semantic")) if trials.is_dir() else []

    deadline = time.time() + 300
    first = second = None
    while time.time() < deadline:
        done = [d for d in stage_dirs() if (d / "result.json").is_file()]
        running = [d for d in stage_dirs() if not (d / "result.json").is_file()]
        if done and running and checkpoint_registered(running[0]):
            first, second = done[0], running[0]
            break
        time.sleep(0.5)
    assert first is not None, _job(address, env, "logs", job).stdout[-4000:]
    stopped = _job(address, env, "stop", job)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "was stopped" in _job(address, env, "status", job).stdout
    before = (first / "result.json").read_text()
    assert not (second / "result.json").is_file()  # stopped mid-stage

    summary, log = _submit(address, env, [*entrypoint, "--resume"], '"run_dir"')
    assert summary["trials"] == 2
    assert (first / "result.json").read_text() == before  # the finished trial was kept
    record = json.loads((second / "result.json").read_text())  # the same trial id's folder
    assert record["steps"] == 8
    result = json.loads((out / "resumed" / "trials.json").read_text())
    assert sorted(t["trial_id"] for t in result) == sorted(
        d.parent.name.removeprefix("resumed-") for d in (first, second)
    )
    assert all(t["status"] == "finished" for t in result)
    # the resumed trial's curve is whole (read back from its stage run, not Tune's restart)
    assert result[0]["iterations"] == result[1]["iterations"] >= 2, result

    info = json.loads((out / "resumed" / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.run_id == summary["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED"
    exp = [parent.info.experiment_id]
    assert len(client.search_runs(exp, "tags.dcm_stage = 'sweep'")) == 1  # no second parent
    children = client.search_runs(exp, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(t["mlflow_run_id"] for t in result)
    for child in children:
        assert child.info.status == "FINISHED"
        stages = client.search_runs(exp, f"tags.mlflow.parentRunId = '{child.info.run_id}'")
        assert [s.data.tags["dcm_stage"] for s in stages] == ["semantic"]  # reopened, not new
    # the second trial's stage went on from its checkpoint, not from step 0
    resumed = {c.data.tags["dcm_trial"]: c for c in children}[
        second.parent.name.removeprefix("resumed-")
    ]
    stage = client.search_runs(exp, f"tags.mlflow.parentRunId = '{resumed.info.run_id}'")[0]
    starts = [m.value for m in client.get_metric_history(stage.info.run_id, "resumed_from")]
    assert max(starts) >= 1, starts
