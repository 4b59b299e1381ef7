"""`dcm export`: stock diffusers loads the export and samples what `dcm generate` samples.

The shapes teacher (bundled:shapes) with a detail expert moved away from the semantic one
(perturbed LoRA and copies, as training would) is saved as an artifact, exported, and run
by stock ``WanPipeline`` in a fresh process that never imports ``dcm``; its latents must
equal ``VideoGenerator``'s (``dcm generate``) within 1e-4 in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.config import DETAIL, SEMANTIC, ConfigError, LoraConfig, load_config
from dcm.experts import DualExpert
from dcm.export import (
    COPIES_FILE,
    LORA_FILE,
    SAMPLING_JSON,
    boundary_ratio,
    export_diffusers,
    pipeline_route,
)
from dcm.generate import VideoGenerator, encoder_prompts
from dcm.schedule import Schedule

PROMPT = "a red circle moves left"
SIZE = {"num_frames": 17, "height": 64, "width": 64}
TOL = 1e-4


def perturbed_artifact(out: Path, split: int = 34) -> Path:
    """The shapes teacher as SemE; DetE = LoRA + copies moved by noise (else DetE == SemE)."""
    from dcm.bundle import load_bundle

    stage = ["train.stage=semantic"] if split < 0 else []
    cfg = load_config(preset="shapes-tiny", overrides=[f"method.split={split}", *stage])
    model = DualExpert(load_bundle("bundled:shapes", components=["transformer"]).transformer)
    if split >= 0:
        model.enable_detail_expert(LoraConfig(rank=4, alpha=8.0))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.save_artifact(out, cfg, "bundled:shapes")


def dcm_latents(model: str | Path, steps: int, seed: int) -> torch.Tensor:
    """Latents `dcm generate` decodes (captured at the VAE), float32 (1, C, T, h, w)."""
    gen = VideoGenerator.load(model, cfg=load_config(preset="shapes-tiny"))
    seen: dict[str, torch.Tensor] = {}
    decode = gen.bundle.decode
    gen.bundle.decode = lambda z: (seen.setdefault("z", z.clone()), decode(z))[1]
    gen.generate([PROMPT], steps=steps, seed=seed, **SIZE)
    return seen["z"]


# The stock side, run by a fresh interpreter: only diffusers, torch and the folder.
STOCK = textwrap.dedent(
    """
    import functools, json, sys
    import torch
    from diffusers import DiffusionPipeline, WanPipeline

    folder, steps, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    assert type(DiffusionPipeline.from_pretrained(folder)).__name__ == "WanPipeline"
    pipe = WanPipeline.from_pretrained(folder)
    info = json.load(open(f"{folder}/dcm_sampling.json"))
    sigmas = info["sigmas"][str(steps)]
    pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=sigmas)
    kw = dict(num_inference_steps=steps, guidance_scale=1.0, num_frames=17, height=64,
              width=64, max_sequence_length=info["max_sequence_length"], output_type="latent")
    run = lambda: pipe("a red circle moves left", generator=torch.Generator().manual_seed(seed),
                       **kw).frames
    result = {"z": run(), "timesteps": pipe.scheduler.timesteps.clone()}
    if pipe.transformer_2 is not None:  # control: the semantic expert for every step
        pipe.register_to_config(boundary_ratio=None)
        result["semantic_only"] = run()
    torch.save(result, out)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("dcm", "pipelines"))
    assert not bad, bad
    """
)


def run_stock(folder: Path, steps: int, seed: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"stock_{steps}_{seed}.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", STOCK, str(folder), str(steps), str(seed), str(out)],
        cwd=tmp_path,  # not the repository: nothing of this project is importable by path
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(artifact, diffusers folder written by the CLI, LoRA folder written by the CLI)."""
    from pipelines.export import main

    base = tmp_path_factory.mktemp("export")
    art = perturbed_artifact(base / "artifact")
    assert main(["--model", str(art), "--format", "diffusers", "--out", str(base / "wan")]) == 0
    assert main(["--model", str(art), "--format", "lora", "--out", str(base / "lora")]) == 0
    return art, base / "wan", base / "lora"


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize(
    ("shift", "grid", "split"), [(3.0, 50, 34), (17.0, 50, 34), (7.0, 50, 37), (3.0, 50, 0)]
)
def test_boundary_ratio_switches_where_the_schedule_routes(shift, grid, split):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = Schedule(shift=shift, grid_points=grid, split=split)
    ratio = boundary_ratio(sch)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    for n in range(2, 41):
        sigmas = sch.sampling_sigmas(n)[:-1]
        scheduler.set_timesteps(n, sigmas=sigmas)
        # WanPipeline: transformer (SemE) when t >= boundary_ratio * num_train_timesteps
        stock = [SEMANTIC if bool(t >= ratio * 1000) else DETAIL for t in scheduler.timesteps]
        ours = sch.route(torch.tensor(sigmas, dtype=torch.float32)).tolist()
        assert stock == ours == pipeline_route(sigmas, ratio), n
        assert ours.count(DETAIL) == n // 2
        assert torch.equal(scheduler.sigmas[:-1], torch.tensor(sigmas, dtype=torch.float32))
    # the boundary sits between sigma_b (detail) and the next float32 above it (semantic)
    s_b = torch.tensor([sch.sigma_split], dtype=torch.float32)
    above = torch.nextafter(s_b, torch.tensor([2.0]))
    assert pipeline_route([float(s_b), float(above)], ratio) == [DETAIL, SEMANTIC]
    assert boundary_ratio(Schedule(shift=shift, grid_points=grid, split=-1)) is None


