"""One script for a lent GPU machine: GPU tests, then every benchmark's `--gpu` mode.

Usage on the device (after the install line in benchmarks/gpu_wheels.sh's header):

    python benchmarks/gpu_check.py [--budget 480] [--only sampler,train_step]

The `teacher` part (issue #17's first call on GPU minutes) is not in the default list: it
continues the bundled shapes teacher's rectified flow for TEACHER_MINUTES on the GPU (its
VAE and vocabulary kept), then scores it at 50 steps on 24 held-out captions x 2 seeds at
w = 2 and 5; the bundle and its pretrain.json land in $OUT/teacher. Run it alone first:

    python benchmarks/gpu_check.py --only teacher --budget 480

(On CPU the same command with `--minutes 0.2 --clips 64 --batch 8 --eval-prompts 2
--threads 2` checks the plumbing: 1 minute on the 2-core box, 54 flow steps, a bundle with
its held-out scores in $OUT/teacher/pretrain.json.)

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
TEACHER_MINUTES = 4.0  # of flow training; start-up, encoding and scoring add about 2 minutes
TEACHER = [
    PY, "-m", "pipelines.pretrain", "--init", "bundled:shapes", "--out", f"{OUT}/teacher",
    "--workdir", "/tmp/dcm_pretrain_work", "--vae-steps", "0", "--clips", "8192",
    "--steps", "200000", "--minutes", str(TEACHER_MINUTES), "--batch", "128", "--lr", "5e-4",
    "--warmup", "100", "--threads", "8", "--checkpoint-minutes", "0", "--eval-prompts", "24",
    "--eval-cfg", "2,5", "--log-every", "250", "--set", "sample.seeds=[0,1]",
]  # fmt: skip
ON_REQUEST = {"teacher": TEACHER}  # parts run only when --only names them

# (name, command, share of the budget) in order of importance.
PARTS: list[tuple[str, list[str], float]] = [
    ("gpu-tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 0.15),
    ("sampler", [PY, "benchmarks/sampler.py", "--gpu", "--repeat", "2"], 0.2),
    ("train_step", [PY, "benchmarks/train_step.py", "--gpu", "--repeat", "2"], 0.25),
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
    args = parser.parse_args()
    wanted = {p for p in args.only.split(",") if p}
    parts = [(n, cmd, 1.0) for n, cmd in ON_REQUEST.items() if n in wanted]
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
