"""Latency and throughput of the Serve endpoint against concurrency, and its overhead.

    python benchmarks/serve_load.py [--model bundled:shapes] [--concurrency 1,2,4,8]
        [--requests 24] [--frames 17 --height 64 --width 64 --steps 4] [--url URL]
        [--json OUT.json]

Without ``--url`` it starts a local loopback Ray cluster and the app (as ``dcm serve`` does).
The in-process baseline is the same work without HTTP/Serve: ``VideoGenerator.generate`` on
one prompt plus ``video_bytes`` encoding, in this process. Overhead = p50(HTTP, concurrency
1) / p50(in-process) - 1; the target on the shapes model is at most 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from dcm.config import load_config


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def in_process(model: str, body: dict, n: int, cfg) -> list[float]:
    """Seconds per request of generate + encode without Serve (after one warm-up)."""
    from dcm.generate import VideoGenerator
    from dcm.video import video_bytes

    gen = VideoGenerator.load(model, "cpu", cfg)
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        frames = gen.generate(
            [body["prompt"]],
            steps=body["steps"],
            seed=i,
            num_frames=body["num_frames"],
            height=body["height"],
            width=body["width"],
        )
        video_bytes(frames[0], cfg.model.fps, fmt="mp4")
        if i:  # the first call warms caches and allocators
            times.append(time.perf_counter() - t0)
    return times


def load_level(url: str, body: dict, concurrency: int, n: int, headers: dict) -> dict:
    """n requests from `concurrency` clients: latency percentiles, throughput, errors."""
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
        "p50_s": percentile(ok, 50) if ok else float("nan"),
        "p95_s": percentile(ok, 95) if ok else float("nan"),
        "throughput_rps": len(ok) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled:shapes")
    ap.add_argument("--preset", default="shapes-tiny")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--url", help="an already running endpoint (skips starting one)")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args(argv)

    cfg = load_config(preset=args.preset).replace(
        **{
            "model.path": args.model,
            "serve.port": args.port,
            "serve.max_replicas": args.max_replicas,
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

    base = in_process(args.model, body, max(8, args.requests // 2), cfg)
    started = None
    url = args.url
    if not url:
        from pipelines.cluster import init_ray, shutdown
        from pipelines.serve import start, stop

        started = init_ray(cfg.ray, quiet=True)
        url = start(cfg)
    try:
        for _ in range(3):  # warm-up: first requests load caches on the replica
            requests.post(f"{url}/v1/generate", json=body, headers=headers, timeout=600)
        rows = [load_level(url, body, c, args.requests, headers) for c in levels]
    finally:
        if started is not None:
            stop()
            shutdown(started)

    base_p50 = statistics.median(base)
    print(
        f"in-process generate+encode: p50 {base_p50 * 1000:.1f} ms, p95 {percentile(base, 95) * 1000:.1f} ms"
    )
    print(f"{'conc':>4} {'ok':>5} {'p50 ms':>9} {'p95 ms':>9} {'req/s':>7}")
    for r in rows:
        print(
            f"{r['concurrency']:>4} {r['ok']:>2}/{r['requests']:<2} {r['p50_s'] * 1000:>9.1f} "
            f"{r['p95_s'] * 1000:>9.1f} {r['throughput_rps']:>7.2f}"
        )
    c1 = next((r for r in rows if r["concurrency"] == 1), None)
    overhead = (c1["p50_s"] / base_p50 - 1.0) if c1 else float("nan")
    print(f"HTTP + Serve overhead at concurrency 1: {overhead * 100:+.1f}% (target <= +10%)")
    if args.json:
        out = {"in_process_p50_s": base_p50, "levels": rows, "overhead_c1": overhead, "body": body}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
