"""Ray Tune sweeps: space parsing, searchers, best-config YAML, the report, and ASHA.

The integration test here runs a 2-trial ASHA sweep on the session's local Ray cluster,
each trial a real (tiny) distill run, and checks that ASHA stops the bad one. The whole
ablation sweep (variants, MLflow parent and children, report, best config) runs once, as a
`ray job submit` entrypoint, in tests/test_job_submit.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dcm.config import ConfigError, load_config
from pipelines import sweep as sw
from pipelines.args import run_main
from pipelines.sweep_report import load, table_rows, write_report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "configs"


def _cfg(*overrides: str):
    return load_config(None, "shapes-tiny", list(overrides))


# ---------------------------------------------------------------- space and searchers
def test_space_parses_every_kind_and_variants():
    cfg = _cfg(
        "sweep.space={method.split: {grid: [10, 30]}, method.tc_weight: {uniform: [0.1, 2.0]},"
        " train.lr_semantic: {loguniform: [1.0e-5, 1.0e-3]}, lora.rank: {choice: [4, 8]},"
        " method.tc_stride: {randint: [1, 3]}}",
        "sweep.variants={a: {method.adv_weight: 0.0}, b: {}}",
    )
    dims = {d.key: d for d in sw.parse_space(cfg)}
    assert dims["method.split"].values == (10, 30) and dims["variant"].values == ("a", "b")
    grid = sw.tune_space(list(dims.values()), "grid")
    assert grid["method.split"] == {"grid_search": [10, 30]}
    assert grid["variant"] == {"grid_search": ["a", "b"]}
    assert grid["method.tc_stride"].upper == 4  # randint's hi is inclusive in the config
    for searcher in ("random", "optuna"):
        space = sw.tune_space(list(dims.values()), searcher)
        assert list(space["method.split"].categories) == [10, 30]  # grids become choices


def test_optuna_searcher_draws_valid_trials_from_the_shipped_space():
    cfg = load_config(CONFIGS / "sweep-shapes.yaml")
    dims = sw.check_sweep(cfg)
    searcher = sw._searcher(cfg)  # Optuna TPE behind a ConcurrencyLimiter
    assert searcher.set_search_properties("val/score", "max", sw.tune_space(dims, "optuna"))
    drawn = searcher.suggest("trial_0")
    assert drawn.keys() == {d.key for d in dims}
    assert drawn["method.split"] in (14, 24, 34, 40) and 0.1 <= drawn["method.tc_weight"] <= 3.0
    trial = sw.trial_config(cfg, drawn, "t0")  # a drawn point is a valid config
    assert trial.lora.rank == drawn["lora.rank"] and trial.train.run_name == "t0"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("{method.splitt: {grid: [3]}}", "'method.splitt' is not a config key"),
        ("{method.split: {grid: [10, 49]}}", "value 49 is invalid"),
        ("{method.split: {between: [1, 2]}}", "must be one of"),
        ("{method.tc_weight: {uniform: [2.0, 1.0]}}", "needs lo < hi"),
        ("{train.lr_semantic: {loguniform: [0, 1.0e-3]}}", "lo > 0"),
        ("{}", "both empty"),
    ],
)
def test_bad_space_is_one_clear_error(space, message):
    with pytest.raises(ConfigError, match=message):
        sw.parse_space(_cfg(f"sweep.space={space}"))


def test_bad_variant_and_unsupported_resources_are_clear_errors():
    with pytest.raises(ConfigError, match="sweep.variants.x: 'method.nope'"):
        sw.parse_space(_cfg("sweep.variants={x: {method.nope: 1}}"))
    space = "sweep.space={method.split: {grid: [10]}}"
    with pytest.raises(ConfigError, match="trial_gpus=0.5"):
        sw.check_sweep(_cfg(space, "sweep.trial_gpus=0.5"))
    with pytest.raises(ConfigError, match="needs ray.dashboard=true"):
        sw.check_sweep(_cfg(space, "ray.dashboard=false"))


def test_cli_reports_a_bad_space_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.sweep", "--preset", "shapes-tiny", "--set",
         "sweep.space={method.split: {grid: [99]}}", "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "method.split" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["sweep-shapes.yaml", "ablation-shapes.yaml"])
def test_shipped_configs_pass_dry_run(name, capsys):
    assert sw.main(["--config", str(CONFIGS / name), "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["sweep"]["space"]
    cfg = load_config(CONFIGS / name)
    dims = sw.check_sweep(cfg)
    if name == "sweep-shapes.yaml":  # the knobs: b, TC, GAN, FM, learning rates, rank
        keys = {d.key for d in dims}
        assert {"method.split", "method.tc_weight", "method.tc_stride", "method.adv_weight",
                "method.fm_weight", "train.lr_semantic", "lora.rank"} <= keys  # fmt: skip
        assert cfg.sweep.searcher == "optuna" and cfg.sweep.asha


def test_ablation_variants_are_the_papers_rows():
    cfg = load_config(CONFIGS / "ablation-shapes.yaml")
    assert cfg.sample.steps == 4 and cfg.sample.teacher_steps == 50
    assert len(cfg.sample.seeds) >= 2 and cfg.sweep.teacher_baseline
    trials = {name: sw.trial_config(cfg, {"variant": name}, name) for name in cfg.sweep.variants}
    single, two, two_tc, dcm = (
        trials[k] for k in ("single-cm", "two-experts", "two-experts-tc", "dcm")
    )
    assert single.train.stage == "semantic" and single.method.tc_weight == 0.0
    assert two.train.stage == "both" and two.method.tc_weight == 0 and two.method.adv_weight == 0
    assert two_tc.method.tc_weight > 0 and two_tc.method.adv_weight == 0
    assert dcm.method.tc_weight > 0 and dcm.method.adv_weight > 0 and dcm.method.fm_weight > 0


def test_best_config_is_a_distill_config(tmp_path, capsys):
    cfg = load_config(CONFIGS / "sweep-shapes.yaml")
    best = sw.best_config(cfg, {"method.split": 24, "lora.rank": 4})
    path = tmp_path / "best.yaml"
    path.write_text(best.to_yaml())
    again = load_config(path)
    assert again.method.split == 24 and again.lora.rank == 4 and again.sweep.space == {}
    assert again.train.run_name == "sweep-shapes-best"
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--config", str(path), "--dry-run"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["method"]["split"] == 24


# ---------------------------------------------------------------- report
def _fake_sweep(root: Path) -> Path:
    run = root / "fake-sweep"
    run.mkdir()
    sweep = {"name": "fake-sweep", "metric": "val/score", "mode": "max", "searcher": "grid",
             "dimensions": ["method.split", "variant"], "parent_run_id": None, "tracking_uri": "",
             "baseline": {"value": 0.8, "teacher_steps": 50}}  # fmt: skip
    trials = [
        {"trial_id": f"t{i}", "params": {"method.split": b, "variant": v}, "status": st,
         "error": "", "iterations": len(h), "last": h[-1][1], "best": max(y for _, y in h),
         "history": h, "mlflow_run_id": None}
        for i, (b, v, st, h) in enumerate([
            (10, "a", "finished", [[1, 0.2], [2, 0.5]]),
            (30, "b", "stopped", [[1, 0.1]]),
            (30, "a", "finished", [[1, 0.6], [2, 0.3]]),  # best 0.6, final 0.3
        ])
    ]  # fmt: skip
    (run / "sweep.json").write_text(json.dumps(sweep))
    (run / "trials.json").write_text(json.dumps(trials))
    return run


def test_report_writes_table_plots_and_html(tmp_path, capsys):
    run = _fake_sweep(tmp_path)
    rows = table_rows(*load(run))
    assert [r["trial"] for r in rows] == ["t2", "t0", "t1"]  # best first
    out = write_report(run, log_to_mlflow=False)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["metric_vs_method_split.png", "metric_vs_variant.png", "overview.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>t2</td>" in page
    assert "Teacher at 50 steps" in page
    assert (out / "trials.csv").read_text().splitlines()[0].startswith("trial,status,method.split")
    variants = (out / "variants.csv").read_text().splitlines()
    assert variants[0] == "variant,mean,std,final_mean,final_std,trials"
    a_row = [float(v) for v in variants[1].split(",")[1:]]  # best over seeds, then final
    assert variants[1].startswith("a,") and a_row == pytest.approx([0.55, 0.05, 0.4, 0.1, 2])
    assert variants[-1].startswith("teacher (50 steps),0.8")
    assert sw.main(["report", str(run), "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    assert "| t2 | finished | 30 | a |" in printed and "| b | 0.1 | 0 | 0.1 | 0 | 1 |" in printed


def test_ablation_table_reads_every_step_count_from_the_stage_runs(tmp_path, capsys):
    """A variant sweep's report reads each trial's val/score_{n}steps curves back from its
    MLflow stage runs (semantic, then detail after it): the untrained start, the final mean
    and std over seeds, and the change over the last two validation intervals."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("abl", artifact_location=(tmp_path / "art").as_uri())
    # variant -> seed -> stage -> {n: values at steps 0, 50, 100}
    plan = {
        "one": [{"semantic": {2: [0.1, 0.2, 0.3], 4: [0.2, 0.3, 0.4]}}] * 2,
        "two": [
            {"semantic": {2: [0.1, 0.3, 0.4], 4: [0.2, 0.4, 0.5]},
             "detail": {2: [0.4, 0.5, 0.6], 4: [0.5, 0.6, 0.6]}},
            {"semantic": {2: [0.1, 0.3, 0.4], 4: [0.2, 0.4, 0.5]},
             "detail": {2: [0.4, 0.5, 0.8], 4: [0.5, 0.6, 0.8]}},
        ],
    }  # fmt: skip
    trials = []
    for variant, seeds in plan.items():
        for seed, stages in enumerate(seeds):
            trial = client.create_run(exp, tags={"dcm_stage": "trial"}).info.run_id
            for stage, scores in stages.items():
                tags = {"dcm_stage": stage, "mlflow.parentRunId": trial}
                run = client.create_run(exp, tags=tags).info.run_id
                for n, values in scores.items():
                    for step, v in zip((0, 50, 100), values, strict=True):
                        client.log_metric(run, f"val/score_{n}steps", v, step=step)
            trials.append({"trial_id": f"{variant}{seed}", "params": {"variant": variant},
                           "status": "finished", "error": "", "iterations": 3, "last": 0.0,
                           "best": 0.0, "history": [[1, 0.0]], "mlflow_run_id": trial})  # fmt: skip
    run_dir = tmp_path / "abl"
    run_dir.mkdir()
    sweep = {"name": "abl", "metric": "val/score", "mode": "max", "searcher": "grid",
             "dimensions": ["variant"], "parent_run_id": None, "tracking_uri": uri,
             "config": {"sample": {"steps": 4, "eval_steps": [2, 4]}},
             "baseline": {"value": 0.7, "teacher_steps": 50}}  # fmt: skip
    (run_dir / "sweep.json").write_text(json.dumps(sweep))
    (run_dir / "trials.json").write_text(json.dumps(trials))

    out = write_report(run_dir, log_to_mlflow=False)
    with open(out / "ablation.csv") as f:
        rows = {(r["variant"], int(r["steps"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("one", 2), ("one", 4), ("two", 2), ("two", 4)}
    one, two = rows["one", 4], rows["two", 2]
    # one stage: 0..100; two stages: the detail stage's step 0 (the semantic end) is dropped
    assert int(one["trained_steps"]) == 100 and int(two["trained_steps"]) == 200
    assert float(one["start"]) == pytest.approx(0.2) and float(two["start"]) == pytest.approx(0.1)
    assert float(two["final_mean"]) == pytest.approx(0.7)
    assert float(two["final_std"]) == pytest.approx(0.1)
    # change over the last 100 steps: 0.6 - 0.4 and 0.8 - 0.4
    assert float(two["change_last_100"]) == pytest.approx(0.3)
    assert float(two["change_std"]) == pytest.approx(0.1)
    assert float(rows["two", 4]["change_last_100"]) == pytest.approx(0.2)  # 0.6 - 0.5, 0.8 - 0.5
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Every step count" in (out / "report.html").read_text()
    assert sw.main(["report", str(run_dir), "--no-mlflow"]) == 0
    assert "| two | 2 | 0.1 | 0.7 | 0.1 | 0.3 | 0.1 | 200 | 2 |" in capsys.readouterr().out


def test_driver_closes_errored_and_stopped_trials_and_their_stage_runs(tmp_path):
    """Trials leave their MLflow runs open on the way out; the driver closes them from Tune's
    record: an error is FAILED, a trial ASHA stopped is KILLED (its open stage run too), a
    finished trial keeps FINISHED. Real sqlite store, Tune-shaped results."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow import MlflowClient

    from pipelines.tracking import Tracker

    cfg = _cfg(f"train.out={tmp_path}", "name=collect")
    tracker = Tracker(cfg, tmp_path / "collect")
    parent = tracker.open_run(sw.SWEEP).run_id
    runs, results = {}, []
    for tid, error, closed in (("t0", None, True), ("t1", RuntimeError("boom"), False),
                               ("t2", None, False)):  # fmt: skip
        trial = tracker.open_run(sw.TRIAL, parent, name=tid, tags={"dcm_trial": tid}, resume=False)
        stage = tracker.open_run("semantic", trial.run_id, name=f"{tid}-sem", resume=False)
        if closed:
            tracker.close_run(stage)
            tracker.close_run(trial)
        runs[tid] = (trial.run_id, stage.run_id)
        frame = pd.DataFrame({"training_iteration": [1, 2], "val/score": [0.2, 0.4]})
        results.append(SimpleNamespace(
            metrics_dataframe=frame, metrics={"trial_id": tid}, path=str(tmp_path / tid),
            error=error, config={"train.lr_semantic": 1e-4},
        ))  # fmt: skip
    trials = {t["trial_id"]: t for t in sw._collect(results, cfg, tracker, parent)}

    assert {k: t["status"] for k, t in trials.items()} == {
        "t0": "finished", "t1": "error", "t2": "stopped"}  # fmt: skip
    assert trials["t1"]["error"] == "boom" and trials["t2"]["best"] == pytest.approx(0.4)
    client = MlflowClient(tracking_uri=tracker.uri)
    status = {k: [client.get_run(r).info.status for r in ids] for k, ids in runs.items()}
    assert status == {"t0": ["FINISHED"] * 2, "t1": ["FAILED"] * 2, "t2": ["KILLED"] * 2}


def test_a_resumed_trials_history_is_read_from_its_stage_runs(tmp_path):
    """Tune restarts a resumed trial with an empty record (the 500 + 500 ablation: one
    validation left of ten), so the driver reads the whole curve back from the trial's
    stage runs: semantic then detail, without the untrained start and without the detail
    stage's step 0. A trial whose Tune record is whole keeps it."""
    from types import SimpleNamespace

    import pandas as pd

    from pipelines.tracking import Tracker

    cfg = _cfg(f"train.out={tmp_path}", "name=resumed")
    tracker = Tracker(cfg, tmp_path / "resumed")
    parent = tracker.open_run(sw.SWEEP).run_id
    logged = {"semantic": [0.1, 0.3, 0.5], "detail": [0.5, 0.6, 0.7]}  # steps 0, 50, 100
    results = []
    for tid, tune_scores in (("whole", [0.3, 0.5, 0.6, 0.7]), ("resumed", [0.7])):
        trial = tracker.open_run(sw.TRIAL, parent, name=tid, tags={"dcm_trial": tid}, resume=False)
        for stage, values in logged.items():
            run = tracker.open_run(stage, trial.run_id, name=f"{tid}-{stage}", resume=False)
            for step, v in zip((0, 50, 100), values, strict=True):
                run.log_metrics({"val/score": v}, step=step)
            tracker.close_run(run)
        tracker.close_run(trial)
        its = list(range(1, len(tune_scores) + 1))
        frame = pd.DataFrame({"training_iteration": its, "val/score": tune_scores})
        results.append(SimpleNamespace(
            metrics_dataframe=frame, metrics={"trial_id": tid}, path=str(tmp_path / tid),
            error=None, config={"train.seed": 0},
        ))  # fmt: skip
    trials = {t["trial_id"]: t for t in sw._collect(results, cfg, tracker, parent)}

    for t in trials.values():
        assert t["history"] == [[1.0, 0.3], [2.0, 0.5], [3.0, 0.6], [4.0, 0.7]], t
        assert (t["iterations"], t["best"], t["last"]) == (4, 0.7, 0.7)


def test_resume_needs_the_interrupted_sweep_and_its_space(tmp_path, capsys):
    """--resume refuses, in one sentence naming sweep.json, a sweep that is not there, one
    without a recorded Tune state, and a config whose space differs from the recorded one;
    the same config is accepted."""
    cfg = _cfg(
        "name=resumable", f"train.out={tmp_path}", "sweep.searcher=grid",
        "sweep.space={train.seed: {grid: [0, 1]}}",
    )  # fmt: skip
    sw.check_sweep(cfg)  # a valid space
    with pytest.raises(ConfigError, match=r"no sweep 'resumable' to resume .*sweep\.json"):
        sw.resume_record(cfg)
    code = run_main(sw.main, ["--preset", "shapes-tiny", "--set", "name=resumable", "--out",
                              str(tmp_path), "--resume", "--set",
                              "sweep.space={train.seed: {grid: [0, 1]}}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--resume" in err[0], err

    file = tmp_path / "resumable" / sw.SWEEP_FILE
    file.parent.mkdir()
    file.write_text('{"parent_run_id": "p", ')  # cut short by a full disk
    with pytest.raises(ConfigError, match=r"sweep\.json is not valid JSON"):
        sw.resume_record(cfg)
    record = {"parent_run_id": "p", "dimensions": ["train.seed"], "config": cfg.to_dict()}
    file.write_text(json.dumps(record, default=str))
    with pytest.raises(ConfigError, match="does not name its Tune state"):
        sw.resume_record(cfg)
    file.write_text(json.dumps({**record, "tune_dir": "tune-1"}, default=str))
    assert sw.resume_record(cfg)["tune_dir"] == "tune-1"

    wider = cfg.replace(**{"sweep.space": {"train.seed": {"grid": [0, 1, 2]}}})
    with pytest.raises(ConfigError, match=r"sweep\.space is .* in the interrupted sweep"):
        sw.resume_record(wider)


def test_report_of_a_non_sweep_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a finished sweep run directory"):
        load(tmp_path)


# ---------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def shapes_latents(tmp_path_factory, ray_cluster):
    """The session's tiny bundle + ingested shapes clips (shared with the distill tests)."""
    from test_distill import shapes_latents as session_latents

    return session_latents(tmp_path_factory)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_asha_stops_a_deliberately_bad_trial_early(shapes_latents, tmp_path):
    """Two trials, one after the other: a sane learning rate, then lr 1.0, which wrecks the
    student in its first step. ASHA (grace 1, factor 2) must stop the second at a rung,
    below the first trial's value there, instead of training it on. Six steps, not two:
    Tune's decision reaches the trial while its Train workers keep stepping, and on a
    loaded machine a 2-step trial finished before the stop arrived (CI, 2026-12-03)."""
    from mlflow import MlflowClient

    bundle, latents = shapes_latents
    cfg = _cfg(
        "name=asha-test", f"model.path={bundle}", f"data.latents={latents}",
        f"train.out={tmp_path / 'runs'}", "data.mode=parquet", "train.stage=semantic",
        "train.steps_semantic=6",
        "train.global_batch=2", "train.checkpoint_every=1", "train.log_every=1",
        "train.val_prompts=1", "sample.seeds=[0]", "sample.eval_steps=[]",
        "sample.prompts=[a lamp on a wooden table]",  # free text: val/score = PSNR to teacher
        "sweep.space={train.lr_semantic: {grid: [1.0e-6, 1.0]}}", "sweep.searcher=grid",
        "sweep.asha=true", "sweep.grace_period=1", "sweep.reduction_factor=2",
        "sweep.max_concurrent=1", "sweep.teacher_baseline=false", "sweep.trial_cpus=0.5",
    )  # fmt: skip
    result = sw.run_sweep(cfg)

    by_lr = {t["params"]["train.lr_semantic"]: t for t in result.trials}
    good, bad = by_lr[1.0e-6], by_lr[1.0]
    assert good["status"] == "finished" and good["iterations"] == 6
    # stopped at a rung (1 validation, or 2 or 4 when the stop arrived late), never run out
    assert bad["status"] == "stopped" and bad["iterations"] < good["iterations"], (bad, good)
    assert bad["history"][0][1] < good["history"][0][1]  # worse at the first rung
    client = MlflowClient(
        tracking_uri=json.loads((result.run_dir / "sweep.json").read_text())["tracking_uri"]
    )
    assert client.get_run(bad["mlflow_run_id"]).info.status == "KILLED"
    stage_runs = client.search_runs(
        [client.get_run(bad["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{bad['mlflow_run_id']}'",
    )
    assert [r.info.status for r in stage_runs] == ["KILLED"]  # its semantic stage, closed too
    assert result.best_params == {"train.lr_semantic": 1.0e-6}


def test_relative_paths_become_absolute_for_trials(tmp_path, monkeypatch):
    """Tune runs trials in their own working directories: relative local paths must not
    reach them, while bundled names, hub ids and URIs stay as written."""
    from pipelines.args import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lat").mkdir()
    (tmp_path / "sem").mkdir()
    cfg = load_config(preset="shapes-tiny").replace(
        **{"data.latents": "lat", "train.out": "runs", "model.path": "bundled:shapes",
           "train.init_from": "sem"}
    )  # fmt: skip
    got = absolute_paths(cfg)
    assert got.data.latents == str(tmp_path / "lat") and got.train.out == str(tmp_path / "runs")
    assert got.train.init_from == str(tmp_path / "sem")
    assert got.model.path == "bundled:shapes"
    # a relative sqlite store: Train workers opened another (empty) database and failed
    # with "Run with id=... not found"; a server URI or an absolute file stays as written
    rel = absolute_paths(cfg.replace(**{"tracking.uri": "sqlite:///runs/m.db"}))
    assert rel.tracking.uri == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    for uri in (rel.tracking.uri, "http://127.0.0.1:5000"):
        assert absolute_paths(cfg.replace(**{"tracking.uri": uri})).tracking.uri == uri
    hub = cfg.replace(**{"model.path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "data.latents": ""})
    hub = hub.replace(**{"data.input": "s3://bucket/videos"})
    kept = absolute_paths(hub)
    assert kept.model.path == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert kept.data.input == "s3://bucket/videos"


def test_concurrent_trials_must_leave_a_cpu_for_data_reads():
    """3 trials x 0.5 CPU, then 2 x (0.5 + the driver's 0.01), on 2 cores hung the ablation
    (the trials' 1-CPU read tasks never started): refused in one sentence; 2 x (0.49 +
    0.01) fits, and the shipped configs fit 2 cores."""
    cfg = _cfg("sweep.max_concurrent=3", "sweep.trial_cpus=0.5", "train.num_workers=1")
    with pytest.raises(ConfigError, match=r"hold 1\.53 of the cluster's 2 CPUs.*max_concurrent"):
        sw.check_room_for_data(cfg, 2.0)
    two = cfg.replace(**{"sweep.max_concurrent": 2})
    with pytest.raises(ConfigError, match=r"hold 1\.02 of the cluster's 2 CPUs"):
        sw.check_room_for_data(two, 2.0)
    sw.check_room_for_data(two.replace(**{"sweep.trial_cpus": 0.49}), 2.0)
    sw.check_room_for_data(cfg, 4.0)
    for name in ("sweep-shapes.yaml", "ablation-shapes.yaml"):
        sw.check_room_for_data(load_config(CONFIGS / name), 2.0)
