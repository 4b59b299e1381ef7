"""One script for a lent GPU machine: GPU tests, then every benchmark's `--gpu` mode.

Usage on the device (after the install line in benchmarks/gpu_wheels.sh's header):

    python benchmarks/gpu_check.py [--budget 480] [--only sampler,train_step]

The `teacher` part (issue #17's first call on GPU minutes) is not in the default list: it
continues the bundled shapes teacher's rectified flow for `--teacher-minutes` on the GPU (its
VAE and vocabulary kept) at batch 256, where the tiny model is launch-bound and a batch twice
run 1's costs about the same per step. The bundle and its pretrain.json land in
$OUT/teacher; it is scored afterwards on the CPU (`python -m pipelines.pretrain
--evaluate-only --out BUNDLE --eval-cfg 2,3,5 --set 'sample.seeds=[0,1]'`), fp32, like every
row of the bundle README, so no device time goes to sampling. Run it first:

    python benchmarks/gpu_check.py --only teacher,gpu-tests,sampler,train_step --budget 520

(On CPU, `--only teacher --teacher-minutes 0.1 --teacher-clips 64 --teacher-batch 8` checks
the plumbing in about a minute on the 2-core box.)

Each part runs in its own process with a time limit taken from what is left of the budget,
so one slow part cannot eat the whole device session; the output of each part is kept
and a short table (part, status, seconds, last result line) is printed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

OUT = os.environ.get("OUT", "gpu_check_logs")


def teacher(minutes: float, clips: int, batch: int) -> list[str]:
    """Continue the bundled teacher's flow training (VAE kept) for `minutes` on this machine."""
    return [
        PY, "-m", "pipelines.pretrain", "--init", "bundled:shapes", "--out", f"{OUT}/teacher",
        "--workdir", "/tmp/dcm_pretrain_work", "--vae-steps", "0", "--clips", str(clips),
        "--steps", "1000000", "--minutes", str(minutes), "--batch", str(batch), "--lr", "5e-4",
        "--warmup", "100", "--threads", "8", "--checkpoint-minutes", "0", "--eval-prompts", "0",
        "--log-every", "500", "--set", "ray.dashboard=false",  # the slim ray has no dashboard
    ]  # fmt: skip


# (name, command, share of the budget) in order of importance.
PARTS: list[tuple[str, list[str], float]] = [
    ("gpu-tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 0.15),
    ("sampler", [PY, "benchmarks/sampler.py", "--gpu", "--frames", "33", "--repeat", "1"], 0.2),
    (
        "train_step",
        [PY, "benchmarks/train_step.py", "--gpu", "--frames", "33", "--repeat", "2"],
        0.25,
    ),
    ("distill", [PY, "benchmarks/distill.py", "--gpu", "--frames", "33", "--steps", "3"], 0.2),
    ("ingest", [PY, "benchmarks/ingest.py", "--gpu", "--videos", "8"], 0.2),
]


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    lines = lines or [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:110]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all parts")
    parser.add_argument("--only", default="", help="comma list of parts to run")
    parser.add_argument("--log-dir", default=OUT)
    parser.add_argument("--teacher-minutes", type=float, default=4.5, help="of flow training")
    parser.add_argument("--teacher-clips", type=int, default=8192)
    parser.add_argument("--teacher-batch", type=int, default=256)
    args = parser.parse_args()
    wanted = {p for p in args.only.split(",") if p}
    parts = []
    if "teacher" in wanted:
        cmd = teacher(args.teacher_minutes, args.teacher_clips, args.teacher_batch)
        parts.append(("teacher", cmd, 1.0))
    parts += [p for p in PARTS if not wanted or p[0] in wanted]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    start, rows = time.perf_counter(), []
    total_share = sum(share for *_, share in parts)
    for name, cmd, share in parts:
        left = args.budget - (time.perf_counter() - start)
        limit = min(left, args.budget * share / total_share * 1.5)
        if limit < 20:
            rows.append((name, "no time", 0.0, ""))
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
            )
            status = "ok" if proc.returncode == 0 else f"rc {proc.returncode}"
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status = "timeout"
            out = (
                (err.stdout or b"").decode(errors="replace")
                if isinstance(err.stdout, bytes)
                else (err.stdout or "")
            )
        took = time.perf_counter() - t0
        (log_dir / f"{name}.log").write_text(out)
        print(f"===== {name}: {status} in {took:.0f} s\n{out[-4000:]}", flush=True)
        rows.append((name, status, took, last_line(out)))
    print("\n| part | status | s | last result line |\n|---|---|---|---|")
    for name, status, took, line in rows:
        print(f"| {name} | {status} | {took:.0f} | {line} |")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