def test_noise_and_prompts_are_drawn_like_wan_pipeline():
    from diffusers import WanPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    gen = VideoGenerator.load("bundled:shapes", cfg=load_config(preset="shapes-tiny"))
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=gen.bundle.vae, scheduler=None, transformer=None
    )
    shape = gen.bundle.latent_shape(17, 64, 64)
    stock = pipe.prepare_latents(
        2, shape[0], 64, 64, 17, torch.float32, "cpu", torch.Generator().manual_seed(7)
    )
    assert torch.equal(gen.noise(2, 7, 17, 64, 64), stock)
    rows = [torch.Generator().manual_seed(s) for s in (4, 9)]
    stock = pipe.prepare_latents(2, shape[0], 64, 64, 17, torch.float32, "cpu", rows)
    assert torch.equal(gen.noise(2, [4, 9], 17, 64, 64), stock)
    messy = ["  a red &amp;amp; blue\n\tcircle  moves   left ", "a square"]
    assert encoder_prompts(messy, "wan") == [prompt_clean(p) for p in messy]
    assert encoder_prompts(messy, "wan")[0] == "a red & blue circle moves left"
    assert encoder_prompts(messy, "hunyuanvideo") == messy  # its pipeline does not clean


# ---------------------------------------------------------------- the diffusers folder
def test_folder_layout_and_card(exported):
    _, folder, _ = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    info = json.loads((folder / SAMPLING_JSON).read_text())
    sch = Schedule(shift=3.0, grid_points=50, split=34)
    assert index["boundary_ratio"] == info["boundary_ratio"] == boundary_ratio(sch)
    assert info["sigmas"]["4"] == sch.sampling_sigmas(4)[:-1]
    assert info["max_sequence_length"] == 24 and info["guidance_scale"] == 1.0
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["shift"] == 1.0
    card = (folder / "README.md").read_text()
    assert "functools.partial(pipe.scheduler.set_timesteps, sigmas=sigmas)" in card
    assert "guidance_scale=1.0" in card and "max_sequence_length=24" in card
    for part in ("vae", "text_encoder", "tokenizer"):  # the teacher's, byte for byte
        teacher = Path(__file__).resolve().parents[1] / "dcm" / "shapes" / "bundle" / part
        for file in teacher.iterdir():
            assert (folder / part / file.name).read_bytes() == file.read_bytes()


@pytest.mark.parametrize(("steps", "seed"), [(4, 3), (3, 0)])
def test_stock_wan_pipeline_matches_dcm_generate(exported, tmp_path, steps, seed):
    art, folder, _ = exported
    stock = stock_matches(art, folder, steps, seed, tmp_path)
    # the detail expert really differs: without the switch the latents move far
    ours = dcm_latents(art, steps, seed)
    assert (stock["semantic_only"] - ours).abs().max().item() > 100 * TOL


