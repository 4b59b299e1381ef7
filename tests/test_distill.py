"""Distillation end to end on 2 CPU workers: `both` stages through Ray Train + DeepSpeed.

One module-scoped `both` run (2 steps per stage, a checkpoint every step, best 1 kept) on
shapes clips that went through the real ingest; several tests check its outputs: the
artifacts (loadable without DeepSpeed), the detail stage's start from the semantic
checkpoint, the checkpoint folders, MLflow, validation from step 0 and the choice of the
best checkpoint by it, and that a re-run skips finished stages. The run takes the
non-default teacher-path targets; the other Ray tests (resume, sweep, demo) the bootstrap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "shapes-tiny.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def shapes_latents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny bundle, ingest folder of 8 shapes clips), built once per test session."""
    base = tmp_path_factory.getbasetemp() / "distill_data"
    bundle, latents = base / "bundle", base / "latents"
    if not (latents / "manifest.json").is_file():
        from dcm.shapes.dataset import write_dataset
        from dcm.shapes.grammar import VOCAB
        from dcm.tiny import build_tiny_bundle
        from pipelines.ingest import run_ingest

        build_tiny_bundle(bundle, vocab=VOCAB)
        manifest = write_dataset(base / "videos", 8, seed=3)
        run_ingest(
            load_config(
                None,
                "shapes-tiny",
                [f"model.path={bundle}", f"data.input={manifest}", f"ingest.out={latents}"],
            )
        )
    return bundle, latents


def distill_config(bundle: Path, latents: Path, out: Path, *extra: str):
    """The CI config (pipelines/configs/shapes-tiny.yaml) pointed at test data."""
    overrides = [f"model.path={bundle}", f"data.latents={latents}", f"train.out={out}", *extra]
    return load_config(CONFIG, None, overrides)


@pytest.fixture(scope="module")
def both_run(ray_cluster, tmp_path_factory):
    from pipelines.distill import run_distill

    bundle, latents = shapes_latents(tmp_path_factory)
    out = tmp_path_factory.mktemp("distill_runs")
    videos = latents.parent / "videos" / "captions.jsonl"  # the raw clips of those latents
    cfg = distill_config(
        bundle, latents, out,
        "train.steps_semantic=2", "train.steps_detail=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=1", "train.run_name=both1", "tracking.register_as=dcm-both1",
        # online mode: both stages read the raw mp4s through ingest's stream (no parquet)
        "data.mode=online", f"data.input={videos}", "data.latents=",
        # ZeRO-3 (each rank holds a partition; the artifact is gathered) with accumulation
        "train.zero_stage=3", "train.grad_accum=2",
        # both experts regress on the teacher's own path (METHOD.md section 4, step 4'),
        # the DetE from the states sampling hands it (section 6, detail_inputs) under ZeRO-3
        "method.semantic_target=teacher", "method.detail_target=teacher",
        "method.detail_inputs=semantic",
        "train.lr_decay=cosine",  # DeepSpeed steps the client scheduler under ZeRO-3 + accum
    )  # fmt: skip
    return cfg, run_distill(cfg)


