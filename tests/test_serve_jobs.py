"""The /v1/videos job API, its store, supervision and metrics.

First without Ray (the store on a folder and on an fsspec URI, the JobManager with a fake
dispatcher, the sampler's step callback), then over real HTTP on a local Serve app on
127.0.0.1 with one generator replica that takes two jobs at once but generates one at a
time (the second waits at the replica, still queued; a third waits in the ingress), and
whose synchronous /v1/generate times out after a few seconds (the 504 path). Every test
leaves no job unfinished (an autouse fixture cancels leftovers), so they pass in any order.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import free_port

from dcm.config import load_config
from dcm.tiny import build_tiny_bundle
from dcm.video import read_video
from serve.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobManager,
    JobRunner,
    ReplicaLost,
    new_record,
)
from serve.limits import RequestError
from serve.store import JobStore

KEYS = ("job-key-one", "job-key-two")
KEY_ENV = "DCM_TEST_JOB_KEYS"
ME, OTHER = {"X-API-Key": KEYS[0]}, {"X-API-Key": KEYS[1]}
SMALL = {"num_frames": 5, "height": 32, "width": 32}
LONG_STEPS = 1000  # a job of seconds on the tiny model (about 5 ms a step on an idle core)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def params(steps: int = 4, fmt: str = "mp4") -> dict:
    return {"prompt": "x", "steps": steps, "seed": 1, "model": "default", "format": fmt, **SMALL}


# ---------------------------------------------------------------- without Ray
@pytest.mark.parametrize("where", ["folder", "memory"])
def test_store_keeps_records_videos_and_cancel_markers(tmp_path, where):
    uri = str(tmp_path / "jobs") if where == "folder" else f"memory://dcm-test-{time.time_ns()}"
    store = JobStore(uri)
    rec = new_record(params(), owner="me", ttl_s=60)
    store.write(rec)
    store.write({**rec, "status": RUNNING})  # a whole record replaces the old one
    assert store.read(rec["id"])["status"] == RUNNING
    assert [r["id"] for r in store.records()] == [rec["id"]]
    assert store.read("../../etc/passwd") is None and store.read("0" * 32) is None
    store.write_video(rec["id"], "mp4", b"\x00video")
    assert store.read_video(rec["id"], "mp4") == b"\x00video"
    assert not store.cancel_requested(rec["id"])
    store.request_cancel(rec["id"])
    assert store.cancel_requested(rec["id"])
    if where == "folder":  # atomic writes leave no temporary files behind
        assert sorted(p.name for p in (tmp_path / "jobs" / "jobs").iterdir()) == [
            f"{rec['id']}.json"
        ]
    store.delete(rec["id"], "mp4")
    assert store.read(rec["id"]) is None and store.read_video(rec["id"], "mp4") is None
    assert store.records() == []


def test_store_refuses_an_unknown_uri_in_one_sentence():
    with pytest.raises(ValueError, match="serve.job_store 'nope-proto://x'"):
        JobStore("nope-proto://x")


def test_manager_queue_limit_owner_lease_retry_and_expiry(tmp_path):
    store = JobStore(str(tmp_path))
    started: list[str] = []
    gate = asyncio.Event()

    async def dispatch(rec):  # a replica that runs each job until the gate opens, then dies
        started.append(rec["id"])
        store.write({**rec, "status": RUNNING, "heartbeat_at": time.time()})
        await gate.wait()
        gate.clear()
        raise ReplicaLost("the replica died")

    async def scenario():
        jobs = JobManager(store, dispatch, max_queued=2, max_in_flight=1, lease_s=5.0, ttl_s=100.0)
        a = jobs.submit(params(), "me")
        await asyncio.sleep(0.05)
        assert started == [a["id"]] and store.read(a["id"])["attempts"] == 1
        b, c = jobs.submit(params(), "me"), jobs.submit(params(), "you")
        with pytest.raises(RequestError) as full:
            jobs.submit(params(), "me")
        assert full.value.status == 503 and full.value.kind == "overloaded"
        with pytest.raises(RequestError) as other:
            jobs.get(b["id"], "you")  # someone else's job does not exist for you
        assert other.value.status == 404
        assert [r["id"] for r in jobs.list("you", 10)] == [c["id"]]
        assert jobs.cancel(b["id"], "me")["status"] == CANCELLED
        with pytest.raises(RequestError) as again:
            jobs.cancel(b["id"], "me")
        assert again.value.status == 409

        # the replica dies: a is retried once (back to the head of the queue) ...
        gate.set()
        await asyncio.sleep(0.05)
        assert started == [a["id"], a["id"]]  # ... and dispatched again before c
        assert store.read(a["id"])["last_error"]["type"] == "replica_lost"
        gate.set()
        await asyncio.sleep(0.05)
        failed = store.read(a["id"])
        assert failed["status"] == FAILED and failed["attempts"] == 2
        assert "the replica died (after 2 attempts)" in failed["error"]["message"]

        # a running job whose replica stopped beating (no task here: a previous ingress)
        d = new_record(params(), "me", 100.0)
        stale = time.time() - 60
        store.write({**d, "status": RUNNING, "attempts": 1, "heartbeat_at": stale})
        jobs.maintain()
        assert store.read(d["id"])["status"] == QUEUED  # retried
        store.write({**store.read(d["id"]), "status": RUNNING, "attempts": 2})
        jobs.maintain(now=time.time() + 60)
        lost = store.read(d["id"])
        assert lost["status"] == FAILED and "sent no heartbeat" in lost["error"]["message"]
        # finished jobs go when their time to live is over
        jobs.maintain(now=time.time() + 1000)
        assert store.read(a["id"]) is None and store.read(d["id"]) is None
        for task in jobs._tasks:
            task.cancel()

    asyncio.run(scenario())


def test_runner_reports_steps_and_a_cancel_wins(tmp_path):
    from dcm.generate import VideoGenerator
    from serve.jobs import JobCancelled

    store = JobStore(str(tmp_path))
    gen = VideoGenerator.load(str(build_tiny_bundle(tmp_path / "b")), "cpu", load_config())
    rec = new_record(params(steps=3), "me", 100.0)
    runner = JobRunner(store, rec, "replica-1", 100.0)
    runner.start()
    seen = []

    def on_step(k, n):
        runner.on_step(k, n)
        seen.append(dict(store.read(rec["id"])["progress"]))

    gen.generate(["x"], steps=3, callback=on_step, **SMALL)
    assert seen[0] == {"step": 1, "steps": 3}  # the first step at once, inside 0.2 s
    assert seen[-1] == {"step": 3, "steps": 3}  # the last step is always written
    assert runner.finish(SUCCEEDED, timings={"generate": 1.0}) == SUCCEEDED
    assert store.read(rec["id"])["status"] == SUCCEEDED

    other = new_record(params(steps=6), "me", 100.0)
    runner = JobRunner(store, other, "replica-1", 100.0)
    runner.start()
    steps_run = []

    def cancel_at_2(k, n):
        steps_run.append(k)
        if k == 2:
            store.request_cancel(other["id"])
        runner.on_step(k, n)

    with pytest.raises(JobCancelled):
        gen.generate(["x"], steps=6, callback=cancel_at_2, **SMALL)
    assert steps_run == [1, 2]  # sampling stopped at the step the cancel was seen
    assert runner.finish(SUCCEEDED) == CANCELLED  # the cancel wins over a late success


def test_warm_up_runs_the_smallest_generation(tmp_path):
    from dcm.generate import VideoGenerator
    from serve.app import warm_up

    cfg = load_config(preset="shapes-tiny")
    gen = VideoGenerator.load(str(build_tiny_bundle(tmp_path / "b")), "cpu", cfg)
    assert warm_up(cfg, gen) > 0.0
    assert gen.last_timings["nfe"] == cfg.serve.min_steps  # one real pass of the sampler


@pytest.mark.ray
def test_replica_gpus_auto_follows_the_cluster(ray_cluster):
    """'auto' GPUs per actor follow the connected cluster, one rule for the Serve replicas
    and the ingest encoders."""
    import ray

    from pipelines.ingest.pipeline import encoder_gpus
    from serve.app import generator_options, replica_gpus

    cfg = load_config(preset="shapes-tiny")
    assert cfg.serve.replica_gpus == "auto" and cfg.ingest.actor_gpus == "auto"
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    assert replica_gpus(cfg.serve) == encoder_gpus(cfg) == (1.0 if has_gpu else 0.0)
    assert encoder_gpus(cfg.replace(**{"ingest.actor_gpus": 0.25})) == 0.25
    half = cfg.replace(**{"serve.replica_gpus": 0.5}).serve
    assert replica_gpus(half) == 0.5
    assert generator_options(half)["ray_actor_options"]["num_gpus"] == 0.5


# ---------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """(base URL, config) of an app with two API keys, one replica, two jobs in flight."""
    from pipelines.serve import start, stop

    root = tmp_path_factory.mktemp("jobs")
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, ",".join(KEYS))
    cfg = load_config(preset="shapes-tiny").replace(
        **{
            "model.path": str(build_tiny_bundle(root / "bundle", seed=0)),
            "serve.port": free_port(),
            "serve.api_key_env": KEY_ENV,
            "serve.job_store": str(root / "store"),
            "serve.max_steps": 1000,
            "serve.min_replicas": 1,
            "serve.max_replicas": 1,
            "serve.max_batch_size": 2,
            "serve.max_ongoing_requests": 2,
            "serve.max_queued_jobs": 2,
            "serve.job_lease_s": 30.0,  # the kill test needs no lease: Serve reports the death
            "serve.retry_after_s": 3,
            "serve.replica_cpus": 0.5,
            # /v1/generate answers 504 past this (jobs have no such limit); the other
            # synchronous requests here take a second or two
            "serve.request_timeout_s": 20.0,
        }
    )
    url = start(cfg)
    yield url, cfg
    stop()
    mp.undo()


@pytest.fixture(autouse=True)
def no_leftover_jobs(request):
    """After each HTTP test: cancel whatever it left queued or running."""
    yield
    if "served" not in request.fixturenames:
        return
    url, _ = request.getfixturevalue("served")
    for key in (ME, OTHER):
        for job in requests.get(f"{url}/v1/videos?limit=100", headers=key, timeout=30).json()[
            "data"
        ]:
            if job["status"] not in TERMINAL:
                requests.delete(f"{url}/v1/videos/{job['id']}", headers=key, timeout=30)


def submit(url: str, headers: dict = ME, **body) -> requests.Response:
    payload = {"prompt": "a red circle moves left", "steps": 4, **SMALL, **body}
    return requests.post(f"{url}/v1/videos", json=payload, headers=headers, timeout=30)


def status(url: str, job_id: str, headers: dict = ME) -> dict:
    resp = requests.get(f"{url}/v1/videos/{job_id}", headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(url: str, job_id: str, until, timeout: float = 120.0) -> list[dict]:
    """Poll every 50 ms until ``until(job)``; every status seen, in order."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(status(url, job_id))
        if until(seen[-1]):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: last {seen[-1] if seen else None}")


