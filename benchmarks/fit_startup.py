"""What Ray's Train controller pays to unpickle one distillation stage.

Ray pickles the TorchTrainer's per-worker function by reference and its config by value;
the controller process unpickles both before it starts the workers, so whatever modules
they need it imports. This times that in fresh processes (median of ``--repeats``), for
the function and config the driver hands Ray today (``pipelines.worker_entry`` + plain
dicts) against handing it ``pipelines.train_loop.train_loop`` and the settings' classes
(what it did before: the controller imported torch, transformers and peft).

    python benchmarks/fit_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import numpy as np
from common import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcm.config import load_config  # noqa: E402
from pipelines.train_loop import StageSettings, ValidationInputs, train_loop  # noqa: E402
from pipelines.worker_entry import distill_worker  # noqa: E402

PROBE = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"


def unpickle_seconds(payload: object, repeats: int) -> float:
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        f.write(cloudpickle.dumps(payload))
        f.flush()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", PROBE, f.name], cwd=ROOT, check=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    val = ValidationInputs(
        ["a red ball"], np.ones((1, 4, 8), np.float32), np.ones((1, 4), bool),
        np.zeros((1, 4, 8), np.float32), np.ones((1, 4), bool), (8, 2, 4, 4),
    )  # fmt: skip
    settings = StageSettings(load_config(preset="shapes-tiny"), "semantic", val)
    fields = {f: getattr(settings, f) for f in ("cfg", "stage", "val", "logger")}
    before = unpickle_seconds((train_loop, {**fields, "cfg": settings.cfg.to_dict()}), args.repeats)
    now = unpickle_seconds((distill_worker, settings.loop_config()), args.repeats)
    bare = unpickle_seconds(None, args.repeats)  # the interpreter's own start
    print(f"machine: {machine()}")
    print("| what the controller unpickles | seconds (median, fresh process) |")
    print("|---|---|")
    print(f"| nothing (python start) | {bare:.2f} |")
    print(f"| train_loop + settings classes (before) | {before:.2f} |")
    print(f"| worker_entry + plain dicts (now) | {now:.2f} |")
    print(f"before / now: {before / now:.1f}x")


if __name__ == "__main__":
    main()
