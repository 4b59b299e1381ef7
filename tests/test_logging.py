"""Logging (#20 part 6): one line per record with time, level and module; progress written
into a file is one line per interval, never a bar redrawn with carriage returns."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.args import setup_logging

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    for name in ("pipelines", "dcm", "serve"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_one_line_per_record_and_levels(restore_logging, capsys, monkeypatch):
    monkeypatch.delenv("DCM_LOG", raising=False)
    setup_logging([])
    setup_logging([])  # configured twice: still one handler, one line per record
    logging.getLogger("pipelines.ingest.run").info("wrote %d shards", 3)
    logging.getLogger("pipelines.demo").debug("hidden at info")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d I ingest\.run: wrote 3 shards", err[0])
    setup_logging(["--quiet"])
    logging.getLogger("dcm.bundle").info("hidden when quiet")
    logging.getLogger("dcm.bundle").warning("kept")
    assert capsys.readouterr().err.split(" ", 1)[1] == "W bundle: kept\n"
    monkeypatch.setenv("DCM_LOG", "debug")
    setup_logging([])
    logging.getLogger("pipelines.demo").debug("shown")
    logging.getLogger("urllib3").debug("a library's debug stays hidden")
    assert capsys.readouterr().err.split(" ", 1)[1] == "D demo: shown\n"


# A dataset consumed inside a Ray worker, as Ray Train workers consume their shards: the
# case where Ray draws worker progress bars on the driver (ray tqdm) even into a file.
SCRIPT = """
import sys, time
import ray
from dcm.config import RayConfig
from pipelines.cluster import init_ray

init_ray(RayConfig(address=sys.argv[1]))


def slow(batch):
    time.sleep(0.05)
    return batch


shard = ray.data.range(4000, override_num_blocks=80).map_batches(slow).streaming_split(1)[0]


@ray.remote(num_cpus=0)
def consume(it):
    return sum(len(b["id"]) for b in it.iter_batches(batch_size=100))


print("rows", ray.get(consume.remote(shard)))
"""


def test_progress_into_a_file_is_lines_not_redraws(ray_cluster, tmp_path):
    log = tmp_path / "stage.log"
    env = {**os.environ, "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "2"}
    env.pop("RAY_TQDM", None)
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, ray_cluster.address],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "rows 4000" in text, text[-3000:]
    assert "\r" not in text, "a progress bar was redrawn into the file"
    progress = [ln for ln in text.splitlines() if re.search(r"\d+/(\d+|\?)", ln)]
    assert progress, "no progress line at all"
    # one line per operator (and the total) per interval, however many blocks finished
    assert len(progress) <= 200, len(progress)
