"""Model cards (README.md) of the folders ``dcm.export`` writes: what the model is, how it
was trained, and the exact stock-diffusers call that samples it."""

from __future__ import annotations

from typing import Any

SAMPLING_JSON = "dcm_sampling.json"
LORA_FILE = "dcm_detail_lora.safetensors"
COPIES_FILE = "dcm_detail_copies.safetensors"
PIPELINES = {"wan": "WanPipeline", "hunyuanvideo": "HunyuanVideoPipeline"}
NAMES = {"wan": "Wan2.1", "hunyuanvideo": "HunyuanVideo"}


def _training_lines(t: dict[str, Any]) -> list[str]:
    bits = []
    if "steps_semantic" in t or "steps_detail" in t:
        sem, det = t.get("steps_semantic", "?"), t.get("steps_detail", "?")
        bits.append(f"{sem} semantic + {det} detail optimiser steps")
    if "global_batch" in t:
        bits.append(f"batch {t['global_batch']}")
    if t.get("lora_rank"):
        bits.append(f"detail-expert LoRA rank {t['lora_rank']} (alpha {t['lora_alpha']})")
    return [f"- training: {', '.join(bits)}"] if bits else []


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def model_card(info: dict[str, Any]) -> str:
    """README.md of an exported diffusers folder: what it is, how trained, how to sample."""
    n = info["steps"]
    sig = info["sigmas"][str(n)]
    m = info["method"]
    two = info["two_experts"]
    call_kw = (
        f"num_inference_steps={n}, guidance_scale={info['guidance_scale']}, "
        f"num_frames={info['num_frames']}, height={info['height']}, width={info['width']}, "
        f"max_sequence_length={info['max_sequence_length']}, "
        "generator=torch.Generator().manual_seed(0)"
    )
    head = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-video",
        "tags: [dcm, consistency-distillation, few-step]",
        "---",
        "",
        f"# DCM few-step {NAMES.get(info['backbone'], info['backbone'])} text-to-video model",
        "",
        "Distilled with the Dual-Expert Consistency Model (DCM, arXiv 2506.03123) from the teacher "
        f"`{info['teacher']}`: stage 1 trains a **semantic expert** for the high-noise part of "
        "the trajectory (consistency loss + temporal coherence), stage 2 a **detail expert** "
        "for the low-noise part (LoRA on the attentions + copies of the timestep/text embedder "
        "and output layer, consistency + GAN + feature matching). Sampling takes a few Euler "
        "steps with **no classifier-free guidance** (one network evaluation per step).",
        "",
        f"- grid: shift {m['shift']}, {m['grid_points']} points, split index {m['split']}"
        + (f" (sigma_b = {info['sigma_boundary']!r})" if two else " (one expert)"),
        f"- default sampling: {n} steps, {info['num_frames']} frames of "
        f"{info['height']}x{info['width']} at {info['fps']} fps, text length "
        f"{info['max_sequence_length']}",
        *_training_lines(info.get("training") or {}),
        "- exported by `dcm export` from the artifact `" + str(info["artifact"]) + "`",
        "",
    ]
    if info["backbone"] == "wan":
        layout = [
            "## Layout",
            "",
            "A stock `WanPipeline` folder: `transformer` is the semantic expert"
            + (
                ", `transformer_2` the detail expert (LoRA merged, copied layers in place); "
                f"`boundary_ratio` = {info['boundary_ratio']!r} switches to `transformer_2` for "
                f"every sigma <= sigma_b, exactly where DCM's sampler does."
                if two
                else " (a single consistency model: no `transformer_2`)."
            ),
            "The VAE, text encoder and tokenizer are the teacher's. `scheduler` is "
            "`FlowMatchEulerDiscreteScheduler` with shift 1.0, so a sigma list given to "
            "`set_timesteps(sigmas=...)` is used unchanged.",
            "",
            "## Sampling",
            "",
            "`WanPipeline.__call__` has no `sigmas=` argument and builds an even list from "
            "`num_inference_steps`, which is not the list the experts were trained for. Hand "
            "it DCM's list (stored per step count in `dcm_sampling.json`) by binding "
            "`sigmas=` to the scheduler's `set_timesteps`:",
            "",
            "```python",
            "import functools, json, torch",
            "from diffusers import WanPipeline",
            "",
            'pipe = WanPipeline.from_pretrained("PATH")',
            f'sigmas = json.load(open("PATH/{SAMPLING_JSON}"))["sigmas"]["{n}"]',
            f"# {n} steps: {_fmt(sig)}",
            "pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=sigmas)",
            f'video = pipe("a red circle moves left", {call_kw}).frames[0]',
            "```",
            "",
            "`guidance_scale=1.0` turns CFG off (one pass per step, as trained). Other step "
            "counts: pass `num_inference_steps=k` and the list `sigmas[str(k)]`. The same "
            "seed gives the same latents as `dcm generate --model <artifact>` (tested to "
            "1e-4 in float32).",
        ]
    else:
        layout = [
            "## Layout",
            "",
            "A stock `HunyuanVideoPipeline` folder whose `transformer` is the semantic expert. "
            "That pipeline runs one transformer, so the detail expert is a separate "
            "`HunyuanVideoTransformer3DModel` in `transformer_2/` (not listed in "
            "model_index.json), swapped in by a stock step-end callback once sigma <= sigma_b "
            f"(= {info['sigma_boundary']!r}). The VAE, text encoders and tokenizers are the "
            "teacher's; `scheduler` has shift 1.0 so `sigmas=` is used unchanged.",
            "",
            "## Sampling",
            "",
            "```python",
            "import json, torch",
            "from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel",
            "",
            'pipe = HunyuanVideoPipeline.from_pretrained("PATH")',
            "semantic = pipe.transformer",
            'detail = HunyuanVideoTransformer3DModel.from_pretrained("PATH", subfolder="transformer_2")',
            f'info = json.load(open("PATH/{SAMPLING_JSON}"))',
            f'sigmas = info["sigmas"]["{n}"]  # {_fmt(sig)}',
            "",
            "def switch(pipe, i, t, kw):  # the next step's sigma decides its expert",
            "    nxt = pipe.scheduler.sigmas[i + 1]",
            '    pipe.transformer = detail if nxt <= info["sigma_boundary"] else semantic',
            "    return kw",
            "",
            "pipe.transformer = semantic",
            f'video = pipe("a red circle moves left", sigmas=sigmas, {call_kw}, '
            "callback_on_step_end=switch).frames[0]",
            "```",
            "",
            f"`guidance_scale={info['guidance_scale']}` is the embedded guidance the model was "
            "distilled with (the pipeline multiplies it by 1000); `true_cfg_scale` stays 1 "
            "(no CFG).",
        ]
        if not two:
            layout = layout[:2] + [
                "A stock `HunyuanVideoPipeline` folder (a single consistency model). Sample with "
                f'`pipe(prompt, sigmas=json.load(open("PATH/{SAMPLING_JSON}"))["sigmas"]["{n}"], '
                f"{call_kw})`.",
            ]
    return "\n".join(head + layout) + "\n"