@pytest.mark.timeout(420)
def test_both_stages_export_loadable_artifacts(both_run):
    from dcm.experts import DualExpert
    from dcm.generate import VideoGenerator

    cfg, result = both_run
    sem, det = result.stages["semantic"], result.stages["detail"]
    assert result.stage == "both" and result.artifact_dir == det.artifact_dir
    semantic = DualExpert.load_artifact(sem.artifact_dir)
    detail = DualExpert.load_artifact(det.artifact_dir)
    assert not semantic.has_detail and detail.has_detail
    # Stage 2 starts from the stage-1 checkpoint and freezes the base: SemE is unchanged.
    sem_state, det_state = semantic.state_dict(), detail.base.state_dict()
    base_keys = [k for k in sem_state if k.startswith("base.")]
    assert base_keys
    for key in base_keys:
        name = key[len("base.") :]
        twin = det_state.get(name, det_state.get(name.replace(".weight", ".base_layer.weight")))
        if twin is None:
            twin = det_state[name.replace(".bias", ".base_layer.bias")]
        torch.testing.assert_close(sem_state[key], twin, rtol=0, atol=0)
    # Stage 2 trained its detail expert: LoRA B is no longer zero.
    lora_b = [v for k, v in detail.state_dict().items() if ".lora_B." in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)
    # The artifact is what dcm's generator (and Serve) load, without DeepSpeed.
    gen = VideoGenerator.load(str(det.artifact_dir))
    frames = gen.generate(["a red circle moves left on a plain background"], steps=2, seed=0)
    assert frames.dtype == np.uint8 and frames.shape == (1, 17, 64, 64, 3)