def stock_matches(art: Path, folder: Path, steps: int, seed: int, tmp_path: Path) -> dict:
    """Stock WanPipeline (fresh process) == dcm generate on the artifact == on the folder."""
    stock = run_stock(folder, steps, seed, tmp_path)
    ours = dcm_latents(art, steps, seed)
    diff = (stock["z"] - ours).abs().max().item()
    assert diff <= TOL, diff
    sigmas = json.loads((folder / SAMPLING_JSON).read_text())["sigmas"][str(steps)]
    assert torch.allclose(stock["timesteps"], torch.tensor(sigmas) * 1000)
    # `dcm generate` on the exported folder is the same model again
    assert (dcm_latents(folder, steps, seed) - ours).abs().max().item() <= TOL
    return stock


def test_single_expert_exports_one_transformer(tmp_path):
    art = perturbed_artifact(tmp_path / "single", split=-1)
    folder = export_diffusers(art, tmp_path / "wan", load_config(preset="shapes-tiny"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None
    assert not (folder / "transformer_2").exists()
    stock = run_stock(folder, 2, 1, tmp_path)
    assert (stock["z"] - dcm_latents(art, 2, 1)).abs().max().item() <= TOL


def test_export_refuses_bad_requests(exported, tmp_path, capsys):
    from pipelines.args import run_main
    from pipelines.export import main

    art, folder, _ = exported
    assert run_main(main, ["--model", str(art), "--out", str(folder)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    single = perturbed_artifact(tmp_path / "single", split=-1)
    argv = ["--model", str(single), "--format", "lora", "--out", str(tmp_path / "l")]
    assert run_main(main, argv) == 2
    assert "no detail expert" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a DCM artifact"):
        export_diffusers(tmp_path, tmp_path / "x")


# ---------------------------------------------------------------- LoRA
def lora_gap(artifact: Path, folder: Path, lora: Path) -> tuple[float, float]:
    """(max |stock SemE + LoRA file + copies - our DetE|, max |our SemE - our DetE|)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from dcm.backbones import Cond

    student = DualExpert.load_artifact(artifact).eval()
    shape = student.base.transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, shape.in_channels, 5, 16, 16, generator=g)
    t = torch.tensor([700.0, 300.0])
    text = torch.randn(2, 24, shape.text_dim, generator=g)
    with torch.no_grad():
        want = student(x, t, Cond(text), torch.full((2,), DETAIL))
        semantic = student(x, t, Cond(text), torch.full((2,), SEMANTIC))
    stock = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    stock.load_lora_adapter(str(lora / LORA_FILE), prefix="transformer", adapter_name="detail")
    _, unexpected = stock.load_state_dict(load_file(str(lora / COPIES_FILE)), strict=False)
    assert not unexpected
    with torch.no_grad():
        got = stock(x, t, text, return_dict=False)[0]
    return (got - want).abs().max().item(), (semantic - want).abs().max().item()


def test_lora_on_the_semantic_expert_is_the_detail_expert(exported):
    from diffusers import WanPipeline

    art, folder, lora = exported
    gap, moved = lora_gap(art, folder, lora)
    assert gap <= 1e-5
    assert moved > 1e-2  # the LoRA + copies matter

    # the pipeline-level loader reads the same file
    pipe = WanPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora), weight_name=LORA_FILE, adapter_name="detail")
    assert "detail" in pipe.get_list_adapters()["transformer"]
    card = (lora / "README.md").read_text()
    assert "load_lora_adapter" in card and COPIES_FILE in card


def test_exported_folder_renders_frames(exported):
    _, folder, _ = exported
    gen = VideoGenerator.load(folder)
    frames = gen.generate([PROMPT], steps=2, seed=0, num_frames=5)
    assert gen.source == "exported" and frames.shape == (1, 5, 64, 64, 3)
    assert frames.dtype == np.uint8


# ---------------------------------------------------------------- HunyuanVideo
HY_SIZE = ["data.num_frames=9", "data.height=64", "data.width=64", "model.text_max_length=32"]

# Stock HunyuanVideoPipeline (one transformer): DCM's sigma list, the embedded guidance as
# guidance_scale, and a step-end callback that swaps in transformer_2 below sigma_b.
HY_STOCK = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    folder, steps, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    semantic = pipe.transformer
    detail = HunyuanVideoTransformer3DModel.from_pretrained(folder, subfolder="transformer_2")
    info = json.load(open(f"{folder}/dcm_sampling.json"))

    def switch(pipe, i, t, kw):
        nxt = pipe.scheduler.sigmas[i + 1]
        pipe.transformer = detail if nxt <= info["sigma_boundary"] else semantic
        return kw

    def run(callback):
        pipe.transformer = semantic
        return pipe("a red circle moves left", sigmas=info["sigmas"][str(steps)],
                    num_inference_steps=steps, guidance_scale=info["guidance_scale"],
                    num_frames=info["num_frames"], height=info["height"], width=info["width"],
                    max_sequence_length=info["max_sequence_length"], output_type="latent",
                    generator=torch.Generator().manual_seed(seed),
                    callback_on_step_end=callback).frames

    torch.save({"z": run(switch), "semantic_only": run(None)}, out)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("dcm", "pipelines"))
    assert not bad, bad
    """
)


def test_hunyuan_export_samples_like_dcm_generate(tmp_path):
    from dcm.bundle import load_bundle
    from dcm.tiny import build_tiny_bundle

    bundle = build_tiny_bundle(tmp_path / "hy", backbone="hunyuanvideo")
    cfg = load_config(preset="hunyuanvideo", overrides=[f"model.path={bundle}", *HY_SIZE])
    model = DualExpert(load_bundle(bundle, components=["transformer"]).transformer)
    model.enable_detail_expert(LoraConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    art = model.save_artifact(tmp_path / "artifact", cfg, str(bundle))
    folder = export_diffusers(art, tmp_path / "export", cfg)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoPipeline" and "transformer_2" not in index
    info = json.loads((folder / SAMPLING_JSON).read_text())
    assert info["guidance_scale"] == cfg.method.embedded_guidance / 1000
    assert "callback_on_step_end=switch" in (folder / "README.md").read_text()

    out = tmp_path / "stock.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", HY_STOCK, str(folder), "4", "3", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(out)
    gen = VideoGenerator.load(art, cfg=cfg)
    seen: dict[str, torch.Tensor] = {}
    decode = gen.bundle.decode
    gen.bundle.decode = lambda z: (seen.setdefault("z", z.clone()), decode(z))[1]
    gen.generate([PROMPT], steps=4, seed=3)
    assert (stock["z"] - seen["z"]).abs().max().item() <= TOL
    assert (stock["semantic_only"] - seen["z"]).abs().max().item() > 100 * TOL


def test_bfloat16_export_keeps_diffusers_fp32_modules(exported, tmp_path):
    """--dtype bfloat16 halves the transformers: every weight is the fp32 export's value
    rounded to bf16, except the modules diffusers keeps in fp32 (kept exactly)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from pipelines.export import main

    art, fp32_folder, _ = exported
    out = tmp_path / "bf16"
    assert main(["--model", str(art), "--out", str(out), "--dtype", "bfloat16"]) == 0
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    for part in ("transformer", "transformer_2"):
        full = load_file(fp32_folder / part / "diffusion_pytorch_model.safetensors")
        half = load_file(out / part / "diffusion_pytorch_model.safetensors")
        assert full.keys() == half.keys()
        kept = [k for k in half if keep.intersection(k.split("."))]
        assert kept and all(half[k].dtype == torch.float32 for k in kept)
        assert torch.equal(torch.cat([half[k].flatten() for k in kept]),
                           torch.cat([full[k].flatten() for k in kept]))  # fmt: skip
        cast = [k for k in half if k not in kept]
        assert all(half[k].dtype == torch.bfloat16 for k in cast)
        assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in cast)
    assert json.loads((out / SAMPLING_JSON).read_text())["weights_dtype"] == "bfloat16"
    loaded = WanTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16)
    assert loaded.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    # a LoRA has no dtype choice: one sentence (the CLI prints it and exits 2)
    with pytest.raises(ConfigError, match="--dtype applies to --format diffusers"):
        main(["--model", str(art), "--format", "lora", "--out", str(tmp_path / "l"),
              "--dtype", "float16"])  # fmt: skip