def lora_card(info: dict[str, Any]) -> str:
    """README.md of a LoRA export: the detail expert applied to the semantic expert."""
    pipe = PIPELINES[info["backbone"]]
    return "\n".join(
        [
            f"# DCM detail expert as a LoRA ({info['backbone']})",
            "",
            "The low-noise **detail expert** of a Dual-Expert Consistency Model, as a change to "
            "the **semantic expert** (the `transformer` of the matching `dcm export --format "
            "diffusers` folder, or the artifact's base model):",
            "",
            f"- `{LORA_FILE}`: LoRA rank {info['rank']}, alpha {info['alpha']} on "
            f"{info['targets']} attention projections, in the format `{pipe}.load_lora_weights` "
            "and `load_lora_adapter` read (the trained scale alpha / r is folded into "
            "`lora_B`, so the file's alpha equals its rank);",
            f"- `{COPIES_FILE}`: full weights of the layers the detail expert owns a copy of "
            f"({', '.join(info['copies'])}), with the plain transformer's key names. A LoRA "
            "cannot carry them, so apply them with `load_state_dict(..., strict=False)`.",
            "",
            "```python",
            "import torch",
            "from safetensors.torch import load_file",
            f"from diffusers import {pipe}",
            "",
            f'pipe = {pipe}.from_pretrained("EXPORTED_DIFFUSERS_FOLDER")   # transformer = semantic expert',
            "detail = pipe.transformer  # or a copy, to keep the semantic expert too",
            f'detail.load_lora_adapter("LORA_DIR/{LORA_FILE}", prefix="transformer", adapter_name="detail")',
            f'missing, unexpected = detail.load_state_dict(load_file("LORA_DIR/{COPIES_FILE}"), strict=False)',
            "assert not unexpected",
            "```",
            "",
            "Route steps with sigma > sigma_b = "
            f"{info['sigma_boundary']!r} to the semantic expert and the rest to the detail "
            "expert (in `WanPipeline`: `boundary_ratio` = "
            f"{info['boundary_ratio']!r}); the exported diffusers folder does this for you.",
            "",
        ]
    )
