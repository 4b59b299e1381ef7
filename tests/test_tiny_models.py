"""`dcm tiny-model`: random real-architecture Wan2.1 / HunyuanVideo folders.

Stock diffusers pipelines load and run them, and our text encoding equals the pipelines'
own ``encode_prompt`` (the golden tests of issue #14).
"""

from __future__ import annotations

import json

import pytest
import torch

from dcm.bundle import load_bundle
from pipelines.cli import main as dcm

PROMPTS = ["a red circle moves left", "blue square on a dark background, slowly"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    for kind in ("wan", "hunyuanvideo"):
        assert dcm(["tiny-model", "--backbone", kind, "--out", str(root / kind)]) == 0
    return root


def test_folders_name_the_real_classes(folders):
    wan = json.loads((folders / "wan" / "model_index.json").read_text())
    assert wan["_class_name"] == "WanPipeline"
    assert wan["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert wan["vae"] == ["diffusers", "AutoencoderKLWan"]
    hy = json.loads((folders / "hunyuanvideo" / "model_index.json").read_text())
    assert hy["_class_name"] == "HunyuanVideoPipeline"
    assert hy["text_encoder"] == ["transformers", "LlamaModel"]
    assert hy["text_encoder_2"] == ["transformers", "CLIPTextModel"]
    assert hy["transformer"] == ["diffusers", "HunyuanVideoTransformer3DModel"]
    sched = json.loads(
        (folders / "hunyuanvideo" / "scheduler" / "scheduler_config.json").read_text()
    )
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 7.0
    # the smoke config written next to the model points at it and is a valid config
    from dcm.config import load_config

    cfg = load_config(folders / "hunyuanvideo" / "dcm-smoke.yaml")
    assert cfg.model.backbone == "hunyuanvideo" and cfg.data.empty_prompt_prob == 0.0
    assert cfg.model.path == str(folders / "hunyuanvideo")


def test_stock_pipelines_load_and_sample(folders):
    from diffusers import HunyuanVideoPipeline, WanPipeline

    wan = WanPipeline.from_pretrained(folders / "wan")
    out = wan(PROMPTS[0], num_frames=5, height=32, width=32, num_inference_steps=2,
              max_sequence_length=16, output_type="np").frames  # fmt: skip
    assert out.shape == (1, 5, 32, 32, 3)
    hy = HunyuanVideoPipeline.from_pretrained(folders / "hunyuanvideo")
    out = hy(PROMPTS[0], num_frames=5, height=32, width=32, num_inference_steps=2,
             max_sequence_length=16, output_type="np").frames  # fmt: skip
    assert out.shape == (1, 5, 32, 32, 3)


def test_hunyuan_prompt_encoding_equals_diffusers(folders):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(folders / "hunyuanvideo")
    bundle = load_bundle(folders / "hunyuanvideo", components=["text_encoder"], text_max_length=24)
    ours = bundle.encode_text(PROMPTS)
    text, pooled, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=24, device="cpu")
    assert ours.text.shape == (2, 24, 32) and ours.pooled.shape == (2, 16)
    assert torch.equal(ours.text, text) and torch.equal(ours.pooled, pooled)
    assert torch.equal(ours.mask, mask.long())
    # the template is cropped: the first kept token is the prompt's first word
    assert mask.sum(1).tolist() == [6, 9]  # words + <|eot_id|>
    # the empty prompt still has its <|eot_id|> and a pooled vector
    null = bundle.null_cond(2)
    assert null.mask.sum(1).tolist() == [1, 1] and null.pooled.shape == (2, 16)


def test_wan_prompt_encoding_equals_diffusers(folders):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folders / "wan")
    bundle = load_bundle(folders / "wan", components=["text_encoder"], text_max_length=24)
    ours = bundle.encode_text(PROMPTS)
    text, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                 max_sequence_length=24, device="cpu")  # fmt: skip
    assert ours.pooled is None
    # equal up to float rounding (UMT5 runs with and without autograd); zero past the prompt
    assert torch.allclose(ours.text, text, atol=1e-5, rtol=0)
    assert torch.equal(ours.text == 0, text == 0)
