"""Evaluation on any prompts against the teacher's own sampler: metrics, tables, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bundle

from dcm import video_metrics as vm
from dcm.backbones.base import Cond
from dcm.config import ConfigError, load_config
from dcm.evaluation import evaluate, markdown_table, method_names
from dcm.shapes.grammar import all_captions
from dcm.shapes.render import render_caption
from dcm.teacher_sampler import TeacherSampler
from pipelines.evaluate import main, read_prompts

FREE_TEXT = ["a dog runs along a beach at sunset", "timelapse of clouds over mountains"]


class RenderingGenerator:
    """A stand-in VideoGenerator: ground-truth renders for the teacher, noise for DCM."""

    fps = 8

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.last_timings: dict[str, float] = {}

    def teacher_description(self, steps: int) -> str:
        return f"teacher, Stand-in, {steps} steps + CFG w=5"

    def generate(self, prompts, steps=4, seed=0, teacher=False, teacher_steps=50):
        self.calls.append((tuple(prompts), steps, seed, teacher, teacher_steps))
        rng = np.random.default_rng(seed + steps)
        if teacher:
            out = np.stack([render_caption(p, seed + i) for i, p in enumerate(prompts)])
        else:
            out = rng.integers(0, 256, (len(prompts), 17, 64, 64, 3), dtype=np.uint8)
        nfe = 2 * teacher_steps if teacher else steps
        self.last_timings = {"nfe": float(nfe), "encode_s": 0.01, "denoise_s": 0.1 * nfe,
                             "decode_s": 0.2, "total_s": 0.21 + 0.1 * nfe}  # fmt: skip
        return out


def test_untrained_student_is_scored_on_the_same_prompts_and_noise(tmp_path):
    prompts = all_captions("heldout")[:2]
    gen, start = RenderingGenerator(), RenderingGenerator()
    res = evaluate(gen, prompts, seeds=[3], steps_list=[2], teacher_steps=50, untrained=start)
    assert list(res["methods"]) == ["teacher@50", "teacher@2", "dcm@2", "untrained@2"]
    # the untrained generator made exactly its own rows, with the distilled one's seed
    assert [c[1:] for c in start.calls] == [(2, 300_009, False, 50)]
    assert {c[2] for c in gen.calls} == {300_009}
    row = res["methods"]["untrained@2"]
    assert row["sampler"].startswith("untrained student") and "psnr" in row


def test_other_students_get_their_own_rows_from_the_same_noise():
    prompts = all_captions("heldout")[:2]
    gen, start, shipped = RenderingGenerator(), RenderingGenerator(), RenderingGenerator()
    shipped.source = "artifact"
    res = evaluate(gen, prompts, seeds=[3], steps_list=[2, 4], teacher_steps=50,
                   untrained=start, others={"bundled": shipped})  # fmt: skip
    assert list(res["methods"])[-4:] == ["untrained@2", "untrained@4", "bundled@2", "bundled@4"]
    assert [c[1:3] for c in shipped.calls] == [(2, 300_009), (4, 300_009)]
    assert "DCM experts (artifact)" in res["methods"]["bundled@4"]["sampler"]
    with pytest.raises(ConfigError, match="cannot be labelled 'dcm'"):
        evaluate(gen, prompts, steps_list=[2], others={"dcm": shipped})


def test_untrained_generator_is_the_teacher_in_the_dcm_sampler():
    from dcm.generate import VideoGenerator

    gen = VideoGenerator.load("bundled:shapes")
    start = gen.untrained()
    assert start.source == "untrained" and start.method == gen.method
    assert start.student.base is gen.teacher and not start.student.has_detail
    a = start.generate([all_captions("heldout")[0]], steps=2, seed=5, num_frames=5)
    b = gen.generate([all_captions("heldout")[0]], steps=2, seed=5, num_frames=5)
    np.testing.assert_array_equal(a, b)  # a bundle's own student is the untrained one


def test_evaluate_scores_fidelity_quality_and_time(tmp_path):
    prompts = all_captions("heldout")[:3]
    gen = RenderingGenerator()
    res = evaluate(gen, prompts, seeds=[0, 1], steps_list=[2, 4], teacher_steps=50,
                   batch_size=2, sample_dir=tmp_path)  # fmt: skip
    names = ["teacher@50", "teacher@2", "teacher@4", "dcm@2", "dcm@4"]
    assert list(res["methods"]) == method_names([2, 4], 50) == names
    m = res["methods"]
    assert res["reference"] == "teacher@50" and res["shapes"]
    # the stand-in teacher renders the same video at any step count: perfect fidelity
    assert m["teacher@2"]["psnr"] == vm.PSNR_CAP and m["teacher@2"]["ssim"] == pytest.approx(1.0)
    assert m["dcm@2"]["psnr"] < 15 and m["dcm@2"]["ssim"] < 0.2
    assert "psnr" not in m["teacher@50"]  # the reference is not compared with itself
    assert m["teacher@50"]["summary"] >= 0.95 and m["dcm@2"]["summary"] < 0.05
    assert m["dcm@2"]["temporal_flicker"] < m["teacher@50"]["temporal_flicker"]
    assert m["teacher@50"]["nfe"] == 100 and m["teacher@4"]["nfe"] == 8 and m["dcm@2"]["nfe"] == 2
    # timings are per batch in the generator and per video in the result (2 batches per seed)
    assert m["teacher@50"]["total_s"] == pytest.approx(4 * (0.21 + 10.0) / 6)
    assert m["teacher@50"]["seconds"] == pytest.approx(4 * (0.21 + 10.0))
    assert res["videos_per_method"] == 6 and len(gen.calls) == 5 * 4
    # every method sees the same seeds for the same prompts
    assert len({c[2] for c in gen.calls}) == 4 and len(res["per_video"]["dcm@4"]) == 6
    assert m["teacher@4"]["sampler"] == "teacher, Stand-in, 4 steps + CFG w=5"
    json.dumps(res)  # plain data only
    assert (tmp_path / "teacher_50.gif").is_file() and m["dcm@4"]["samples"]
    table = markdown_table(res)
    assert "| teacher@50 |" in table and "| dcm@4 |" in table and "PSNR dB" in table
    assert "`teacher@50`: teacher, Stand-in, 50 steps + CFG w=5" in table and "summary" in table


def test_evaluate_takes_free_text_prompts():
    gen = RenderingGenerator()
    gen.generate = lambda prompts, **kw: RenderingGenerator.generate(  # noqa: E731
        gen, ["a red circle moves left on a plain background"] * len(prompts), **kw
    )
    res = evaluate(gen, FREE_TEXT, steps_list=[2], teacher_steps=3, teacher_at_steps=False)
    assert list(res["methods"]) == ["teacher@3", "dcm@2"] and not res["shapes"]
    assert "summary" not in res["methods"]["dcm@2"] and "psnr" in res["methods"]["dcm@2"]
    with pytest.raises(ConfigError, match="at least one prompt"):
        evaluate(gen, [], steps_list=[2])


def test_video_metrics_on_known_videos():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5, 32, 40, 3), dtype=np.uint8)
    assert vm.psnr(video, video) == vm.PSNR_CAP and vm.ssim(video, video) == pytest.approx(1.0)
    noisy = np.clip(video.astype(int) + rng.integers(-20, 21, video.shape), 0, 255).astype(np.uint8)
    assert 20 < vm.psnr(noisy, video) < 30 and vm.ssim(noisy, video) < 0.99
    still = np.repeat(video[:1], 5, axis=0)
    assert vm.temporal_flicker(still) == 1.0 and vm.temporal_flicker(video) < 0.7
    fade = np.stack([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)])  # linear in time
    assert vm.motion_smoothness(fade) == pytest.approx(1.0) and vm.motion_smoothness(video) < 0.8
    flat = np.full_like(video, 128)
    assert vm.edge_sharpness(flat) == 0.0 < vm.edge_sharpness(video)


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a dog runs on a beach\n\n  clouds over hills \n")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "p1", "id": 3}) + "\n" + json.dumps({"caption": "c1"}) + "\n"
    )
    (tmp_path / "p.csv").write_text("path,caption\nx.mp4,c2\n")
    assert read_prompts(tmp_path / "p.txt") == ["a dog runs on a beach", "clouds over hills"]
    assert read_prompts(tmp_path / "p.jsonl") == ["p1", "c1"]
    assert read_prompts(tmp_path / "p.csv") == ["c2"]
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(
        ConfigError, match="nofield.jsonl:1 needs a non-empty string field 'prompt'"
    ):
        read_prompts(tmp_path / "nofield.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------- the teacher's own sampler
def _stock_wan_folder(tmp_path_factory, tmp_path: Path) -> Path:
    """A tiny random Wan folder whose scheduler/ is the stock Wan2.1-T2V-1.3B-Diffusers one
    (UniPC multistep, flow sigmas, flow_shift 3, flow prediction)."""
    from diffusers import UniPCMultistepScheduler

    folder = tmp_path / "wan_stock"
    shutil.copytree(tiny_bundle(tmp_path_factory), folder)
    shutil.rmtree(folder / "scheduler")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
        solver_order=2, solver_type="bh2", final_sigmas_type="zero", num_train_timesteps=1000,
    ).save_pretrained(folder / "scheduler")  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


class TimeRecorder(torch.nn.Module):
    """Wraps the teacher and records the time input of every network evaluation."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.times = inner, []

    def forward(self, x, t, cond):
        self.times.append(float(t[0]))
        return self.inner(x, t, cond)


