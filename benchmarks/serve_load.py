"""Latency and throughput of the Serve endpoint: the job API under a fixed arrival rate, or
/v1/generate against concurrency and its overhead.

    python benchmarks/serve_load.py --jobs 40 --rate 1.0 [--model bundled:shapes]
        [--frames 17 --height 64 --width 64 --steps 4] [--url URL] [--json OUT.json]
    python benchmarks/serve_load.py [--concurrency 1,2,4,8] [--requests 24] ...

Without ``--url`` it starts a local loopback Ray cluster and the app (as ``dcm serve`` does).

Job mode (``--jobs N``): N ``POST /v1/videos`` at ``--rate`` per second (one every 1/rate s,
whatever the server does), each polled every 0.1 s until it ends, its video downloaded and
decoded. Reports jobs accepted / refused (503) / succeeded / failed (with the reasons),
throughput (succeeded per second from the first submission to the last completion) and p50 /
p95 of the time from submission to a downloaded video; it exits 1 unless every accepted job
ended, and every failure says why.

Overhead at concurrency 1: the in-process baseline is the same work without HTTP/Serve
(``VideoGenerator.generate`` on one prompt + ``video_bytes`` mp4 encoding) in this process.
Baseline and HTTP requests alternate, so a busy machine slows both alike; overhead =
p50(HTTP) / p50(in-process) - 1 (target on the shapes model: at most +10%). The server's
own ``Server-Timing`` also gives the absolute overhead: client latency minus the replica's
generate + video time (proxy, ingress, routing, batching queue, transfer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from dcm.config import load_config


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def parse_server_timing(header: str) -> dict[str, float]:
    """'generate;dur=410.0, total;dur=455.2' -> {'generate': 0.41, 'total': 0.4552} (seconds)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur) / 1000.0
    return out


def overhead(url: str, gen: Any, body: dict, n: int, headers: dict, fps: int) -> dict[str, Any]:
    """Alternate in-process and HTTP requests (concurrency 1) and compare their latencies."""
    from dcm.video import video_bytes

    session = requests.Session()
    local, remote, outside = [], [], []
    for i in range(n + 1):
        seed = 1000 + i
        t0 = time.perf_counter()
        frames = gen.generate(
            [body["prompt"]],
            steps=body["steps"],
            seed=seed,
            num_frames=body["num_frames"],
            height=body["height"],
            width=body["width"],
        )
        video_bytes(frames[0], fps, fmt="mp4")
        t1 = time.perf_counter()
        resp = session.post(
            f"{url}/v1/generate", json={**body, "seed": seed}, headers=headers, timeout=600
        )
        t2 = time.perf_counter()
        resp.raise_for_status()
        if i == 0:  # warm-up pair
            continue
        timing = parse_server_timing(resp.headers["server-timing"])
        local.append(t1 - t0)
        remote.append(t2 - t1)
        outside.append((t2 - t1) - timing["generate"] - timing["video"])
    p50_local, p50_remote = statistics.median(local), statistics.median(remote)
    return {
        "in_process_p50_s": p50_local,
        "http_p50_s": p50_remote,
        "overhead_ratio": p50_remote / p50_local - 1.0,
        "outside_generate_p50_s": statistics.median(outside),
    }


def load_level(url: str, body: dict, concurrency: int, n: int, headers: dict) -> dict:
    """n requests from `concurrency` clients: latency percentiles, throughput, failures."""
    session = requests.Session()

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = session.post(
            f"{url}/v1/generate", json={**body, "seed": i}, headers=headers, timeout=600
        )
        return time.perf_counter() - t0, r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ok = [t for t, code in results if code == 200]
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "p50_s": percentile(ok, 50),
        "p95_s": percentile(ok, 95),
        "throughput_rps": len(ok) / wall,
    }


JOB_DEADLINE_S = 1800.0  # a job not ended after this counts as "unfinished" (a failure)


def one_job(url: str, body: dict, headers: dict, start_at: float, poll_s: float) -> dict:
    """Submit at ``start_at`` (perf_counter), poll to the end, download and decode the video."""
    from dcm.video import read_video

    time.sleep(max(0.0, start_at - time.perf_counter()))
    session = requests.Session()
    t0 = time.perf_counter()
    resp = session.post(f"{url}/v1/videos", json=body, headers=headers, timeout=60)
    if resp.status_code != 202:
        return {"status": f"refused {resp.status_code}", "submitted": t0}
    job = resp.json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if time.perf_counter() - t0 > JOB_DEADLINE_S:
            return {"status": f"unfinished ({job['status']})", "submitted": t0}
        time.sleep(poll_s)
        job = session.get(f"{url}{job['status_url']}", headers=headers, timeout=60).json()
    out = {"status": job["status"], "submitted": t0, "attempts": job["attempts"]}
    if job["status"] == "failed":
        out["reason"] = job["error"]["message"] if job.get("error") else ""
    if job["status"] == "succeeded":
        video = session.get(f"{url}{job['content_url']}", headers=headers, timeout=60)
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            f.write(video.content)
            f.flush()
            out["frames"] = int(read_video(f.name).shape[0])
        out["queue_s"] = job["timings"].get("queue", 0.0)
        out["generate_s"] = job["timings"].get("generate", 0.0)
    out["done"] = time.perf_counter()
    out["latency_s"] = out["done"] - t0
    return out