def running_at_step(job: dict) -> bool:
    return job["status"] == RUNNING and job["progress"]["step"] >= 1


@pytest.mark.ray
@pytest.mark.timeout(420)  # the first user of the app: the budget includes starting it
def test_submit_poll_progress_and_download(served, tmp_path):
    url, _ = served
    # progress is written at most every 0.2 s (serve.jobs.JobRunner): 200 tiny-model steps
    # could finish inside one interval, so the job is made long enough to be seen running
    resp = submit(url, steps=1000, seed=5)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] in (QUEUED, RUNNING) and re.fullmatch(r"[0-9a-f]{32}", job["id"])
    assert job["status_url"] == f"/v1/videos/{job['id']}" == resp.headers["location"]
    assert job["params"]["seed"] == 5 and job["model"] == "default"

    seen = wait_for(url, job["id"], lambda j: j["status"] in TERMINAL)
    done = seen[-1]
    assert done["status"] == SUCCEEDED, done
    steps_seen = [j["progress"]["step"] for j in seen if j["status"] == RUNNING]
    assert any(0 < k < 1000 for k in steps_seen), steps_seen  # "running, step k of 1000"
    assert steps_seen == sorted(steps_seen)
    assert done["progress"] == {"step": 1000, "steps": 1000}
    assert done["attempts"] == 1 and done["error"] is None and done["replica"]
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] < done["expires_at"]
    for stage in ("queue", "text", "denoise", "decode", "generate", "video"):
        assert done["timings"][stage] >= 0.0
    assert done["timings"]["queue"] == pytest.approx(done["started_at"] - done["created_at"])

    video = requests.get(f"{url}{done['content_url']}", headers=ME, timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "job.mp4").write_bytes(video.content)
    frames = read_video(tmp_path / "job.mp4")  # decord
    assert frames.shape == (5, 32, 32, 3) and frames.std() > 1.0

    # the same request through /v1/generate gives the same video (same seed)
    sync = requests.post(
        f"{url}/v1/generate",
        json={"prompt": "a red circle moves left", "steps": 1000, "seed": 5, **SMALL},
        headers=ME,
        timeout=120,
    )
    (tmp_path / "sync.mp4").write_bytes(sync.content)
    same = read_video(tmp_path / "sync.mp4").astype(np.float32)
    assert np.abs(same - frames).mean() < 1.0

    listed = requests.get(f"{url}/v1/videos", headers=ME, timeout=30).json()["data"]
    assert job["id"] in [j["id"] for j in listed]
    assert "owner" not in listed[0]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_jobs_of_another_key_are_404_and_bad_requests_422(served):
    url, _ = served
    job = submit(url).json()
    for method, path in (
        ("get", f"/v1/videos/{job['id']}"),
        ("get", f"/v1/videos/{job['id']}/content"),
        ("delete", f"/v1/videos/{job['id']}"),
    ):
        resp = requests.request(method, f"{url}{path}", headers=OTHER, timeout=30)
        assert resp.status_code == 404, (path, resp.text)
        assert resp.json()["error"]["type"] == "not_found"
    assert job["id"] not in [
        j["id"] for j in requests.get(f"{url}/v1/videos", headers=OTHER, timeout=30).json()["data"]
    ]
    assert requests.get(f"{url}/v1/videos/{job['id']}", timeout=30).status_code == 401
    bad = submit(url, height=36)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "height"
    assert requests.get(f"{url}/v1/videos/{'0' * 32}", headers=ME, timeout=30).status_code == 404
    assert wait_for(url, job["id"], lambda j: j["status"] in TERMINAL)[-1]["status"] == SUCCEEDED