@pytest.mark.timeout(300)
def test_teacher_baseline_follows_the_folders_scheduler(tmp_path_factory, tmp_path, capsys):
    from diffusers import UniPCMultistepScheduler

    from dcm.generate import VideoGenerator
    from dcm.schedule import Schedule

    folder = _stock_wan_folder(tmp_path_factory, tmp_path)
    stock = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    stock.set_timesteps(50)
    sampler = TeacherSampler.from_bundle(folder)
    assert sampler.sigmas(50) == [float(s) for s in stock.sigmas]
    assert sampler.timesteps(50) == [float(t) for t in stock.timesteps]
    assert not sampler.plain_euler(50)
    method = load_config(preset="wan2.1-t2v-1.3b").method
    assert (
        sampler.describe(50, method) == "teacher, UniPCMultistep flow_shift 3.0, 50 steps + CFG w=5"
    )
    # the distillation grid (shift 17) that the baseline used before is a different schedule
    grid = Schedule.from_config(method).teacher_sigmas(50)
    ours = sampler.sigmas(50)
    assert sum(s >= 0.975 for s in grid) == 16 and sum(s >= 0.975 for s in ours) == 4
    assert ours[-2] < 0.1 < 0.25 < grid[-2]  # the grid's last step jumps from 0.26 to 0

    # generate --teacher runs exactly the folder's timesteps (two passes each: CFG)
    gen = VideoGenerator.load(folder)
    gen._teacher = TimeRecorder(gen.teacher)
    frames = gen.generate(["a dog runs along a beach"], teacher=True, teacher_steps=4)
    stock.set_timesteps(4)
    assert gen._teacher.times == [float(t) for t in stock.timesteps for _ in range(2)]
    assert frames.shape[0] == 1 and gen.last_timings["nfe"] == 8
    assert gen.teacher_description(4).startswith("teacher, UniPCMultistep flow_shift 3.0, 4 steps")
    from pipelines.generate import main as generate_cli

    argv = ["--model", str(folder), "--prompt", "a dog", "--teacher", "--teacher-steps", "2",
            "--frames", "5", "--out", str(tmp_path / "t.mp4")]  # fmt: skip
    assert generate_cli(argv) == 0
    w = load_config().method.cfg_scale  # no --preset: the default preset's guidance
    assert (
        f"teacher, UniPCMultistep flow_shift 3.0, 2 steps + CFG w={w:g}" in capsys.readouterr().out
    )

    # the folder's UniPC steps are what diffusers' own loop computes from the same velocities
    torch.manual_seed(0)
    noise = torch.randn(1, 2, 2, 4, 4)
    fake = lambda x, t, c: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1, 1) / 1000  # noqa: E731
    embedded = method.__class__(guidance="embedded")
    got = sampler.sample(fake, noise, Cond(text=torch.zeros(1, 1, 1)), None, 5, embedded)
    ref = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    ref.set_timesteps(5)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(fake(x, torch.full((1,), float(t)), None), t, x).prev_sample
    torch.testing.assert_close(got, x)


