"""dcm.evaluation and `dcm evaluate`: structure, scoring against known generators, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_bundle

from dcm.config import ConfigError
from dcm.evaluation import evaluate, markdown_table, method_names
from dcm.shapes.grammar import all_captions
from dcm.shapes.render import render_caption
from pipelines.evaluate import main, read_prompts


class RenderingGenerator:
    """A stand-in VideoGenerator: ground-truth renders for 'good', noise for 'bad' methods."""

    fps = 8

    def __init__(self, good_teacher: bool) -> None:
        self.good_teacher = good_teacher
        self.calls: list[tuple] = []
        self.last_timings: dict[str, float] = {}

    def generate(self, prompts, steps=4, seed=0, teacher=False, teacher_steps=50):
        self.calls.append((tuple(prompts), steps, seed, teacher))
        rng = np.random.default_rng(seed)
        if teacher == self.good_teacher:
            out = np.stack([render_caption(p, seed + i) for i, p in enumerate(prompts)])
        else:
            out = rng.integers(0, 256, (len(prompts), 17, 64, 64, 3), dtype=np.uint8)
        nfe = 2 * teacher_steps if teacher else steps
        self.last_timings = {"nfe": float(nfe), "encode_s": 0.01, "denoise_s": 0.1 * nfe,
                             "decode_s": 0.2, "total_s": 0.21 + 0.1 * nfe}  # fmt: skip
        return out


def test_evaluate_scores_and_times_each_method(tmp_path):
    prompts = all_captions("heldout")[:3]
    gen = RenderingGenerator(good_teacher=True)
    res = evaluate(gen, prompts, seeds=[0, 1], steps_list=[2, 4], teacher_steps=50,
                   batch_size=2, sample_dir=tmp_path)  # fmt: skip
    assert list(res["methods"]) == method_names([2, 4], 50) == ["teacher@50", "dcm@2", "dcm@4"]
    teacher, dcm2 = res["methods"]["teacher@50"], res["methods"]["dcm@2"]
    assert teacher["summary"] >= 0.95 and dcm2["summary"] < 0.05
    assert teacher["nfe"] == 100 and dcm2["nfe"] == 2
    # timings are per batch in the generator and per video in the result (2 batches per seed)
    assert teacher["total_s"] == pytest.approx(4 * (0.21 + 10.0) / 6)
    assert teacher["seconds"] == pytest.approx(4 * (0.21 + 10.0))
    assert res["videos_per_method"] == 6 and len(gen.calls) == 3 * 4
    # the teacher and each student see the same seeds for the same prompts
    assert {c[2] for c in gen.calls if c[3]} == {c[2] for c in gen.calls if not c[3]}
    json.dumps(res)  # plain data only
    assert (tmp_path / "teacher_50.gif").is_file() and res["methods"]["dcm@4"]["samples"]
    table = markdown_table(res)
    assert "| teacher@50 |" in table and "| dcm@4 |" in table and "speed-up" in table


def test_evaluate_rejects_bad_requests():
    gen = RenderingGenerator(good_teacher=True)
    with pytest.raises(ConfigError, match="not in the shapes grammar"):
        evaluate(gen, ["a cat on a mat"], steps_list=[2])
    with pytest.raises(ConfigError, match="at least one prompt"):
        evaluate(gen, [], steps_list=[2])


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle moves left on a plain background\n\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"path": "x.mp4", "caption": "c1"}) + "\n")
    (tmp_path / "p.csv").write_text("path,caption\nx.mp4,c2\n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle moves left on a plain background"]
    assert read_prompts(tmp_path / "p.jsonl") == ["c1"]
    assert read_prompts(tmp_path / "p.csv") == ["c2"]
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.timeout(300)
def test_cli_on_a_real_tiny_bundle(tmp_path_factory, tmp_path, capsys):
    bundle = tiny_bundle(tmp_path_factory)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left on a plain background\n")
    out = tmp_path / "eval"
    argv = ["--model", str(bundle), "--steps", "2", "--teacher-steps", "2",
            "--prompts", str(prompts), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert list(res["methods"]) == ["teacher@2", "dcm@2"]
    assert res["methods"]["teacher@2"]["nfe"] == 4 and res["methods"]["dcm@2"]["nfe"] == 2
    assert 0.0 <= res["methods"]["dcm@2"]["summary"] <= 1.0
    assert (out / "metrics.md").read_text().count("|") > 20
    assert (out / "samples" / "dcm_2.gif").is_file()

    from pipelines.cli import main as dcm

    code = dcm(["evaluate", "--model", str(bundle), "--steps", "1", "--out", str(out)])
    assert code == 2 and "--steps" in capsys.readouterr().err