def job_load(url: str, body: dict, n: int, rate: float, headers: dict) -> dict[str, Any]:
    """n jobs arriving at ``rate`` per second; figures of the module docstring."""
    t0 = time.perf_counter() + 0.5
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(one_job, url, {**body, "seed": i}, headers, t0 + i / rate, 0.1)
            for i in range(n)
        ]
        results = [f.result() for f in futures]
    counts = Counter(r["status"] for r in results)
    ok = [r for r in results if r["status"] == "succeeded"]
    failed = [r for r in results if r["status"] == "failed"]
    last = max((r["done"] for r in results if "done" in r), default=t0)
    return {
        "jobs": n,
        "rate_per_s": rate,
        "outcomes": dict(counts),
        "failure_reasons": sorted({r.get("reason", "") for r in failed}),
        "every_failure_has_a_reason": all(r.get("reason") for r in failed),
        "all_ended": not any(r["status"].startswith("unfinished") for r in results),
        "throughput_jobs_per_s": len(ok) / max(last - results[0]["submitted"], 1e-9),
        "p50_s": percentile([r["latency_s"] for r in ok], 50),
        "p95_s": percentile([r["latency_s"] for r in ok], 95),
        "queue_p50_s": percentile([r["queue_s"] for r in ok], 50),
        "generate_p50_s": percentile([r["generate_s"] for r in ok], 50),
        "retried": sum(1 for r in ok if r.get("attempts", 1) > 1),
        "frames_decoded": sorted({r["frames"] for r in ok}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled:shapes")
    ap.add_argument("--preset", default="shapes-tiny")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    ap.add_argument("--pairs", type=int, default=12, help="alternating pairs for the overhead")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--url", help="an already running endpoint (skips starting one)")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    ap.add_argument("--jobs", type=int, default=0, help="job mode: this many /v1/videos jobs")
    ap.add_argument("--rate", type=float, default=1.0, help="job mode: submissions per second")
    args = ap.parse_args(argv)

    cfg = load_config(preset=args.preset).replace(
        **{
            "model.path": args.model,
            "serve.port": args.port,
            "serve.max_replicas": args.max_replicas,
            "serve.job_store": tempfile.mkdtemp(prefix="dcm-serve-load-"),
            "serve.max_queued_jobs": max(64, args.jobs),
            "ray.dashboard": False,
        }
    )
    body = {
        "prompt": "a red circle moves left on a dark background",
        "steps": args.steps,
        "num_frames": args.frames,
        "height": args.height,
        "width": args.width,
    }
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.jobs:
        return run_jobs(args, cfg, body, headers)

    from dcm.generate import VideoGenerator

    gen = VideoGenerator.load(args.model, "cpu", cfg)
    started = None
    url = args.url
    if not url:
        from pipelines.cluster import init_ray, shutdown
        from pipelines.serve import start, stop

        started = init_ray(cfg.ray, quiet=True)
        url = start(cfg)
    try:
        over = overhead(url, gen, body, args.pairs, headers, cfg.model.fps)
        rows = [load_level(url, body, c, args.requests, headers) for c in levels]
    finally:
        if started is not None:
            stop()
            shutdown(started)

    print(f"request: {json.dumps(body)}")
    print(
        f"concurrency 1, {args.pairs} alternating pairs: in-process p50 "
        f"{over['in_process_p50_s'] * 1000:.1f} ms, HTTP p50 {over['http_p50_s'] * 1000:.1f} ms "
        f"-> overhead {over['overhead_ratio'] * 100:+.1f}% (target <= +10%); "
        f"time outside generate+encode p50 {over['outside_generate_p50_s'] * 1000:.1f} ms"
    )
    print(f"{'conc':>4} {'ok':>5} {'p50 ms':>9} {'p95 ms':>9} {'req/s':>7}")
    for r in rows:
        print(
            f"{r['concurrency']:>4} {r['ok']:>2}/{r['requests']:<2} {r['p50_s'] * 1000:>9.1f} "
            f"{r['p95_s'] * 1000:>9.1f} {r['throughput_rps']:>7.2f}"
        )
    if args.json:
        out = {"body": body, "overhead": over, "levels": rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def run_jobs(args: argparse.Namespace, cfg: Any, body: dict, headers: dict) -> int:
    """Job mode of main(): start the app unless --url, run job_load, print, check."""
    started, url = None, args.url
    if not url:
        from pipelines.cluster import init_ray
        from pipelines.serve import start

        started = init_ray(cfg.ray, quiet=True)
        url = start(cfg)
        requests.get(f"{url}/readyz", timeout=60)
    try:
        res = job_load(url, body, args.jobs, args.rate, headers)
    finally:
        if started is not None:
            from pipelines.cluster import shutdown
            from pipelines.serve import stop

            stop()
            shutdown(started)
    print(f"request: {json.dumps(body)}; {args.jobs} jobs at {args.rate:g}/s")
    print(
        f"outcomes {res['outcomes']}, retried {res['retried']}; throughput "
        f"{res['throughput_jobs_per_s']:.2f} jobs/s; submission -> downloaded video p50 "
        f"{res['p50_s']:.2f} s, p95 {res['p95_s']:.2f} s (queue p50 {res['queue_p50_s']:.2f} s, "
        f"generate p50 {res['generate_p50_s']:.2f} s); decoded frames {res['frames_decoded']}"
    )
    if res["failure_reasons"]:
        print("failure reasons: " + "; ".join(res["failure_reasons"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"body": body, **res}, indent=2) + "\n")
    ok = res["all_ended"] and res["every_failure_has_a_reason"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