def test_flow_match_euler_folder_runs_through_dcm_sampler(tmp_path_factory, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = tmp_path / "euler"
    (folder / "scheduler").mkdir(parents=True)
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(folder / "scheduler")
    sampler = TeacherSampler.from_bundle(folder)
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    ref.set_timesteps(7)
    assert sampler.sigmas(7) == [float(s) for s in ref.sigmas] and sampler.plain_euler(7)
    method = load_config().method.__class__(guidance="embedded")
    fake = lambda x, t, c: torch.sin(x) + t.view(-1, 1, 1, 1, 1) / 1000  # noqa: E731
    noise = torch.randn(2, 2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    got = sampler.sample(fake, noise, Cond(text=torch.zeros(2, 1, 1)), None, 7, method)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(fake(x, t.expand(2), None), t, x).prev_sample
    torch.testing.assert_close(got, x)
    # no scheduler/: Euler on the distillation grid, and the description says so
    from dcm.schedule import Schedule

    bare = tmp_path / "bare"
    bare.mkdir()
    grid = Schedule.from_config(load_config().method)
    fallback = TeacherSampler.from_bundle(bare, grid)
    assert fallback.sigmas(50) == grid.teacher_sigmas(50)
    assert "distillation grid" in fallback.describe(50, load_config().method)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "NoSuch"}')
    with pytest.raises(ConfigError, match="NoSuch' is not a diffusers scheduler"):
        TeacherSampler.from_bundle(folder)


# ---------------------------------------------------------------- the CLI on real tiny models
def _tiny_clip(folder: Path) -> Path:
    """A random tiny transformers CLIP model with the word-level test tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from dcm.tiny import build_tokenizer

    tok = build_tokenizer(folder)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                          pad_token_id=0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def _random_lpips(file: Path) -> Path:
    """Random weights with the names of torchvision's AlexNet + the lpips package's heads."""
    torch.manual_seed(0)
    state = {}
    for n, (i, o, k, _, _) in enumerate(vm._ALEX):
        idx = vm._ALEX_INDEX[n]
        state[f"features.{idx}.weight"] = torch.randn(o, i, k, k) * (2.0 / (i * k * k)) ** 0.5
        state[f"features.{idx}.bias"] = torch.zeros(o)
        state[f"lin{n}.model.1.weight"] = torch.rand(1, o, 1, 1)
    torch.save(state, file)
    return file


@pytest.mark.timeout(600)
def test_cli_free_text_prompts_tiny_wan_and_tiny_clip(tmp_path_factory, tmp_path, capsys):
    from mlflow import MlflowClient

    folder = _stock_wan_folder(tmp_path_factory, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in FREE_TEXT))
    out = tmp_path / "eval"
    clip, lpips = _tiny_clip(tmp_path / "clip"), _random_lpips(tmp_path / "lpips.pth")
    argv = ["--model", str(folder), "--steps", "2", "--teacher-steps", "3", "--prompts",
            str(prompts), "--clip", str(clip), "--lpips", str(lpips), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert list(res["methods"]) == ["teacher@3", "teacher@2", "dcm@2"] and not res["shapes"]
    t3, t2, d2 = (res["methods"][k] for k in ("teacher@3", "teacher@2", "dcm@2"))
    w = load_config().method.cfg_scale  # no --preset: the default preset's guidance
    assert t3["sampler"] == f"teacher, UniPCMultistep flow_shift 3.0, 3 steps + CFG w={w:g}"
    assert t3["nfe"] == 6 and t2["nfe"] == 4 and d2["nfe"] == 2
    for key in ("psnr", "ssim", "lpips", "clip", "temporal_flicker", "motion_smoothness"):
        assert np.isfinite(d2[key]) and np.isfinite(t2[key]), key
    assert "psnr" not in t3 and "clip" in t3 and 0 < d2["psnr"] < vm.PSNR_CAP and d2["lpips"] > 0
    assert len(res["per_video"]["dcm@2"]) == 2 and res["metrics"][:4] == [
        "psnr",
        "ssim",
        "lpips",
        "clip",
    ]
    table = (out / "metrics.md").read_text()
    assert "| dcm@2 |" in table and "CLIP-T" in table and "LPIPS" in table
    assert "UniPCMultistep flow_shift 3.0, 3 steps" in table
    # the same tables in MLflow (sqlite store in --out)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.metrics["dcm_2/psnr"] == pytest.approx(d2["psnr"])
    assert run.data.params["sampler/teacher_3"] == t3["sampler"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "metrics.json",
        "metrics.md",
    }

    from pipelines.cli import main as dcm

    code = dcm(["evaluate", "--model", str(folder), "--steps", "1", "--out", str(out)])
    assert code == 2 and "--steps" in capsys.readouterr().err
    code = dcm(["evaluate", "--model", str(folder), "--vbench", "subject_consistency",
                "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "vbench" in err[0]


def test_demo_report_names_samplers_and_plots_quality_from_step0(tmp_path):
    from mlflow import MlflowClient

    from pipelines.report import write_report

    res = evaluate(
        RenderingGenerator(), all_captions("heldout")[:2], steps_list=[2], teacher_steps=4
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("x"))
    for step, score in ((0, 0.2), (1, 0.3), (2, 0.25)):
        client.log_metric(run.info.run_id, "val/score", score, step=step)
    state = {
        "evaluate": {"result": {"results": res, "gifs": []}},
        "distill": {
            "result": {"tracking_uri": uri, "stages": {"semantic": {"run_id": run.info.run_id}}}
        },
    }
    paths = write_report(tmp_path, state)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "Reference `teacher@4`: teacher, Stand-in, 4 steps + CFG w=5" in md
    assert "- `teacher@2`: teacher, Stand-in, 2 steps + CFG w=5" in md and "| psnr |" in md
    assert "| teacher@4 | reference |" in md and "quality_curves.png" in md
    assert paths["quality_curves"].is_file() and "Stand-in, 4 steps" in page


def test_demo_speed_table_is_relative_to_the_reference_and_ordered_by_steps():
    """Speed-up is against the reference (teacher@50), not the first teacher row, and step
    counts sort as numbers."""
    from pipelines.report import speed_table

    methods = {
        name: {"nfe": nfe, "total_s": secs}
        for name, nfe, secs in (
            ("dcm@4", 4, 0.5), ("teacher@50", 100, 5.0), ("teacher@2", 4, 0.4),
            ("teacher@8", 16, 1.0), ("dcm@2", 2, 0.25),
        )
    }  # fmt: skip
    head, body = speed_table({"methods": methods, "reference": "teacher@50"})
    assert [row[0] for row in body] == ["teacher@2", "teacher@8", "teacher@50", "dcm@2", "dcm@4"]
    speed = {row[0]: row[head.index("speed-up")] for row in body}
    assert speed == {"teacher@2": "12.5x", "teacher@8": "5.0x", "teacher@50": "1.0x",
                     "dcm@2": "20.0x", "dcm@4": "10.0x"}  # fmt: skip


def test_the_sampler_description_names_the_renoise_share():
    from types import SimpleNamespace

    from dcm.evaluation import _describe

    cfg = load_config(preset="shapes-tiny", overrides=["sample.renoise=1.0"])
    gen = SimpleNamespace(cfg=cfg, method=cfg.method, source="artifact")
    assert _describe(gen, "dcm@4", 4).endswith(
        "4 steps, detail steps re-noised (renoise 1), no CFG"
    )
    assert "re-noised" in _describe(gen, "untrained@4", 4)
    assert "re-noised" not in _describe(gen, "dcm@2", 2)  # one DetE step, ending at 0
    plain = SimpleNamespace(cfg=load_config(preset="shapes-tiny"), method=cfg.method)
    assert "re-noised" not in _describe(plain, "dcm@4", 4)