@pytest.mark.ray
@pytest.mark.timeout(360)
def test_cancel_a_queued_and_a_running_job(served):
    url, _ = served
    first = submit(url, steps=LONG_STEPS).json()
    second = submit(url, steps=4).json()
    wait_for(url, first["id"], running_at_step)
    assert status(url, second["id"])["status"] == QUEUED  # one generation at a time

    gone = requests.delete(f"{url}/v1/videos/{second['id']}", headers=ME, timeout=30)
    assert gone.status_code == 200 and gone.json()["status"] == CANCELLED
    stopped = requests.delete(f"{url}/v1/videos/{first['id']}", headers=ME, timeout=30)
    assert stopped.status_code == 200 and stopped.json()["status"] == CANCELLED

    # the replica stops at its next step: a new job runs right away, the first stays cancelled
    third = submit(url, steps=4).json()
    assert wait_for(url, third["id"], lambda j: j["status"] in TERMINAL, 60)[-1]["status"] == (
        SUCCEEDED
    )
    final = status(url, first["id"])
    assert final["status"] == CANCELLED and final["progress"]["step"] < LONG_STEPS, final
    time.sleep(1.0)
    assert status(url, first["id"]) == final  # stopped: no more steps, no late overwrite
    assert status(url, second["id"])["started_at"] is None  # never ran
    content = requests.get(f"{url}/v1/videos/{first['id']}/content", headers=ME, timeout=30)
    assert content.status_code == 409
    again = requests.delete(f"{url}/v1/videos/{first['id']}", headers=ME, timeout=30)
    assert again.status_code == 409


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_full_job_queue_answers_503_with_retry_after(served):
    url, cfg = served
    running = submit(url, steps=LONG_STEPS).json()
    wait_for(url, running["id"], running_at_step)
    # one more job goes to the replica (in flight, queued there); max_queued_jobs wait here
    room = cfg.serve.max_ongoing_requests - 1 + cfg.serve.max_queued_jobs
    queued = [submit(url) for _ in range(room)]
    assert [r.status_code for r in queued] == [202] * room
    full = submit(url)
    assert full.status_code == 503, full.text
    assert full.headers["retry-after"] == str(cfg.serve.retry_after_s)
    assert full.json()["error"]["type"] == "overloaded"
    requests.delete(f"{url}/v1/videos/{queued[-1].json()['id']}", headers=ME, timeout=30)
    assert submit(url).status_code == 202  # room again


