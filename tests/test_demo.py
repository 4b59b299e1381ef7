"""A shortened `dcm demo` through the same code path: every artifact is checked."""

from __future__ import annotations

import json
import re

import pytest

from dcm.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

QUICK = [
    "name=demo-ci",
    "train.steps_semantic=2",
    "train.steps_detail=2",
    "train.checkpoint_every=0",
    "train.log_every=1",
    "train.cpus_per_worker=0.5",
    "sample.eval_steps=[2, 4]",
    "sample.teacher_steps=8",
    "sample.seeds=[0]",
    "serve.port=8123",
]


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tmp_path_factory):
    from pipelines.demo import DEFAULT_CONFIG, run_demo

    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(DEFAULT_CONFIG, overrides=QUICK)
    state = run_demo(cfg, out, num_videos=8, num_prompts=2)
    return out, state


def test_every_stage_finished(demo_run):
    out, state = demo_run
    stages = ("data", "ingest", "distill", "evaluate", "serve", "report")
    assert [s for s in stages if state[s]["done"]] == list(stages)
    assert json.loads((out / "state.json").read_text())["report"]["done"]
    # the clips were encoded once into parquet shards, which both stages read
    ingest = state["ingest"]["result"]
    assert ingest["clips"] == 8 and ingest["rejects"] == 0 and ingest["reconciled"]
    assert list((out / "latents").glob("*.parquet"))


def test_videos_decode(demo_run):
    from dcm.video import read_video

    out, state = demo_run
    served = read_video(state["serve"]["result"]["video"])
    assert served.shape == (17, 64, 64, 3)
    gifs = state["evaluate"]["result"]["gifs"]
    assert gifs and all(read_video(g["path"]).shape[0] == 17 for g in gifs)
    data = list((out / "data" / "videos").glob("*.mp4"))
    assert len(data) == 8 and read_video(data[0]).shape == (17, 64, 64, 3)


def test_report_holds_tables_and_images(demo_run):
    out, state = demo_run
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "## Quality" in md and "## Speed" in md and "teacher" in md
    assert re.search(r"\| dcm\S*4", md), md
    # the untrained start and the shipped student are scored beside the fresh one
    assert re.search(r"\| untrained\S*4", md) and re.search(r"\| bundled\S*4", md), md
    for src in re.findall(r"src='([^']+)'", html):
        assert (out / src).is_file(), src
    assert "<table>" in html and ".gif" in html


def test_mlflow_holds_the_runs(demo_run):
    from mlflow.tracking import MlflowClient

    _, state = demo_run
    dist = state["distill"]["result"]
    client = MlflowClient(tracking_uri=dist["tracking_uri"])
    for stage in ("semantic", "detail"):
        run = client.get_run(dist["stages"][stage]["run_id"])
        assert run.info.status == "FINISHED"
        assert any("loss" in k for k in run.data.metrics), run.data.metrics


def test_rerun_skips_finished_stages(demo_run, caplog):
    import logging

    from pipelines.demo import DEFAULT_CONFIG, run_demo

    out, state = demo_run
    cfg = load_config(DEFAULT_CONFIG, overrides=QUICK)
    with caplog.at_level(logging.INFO, logger="pipelines.demo"):
        again = run_demo(cfg, out, num_videos=8, num_prompts=2)
    assert again["distill"]["seconds"] == state["distill"]["seconds"]
    skipped = [r.getMessage() for r in caplog.records if "already done" in r.getMessage()]
    assert len(skipped) == 6, skipped  # every stage, ingest included