@pytest.mark.timeout(600)
def test_the_distilled_model_leaves_the_platform(both_run, tmp_path, monkeypatch):
    """Export both formats; stock WanPipeline (no dcm import) matches dcm generate; the
    run registered its model, which loads back by its models:/ URI."""
    import mlflow.pyfunc
    from test_export import lora_gap, stock_matches

    from pipelines.distill import run_dir
    from pipelines.export import main as export_main
    from pipelines.tracking import tracking_uri

    cfg, result = both_run
    art = result.artifact_dir
    for fmt in ("diffusers", "lora"):
        assert (
            export_main(["--model", str(art), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        )
    stock_matches(art, tmp_path / "diffusers", 4, 0, tmp_path)
    assert lora_gap(art, tmp_path / "diffusers", tmp_path / "lora")[0] <= 1e-5
    assert result.registered["uri"] == "models:/dcm-both1/1"
    assert result.registered["run_id"] == result.mlflow_run_id  # the parent run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(cfg, run_dir(cfg)))
    monkeypatch.setenv("DCM_MODEL_CACHE", str(tmp_path / "cache"))
    model = mlflow.pyfunc.load_model("models:/dcm-both1/1")
    videos = model.predict(["a red circle moves left"], params={"steps": 2, "num_frames": 5})
    assert videos.dtype == np.uint8 and videos.shape == (1, 5, 64, 64, 3)


@pytest.mark.timeout(420)
def test_checkpoints_hold_deepspeed_state_artifact_and_best_k(both_run):
    cfg, result = both_run
    for stage, res in result.stages.items():
        # the result is the best checkpoint by val/score (ties: the later one)
        assert res.metrics["step"] in (1.0, 2.0) and res.metrics["resumed_from"] == 0.0
        assert "val/score" in res.metrics and 0.0 <= res.metrics["val/score"] <= 1.0
        folder = Path(res.checkpoint.path)
        state = json.loads((folder / "state.json").read_text())
        assert state["stage"] == stage and state["step"] == res.metrics["step"]
        assert state["metrics"]["val/score"] == res.metrics["val/score"]
        # ZeRO-3: one parameter partition, one optimiser shard and one RNG state per worker
        assert len(list((folder / "ds").glob("zero_pp_rank_*_model_states.pt"))) == 2
        assert len(list((folder / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2
        assert sorted(p.name for p in (folder / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
        assert (folder / "artifact" / "experts.safetensors").is_file()
        # the discriminator and its AdamW, saved once (identical on every rank), stage 2 only
        replicated = folder / "replicated.pt"
        assert replicated.is_file() == (stage == "detail")
        if stage == "detail":
            assert set(torch.load(replicated, weights_only=False)) == {"disc", "disc_opt"}
        # keep_checkpoints=1: the best one plus, if different, the latest one remain
        kept = sorted(p for p in folder.parent.glob("checkpoint_*") if p.is_dir())
        assert 1 <= len(kept) <= 2
        steps = [json.loads((k / "state.json").read_text())["step"] for k in kept]
        assert max(steps) == 2  # the latest checkpoint (the end of the stage) is kept
        record = json.loads((folder.parent / "result.json").read_text())
        assert record["checkpoint"] == res.checkpoint.path


@pytest.mark.timeout(420)
def test_mlflow_holds_nested_runs_with_metrics_and_artifacts(both_run):
    from mlflow import MlflowClient

    from pipelines.distill import run_dir

    cfg, result = both_run
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir(cfg)) / 'mlflow.db'}")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.tags["dcm_stage"] == "both"
    expected = {
        "semantic": ["train/loss", "train/cd", "train/tc"],
        "detail": ["train/loss_g", "train/loss_d", "train/fm", "train/disc_grad_norm"],
    }
    for stage, keys in expected.items():
        run = client.get_run(result.stages[stage].mlflow_run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["train.num_workers"] == "2"
        assert run.data.params[f"method.{stage}_target"] == "teacher"  # the fixture's option
        assert run.info.status == "FINISHED"
        common = ["train/grad_norm", "train/lr", "perf/samples_per_s", "perf/peak_mem_mb"]
        for key in [*keys, *common, "val/score"]:
            assert key in run.data.metrics, (stage, key)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, keys[0])]
        assert sorted(steps) == [1, 2]
        # train.lr_decay=cosine over 2 steps: the rate after step 1 is half, after step 2 zero
        rates = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
        base = cfg.train.lr_semantic if stage == "semantic" else cfg.train.lr_detail
        assert rates[1] == pytest.approx(base / 2) and rates[2] == pytest.approx(0.0, abs=1e-12)
        arts = [f.path for f in client.list_artifacts(run.info.run_id, "validation/step_000002")]
        assert any(p.endswith(".mp4") for p in arts) and any(p.endswith(".gif") for p in arts)
        names = [f.path for f in client.list_artifacts(run.info.run_id, "artifact")]
        assert "artifact/experts.safetensors" in names and "artifact/dcm_artifact.json" in names


@pytest.mark.timeout(420)
def test_quality_is_logged_from_step0_and_the_best_checkpoint_is_exported(both_run):
    """Each stage validates the untrained student (step 0) and every checkpoint; the
    exported checkpoint is the best val/score, and the run is tagged with how it was chosen
    and whether the final student beats step 0."""
    from mlflow import MlflowClient

    from pipelines.distill import run_dir

    cfg, result = both_run
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir(cfg)) / 'mlflow.db'}")
    for stage, res in result.stages.items():
        run_id = res.mlflow_run_id
        scores = {m.step: m.value for m in client.get_metric_history(run_id, "val/score")}
        assert sorted(scores) == [0, 1, 2], stage  # the curve starts at the untrained student
        adherence = client.get_metric_history(run_id, "val/adherence")  # shapes metrics
        assert {m.step for m in adherence} == {0, 1, 2}
        chosen = max((1, 2), key=lambda s: (scores[s], s))  # ties: the later checkpoint
        assert int(res.metrics["step"]) == chosen
        state = json.loads((res.artifact_dir.parent / "state.json").read_text())
        assert state["step"] == chosen and (res.artifact_dir / "dcm_artifact.json").is_file()
        tags = client.get_run(run_id).data.tags
        assert tags["dcm_selection_metric"] == "val/score" and tags["dcm_best_step"] == str(chosen)
        assert tags["dcm_val_score"].startswith("shapes summary")
        beats = scores[2] > scores[0]
        assert res.beats_step0 is beats and tags["dcm_beats_step0"] == str(beats).lower()
        assert ("dcm_quality_flag" in tags) is (not beats)
        record = json.loads((Path(run_dir(cfg)) / stage / "result.json").read_text())
        assert record["beats_step0"] is beats
    assert result.beats_step0 is result.stages["detail"].beats_step0


@pytest.mark.timeout(420)
def test_rerun_of_a_finished_run_skips_its_stages(both_run):
    from pipelines.distill import run_distill

    cfg, result = both_run
    again = run_distill(cfg)
    assert again.artifact_dir == result.artifact_dir
    assert again.stages["semantic"].checkpoint.path == result.stages["semantic"].checkpoint.path


def test_cli_dry_run_and_bad_stage_input(tmp_path, capsys):
    from pipelines.args import run_main
    from pipelines.distill import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), "--stage", "semantic", "--out", str(tmp_path), "--dry-run"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "stage: semantic" in printed and f"out: {tmp_path}" in printed
    # detail alone without a semantic artifact: one sentence, exit 2, no traceback
    code = run_main(main, ["--config", str(CONFIG), "--stage", "detail", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "train.init_from" in err and "Traceback" not in err
    # ... or with a folder that is not an artifact: named, before Ray starts
    args = ["--config", str(CONFIG), "--stage", "detail", "--out", str(tmp_path)]
    code = run_main(main, [*args, "--set", f"train.init_from={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"train.init_from='{tmp_path}'" in err and "dcm_artifact.json" in err
    assert "Traceback" not in err


def _poisoned_copy(latents: Path, dest: Path) -> Path:
    """The ingest folder with NaN latents in its last clip."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(latents, dest)
    for shard in dest.glob("shard-*.parquet"):
        table = pq.read_table(shard)
        rows = table.column("latents").to_pylist()
        bad = rows[:-1] + [[float("nan")] * len(rows[-1])]
        col = pa.array(bad, type=table.schema.field("latents").type)
        pq.write_table(
            table.set_column(table.schema.get_field_index("latents"), "latents", col), shard
        )
    return dest


@pytest.mark.timeout(420)
def test_a_diverging_stage_stops_with_one_sentence_and_keeps_its_checkpoints(
    ray_cluster, tmp_path_factory, capsys
):
    """Latents that turn the loss NaN (the last clip of a copied ingest folder made NaN:
    what a broken encode or an overflowing learning rate leaves). The workers stop at the
    first log step that sees it (no checkpoint of those weights, no NaN metric for Tune's
    ASHA to ignore); `dcm distill` prints one sentence naming the stage, the step, the
    setting and the data, exits 2; the checkpoints before it stay and the stage's MLflow
    run ends FAILED."""
    from mlflow import MlflowClient

    from pipelines.args import run_main
    from pipelines.distill import main

    bundle, latents = shapes_latents(tmp_path_factory)
    out = tmp_path_factory.mktemp("diverge")
    poisoned = _poisoned_copy(latents, out / "latents")
    argv = [
        "--config", str(CONFIG), "--stage", "semantic", "--out", str(out),
        "--set", f"model.path={bundle}", "--set", f"data.latents={poisoned}",
        "--set", "train.run_name=nan", "--set", "train.steps_semantic=4",
        "--set", "train.lr_semantic=5e-5", "--set", "train.checkpoint_every=1",
        "--set", "train.keep_checkpoints=8", "--set", "train.log_every=1",
        "--set", "train.val_prompts=1", "--set", "sample.seeds=[0]",
    ]  # fmt: skip
    capsys.readouterr()
    code = run_main(main, argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    line = errors[0]
    assert "stage 'semantic' diverged at step" in line and "train.lr_semantic=5e-05" in line
    assert "train/loss" in line and "data.latents" in line
    step = int(line.split("diverged at step ")[1].split()[0])
    assert 1 <= step <= 4, line
    assert not (out / "nan" / "semantic" / "result.json").exists()  # not a finished stage
    kept = sorted((out / "nan" / "semantic").glob("checkpoint_*[0-9]"))
    assert len(kept) == step - 1  # one per step before it, none of the NaN weights
    assert (str(out / "nan" / "semantic") in line) is bool(kept)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'nan' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs if r.data.tags.get("dcm_stage") == "semantic"] == ["FAILED"]