@pytest.mark.ray
@pytest.mark.timeout(360)
def test_jobs_sent_to_one_replica_at_once_give_whole_videos(served, tmp_path):
    """Two jobs in flight on one replica: each gets all its frames (the VAE's caches are not
    shared between concurrent decodes)."""
    url, _ = served
    jobs = [submit(url, steps=8, num_frames=17, height=64, width=64, seed=i).json() for i in (1, 2)]
    for i, job in enumerate(jobs):
        done = wait_for(url, job["id"], lambda j: j["status"] in TERMINAL)[-1]
        assert done["status"] == SUCCEEDED, done
        video = requests.get(f"{url}{done['content_url']}", headers=ME, timeout=30)
        (tmp_path / f"{i}.mp4").write_bytes(video.content)
        assert read_video(tmp_path / f"{i}.mp4").shape == (17, 64, 64, 3)


@pytest.mark.ray
@pytest.mark.timeout(360)
def test_a_job_whose_replica_is_killed_is_retried_never_left_running(served):
    import ray

    url, _ = served
    job = submit(url, steps=500).json()
    first = wait_for(url, job["id"], running_at_step)[-1]
    actor = ray.get_actor(f"SERVE_REPLICA::dcm#Generator#{first['replica']}", namespace="serve")
    ray.kill(actor, no_restart=True)

    seen = wait_for(url, job["id"], lambda j: j["status"] in TERMINAL, timeout=200)
    final = seen[-1]
    # retried once on the replacement replica (or failed with the reason): never left running
    assert final["status"] in (SUCCEEDED, FAILED), final
    if final["status"] == SUCCEEDED:
        assert final["attempts"] == 2 and final["replica"] != first["replica"]
        assert final["last_error"]["type"] == "replica_lost"
    else:
        assert final["error"]["type"] == "replica_lost" and final["error"]["message"]
    assert QUEUED in [j["status"] for j in seen]  # it went back to the queue in between


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_generation_past_the_request_timeout_is_504_and_the_replica_answers_on(served):
    """/v1/generate past serve.request_timeout_s: 504 with a one-sentence JSON error, the
    generation is stopped on the replica, and the same replica answers the next request."""
    url, cfg = served
    small = {"prompt": "x", "steps": 2, **SMALL}
    first = requests.post(f"{url}/v1/generate", json=small, headers=ME, timeout=120)
    assert first.status_code == 200, first.text
    replica = first.headers["x-dcm-replica"]
    s = cfg.serve  # the largest request: minutes of sampling on two cores
    slow = {"steps": s.max_steps, "num_frames": s.max_frames, "height": s.max_height}
    t0 = time.monotonic()
    resp = requests.post(
        f"{url}/v1/generate",
        json={"prompt": "x", **slow, "width": s.max_width},
        headers=ME,
        timeout=120,
    )
    waited = time.monotonic() - t0
    assert resp.status_code == 504, resp.text
    assert s.request_timeout_s <= waited < s.request_timeout_s + 30, waited
    error = resp.json()["error"]
    assert error["type"] == "timeout" and error["field"] is None and error["request_id"]
    message = error["message"]
    assert f"serve.request_timeout_s={s.request_timeout_s:g} s" in message
    assert message.count(". ") == 0 and "\n" not in message, message  # one sentence

    # had the slow generation gone on, this one would wait for it (one at a time) and time out
    t0 = time.monotonic()
    nxt = requests.post(f"{url}/v1/generate", json=small, headers=ME, timeout=120)
    assert nxt.status_code == 200, nxt.text
    assert nxt.headers["x-dcm-replica"] == replica and replica_ids() == [replica]
    assert time.monotonic() - t0 < s.request_timeout_s


