"""The shipped distilled student ('bundled:shapes-dcm', built by `make student`).

It is a small artifact on the bundled teacher, `dcm generate` uses it when no model is given,
and it still scores what its README and eval.json say: the 2- and 4-step students are
re-run on the recorded prompts and seeds (same noise) through the real loading path.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from dcm.bundle import DEFAULT_STUDENT, resolve_model_path
from dcm.experts import ARTIFACT_JSON, read_artifact_meta

STUDENT = resolve_model_path(DEFAULT_STUDENT)
RECORD = json.loads((STUDENT / "eval.json").read_text())
README = (STUDENT / "README.md").read_text()
TOLERANCE = 0.01  # float rounding across CPUs; a broken student or sampler moves it by 0.1+


def test_student_is_a_small_portable_artifact_on_the_bundled_teacher():
    meta = read_artifact_meta(STUDENT)
    assert meta["bundle_path"] == "bundled:shapes" and meta["has_detail"]
    assert sum(f.stat().st_size for f in STUDENT.iterdir()) <= 10 * 2**20
    # nothing of the building machine: no absolute paths in the saved config
    assert not re.search(r'"/(work|tmp|home|root)/', (STUDENT / ARTIFACT_JSON).read_text())


def test_readme_table_is_the_recorded_evaluation():
    methods = RECORD["methods"]
    for name in ("teacher@50", "teacher@4", "untrained@4", "dcm@2", "dcm@4", "dcm@8"):
        assert f"{methods[name]['summary']:.3f}" in README, name
    assert len(RECORD["prompts"]) * len(RECORD["seeds"]) >= 48


def test_generate_uses_the_student_unless_a_model_or_teacher_is_asked_for(capsys):
    from pipelines.generate import main

    def resolved(*flags: str) -> dict:
        with pytest.raises(SystemExit) as exit_:
            main(["--prompt", "a red circle moves left", "--out", "x.mp4", "--dry-run", *flags])
        assert exit_.value.code == 0
        return yaml.safe_load(capsys.readouterr().out)

    got = resolved()
    assert got["model"]["path"] == DEFAULT_STUDENT
    # sizes come from the artifact's own training config
    assert (got["data"]["num_frames"], got["model"]["fps"]) == (17, 8)
    assert resolved("--teacher")["model"]["path"] == "bundled:shapes"
    assert resolved("--model", "bundled:shapes")["model"]["path"] == "bundled:shapes"
    assert resolved("--set", "model.path=bundled:shapes")["model"]["path"] == "bundled:shapes"


@pytest.mark.timeout(900)
def test_student_scores_held_out_captions_as_recorded():
    from dcm.evaluation import evaluate
    from dcm.generate import VideoGenerator

    gen = VideoGenerator.load(DEFAULT_STUDENT)
    got = evaluate(gen, RECORD["prompts"], RECORD["seeds"], (2, 4), teacher=False)["methods"]
    for name in ("dcm@2", "dcm@4"):
        want = RECORD["methods"][name]["summary"]
        assert got[name]["summary"] == pytest.approx(want, abs=TOLERANCE), name
        # and distillation added something: the recorded untrained start is lower
        assert want > RECORD["methods"][name.replace("dcm", "untrained")]["summary"]


def test_student_build_takes_overrides_and_its_readme_states_them(tmp_path):
    """`python -m pipelines.student --set ...` trains with the overrides and says so."""
    from pipelines.student import EVAL_STEPS, build_config, readme

    extra = ["method.grid_points=20", "method.split=13", "train.steps_detail=300"]
    cfg = build_config(tmp_path, extra)
    assert (cfg.method.grid_points, cfg.method.split, cfg.train.steps_detail) == (20, 13, 300)
    assert cfg.train.steps_semantic == 1500  # the build's own setting, not overridden

    names = [f"{m}@{n}" for m in ("teacher", "untrained", "dcm") for n in EVAL_STEPS]
    per_video = {n: [{"summary": 0.5}, {"summary": 0.25}] for n in [*names, "teacher@50"]}
    methods = {n: {"summary": 0.4, "summary_std": 0.1} for n in per_video}
    result = {"methods": methods, "per_video": per_video, "seeds": [0, 1], "videos_per_method": 2}
    text = readme(result, {"distill": 60.0}, cfg, extra)
    assert "grid N = 20 split at b = 13" in text
    assert "1500 semantic + 300 detail steps" in text
    assert "| student / teacher@50 | 1.000 x |" in text  # three decimals, never a rounded floor
    assert "validation every 250 steps on 8 training captions" in text
    assert "`sample.renoise=1`" in text  # the build's sampler, saved in the artifact
    plain = build_config(tmp_path, ["sample.renoise=0"])
    assert "with plain Euler steps" in readme(result, {"distill": 60.0}, plain)
    assert "--set method.grid_points=20 --set method.split=13 --set train.steps_detail=300" in text
    assert "make student" in readme(result, {"distill": 60.0}, cfg)  # no overrides: make student