def replica_ids() -> list[str]:
    import ray

    prefix = "SERVE_REPLICA::dcm#Generator#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n[len(prefix) :] for n in names if n.startswith(prefix)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_metrics_are_scraped_from_rays_prometheus_endpoint(served):
    import ray

    url, _ = served
    job = submit(url, steps=3).json()
    wait_for(url, job["id"], lambda j: j["status"] in TERMINAL)
    ok = requests.post(
        f"{url}/v1/generate", json={"prompt": "x", "steps": 2, **SMALL}, headers=ME, timeout=60
    )
    assert ok.status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = [
        ("ray_dcm_requests_total", {"route": "/v1/videos", "code": "202"}),
        ("ray_dcm_requests_total", {"route": "/v1/generate", "code": "200"}),
        ("ray_dcm_jobs_total", {"outcome": "submitted"}),
        ("ray_dcm_jobs_total", {"outcome": "succeeded"}),
        ("ray_dcm_generation_seconds_bucket", {"model": "default", "steps": "3"}),
        ("ray_dcm_job_queue_depth", {"deployment": "Ingress"}),
        ("ray_dcm_network_evaluations_per_second", {"model": "default"}),
    ]
    deadline, text = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        if all(samples(text, *w) for w in wanted):
            break
        time.sleep(2.0)
    missing = [w for w in wanted if not samples(text, *w)]
    assert not missing, (missing, [ln for ln in text.splitlines() if "dcm_" in ln][:20])
    assert sum(samples(text, *wanted[0])) >= 1.0


def samples(text: str, name: str, labels: dict[str, str]) -> list[float]:
    """Values of the Prometheus samples of ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line.strip())
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append(float(m.group(3)))
    return out


def test_cluster_definitions_export_metrics_on_8080():
    """Every Ray node of the KubeRay manifests and ray up configs exports Prometheus metrics
    on 8080 (the port the scrape configs of clusters/README.md use)."""
    clusters = Path(__file__).parents[1] / "clusters"
    for path in sorted((clusters / "kuberay").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
        spec = spec or doc["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            assert group["rayStartParams"]["metrics-export-port"] == "8080", path
            (container,) = group["template"]["spec"]["containers"]
            assert {"containerPort": 8080, "name": "metrics"} in container["ports"], path
    for path in sorted((clusters / "ray-up").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in cfg[key] if "ray start" in c]
            assert starts and all("--metrics-export-port=8080" in c for c in starts), path
    assert "metrics-export-port" in (clusters / "README.md").read_text()
