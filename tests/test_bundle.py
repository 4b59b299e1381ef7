"""Tiny bundles round-trip through the real loading path; latent conventions hold."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from helpers import tiny_bundle

from dcm.bundle import Bundle, BundleError, load_bundle, resolve_model_path
from dcm.config import ConfigError, load_config
from dcm.tiny import build_tiny_bundle


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Bundle:
    cfg = load_config(preset="shapes-tiny")
    return load_bundle(tiny_bundle(tmp_path_factory), text_max_length=cfg.model.text_max_length)


def test_tiny_bundle_layout_and_speed(tmp_path):
    build_tiny_bundle(tmp_path / "warm")  # first call pays the library imports
    start = time.process_time()  # CPU seconds: stable on a loaded shared machine
    out = build_tiny_bundle(tmp_path / "b", vocab=["red", "circle"], seed=3)
    assert time.process_time() - start < 1.0  # ~0.15 s
    index = json.loads((out / "model_index.json").read_text())
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert name in index and (out / name).is_dir()
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert len(vae_cfg["latents_mean"]) == len(vae_cfg["latents_std"]) == vae_cfg["z_dim"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = tok(["Red circle zebra"]).input_ids[0]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id in ids and len(ids) == 4


def test_tiny_bundle_is_seeded(tmp_path):
    a = load_bundle(build_tiny_bundle(tmp_path / "a", seed=1), components=["transformer"])
    b = load_bundle(build_tiny_bundle(tmp_path / "b", seed=1), components=["transformer"])
    c = load_bundle(build_tiny_bundle(tmp_path / "c", seed=2), components=["transformer"])
    pa, pb, pc = (next(x.transformer.parameters()) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_tiny_size_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown size.*layerz"):
        build_tiny_bundle(tmp_path, layerz=3)


def test_load_shapes_and_latent_convention(wan):
    cfg = load_config(preset="shapes-tiny")
    d = cfg.data
    assert wan.backbone_kind == "wan"
    assert (wan.spatial_factor, wan.temporal_factor) == (
        cfg.model.vae_spatial_factor,
        cfg.model.vae_temporal_factor,
    )
    assert wan.patch_size == cfg.model.patch_size
    c, t, h, w = wan.latent_shape(d.num_frames, d.height, d.width)
    assert (t, h, w) == (5, 16, 16) and c == wan.latent_channels

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, d.num_frames, d.height, d.width, generator=g) * 2 - 1
    z_mean = wan.encode_video(pixels, posterior="mean")
    assert z_mean.shape == (2, c, t, h, w)
    assert torch.equal(z_mean, wan.encode_video(pixels, posterior="mean"))
    s1 = wan.encode_video(pixels, generator=torch.Generator().manual_seed(5))
    s2 = wan.encode_video(pixels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, z_mean)

    video = wan.decode(wan.normalize(z_mean))
    assert video.shape == pixels.shape and video.min() >= -1 and video.max() <= 1


def test_normalize_inverts_with_config_stats(tmp_path):
    out = build_tiny_bundle(tmp_path / "b")
    vae_file = out / "vae" / "config.json"
    vcfg = json.loads(vae_file.read_text())
    z = vcfg["z_dim"]
    vcfg["latents_mean"] = [0.1 * i for i in range(z)]
    vcfg["latents_std"] = [1.0 + 0.5 * i for i in range(z)]
    vae_file.write_text(json.dumps(vcfg))
    b = load_bundle(out, components=["vae"])
    raw = torch.randn(2, z, 3, 4, 4, dtype=torch.float64)
    normed = b.normalize(raw)
    assert torch.allclose(b.denormalize(normed), raw, atol=1e-12)
    # channel 3: (z - 0.3) / 2.5
    assert torch.allclose(normed[:, 3], (raw[:, 3] - 0.3) / 2.5)
    # unbatched latent rows (C, T, h, w) use the same statistics
    assert torch.allclose(b.normalize(raw[0]), normed[0])


def test_hunyuan_bundle_scaling(tmp_path):
    out = build_tiny_bundle(tmp_path / "hy", backbone="hunyuanvideo")
    b = load_bundle(out, components=["transformer", "vae"])
    assert b.backbone_kind == "hunyuanvideo"
    assert b.vae_config["scaling_factor"] == pytest.approx(0.476986)
    z = torch.randn(1, b.latent_channels, 2, 4, 4)
    assert torch.allclose(b.normalize(z), z * 0.476986)
    assert torch.allclose(b.denormalize(b.normalize(z)), z, atol=1e-6)
    pixels = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert b.encode_video(pixels, posterior="mean").shape == (1, b.latent_channels, 2, 2, 2)
    with pytest.raises(BundleError, match="text encoder"):
        b.encode_text(["a"])


def test_encode_text_pads_zeroes_and_caches_null(wan):
    cond = wan.encode_text(["a red circle moves left", "blue square"])
    assert cond.text.shape[:2] == (2, wan.text_max_length) == cond.mask.shape
    lengths = cond.mask.sum(1).tolist()
    assert lengths == [6, 3]  # words + </s>
    assert torch.all(cond.text[0, 6:] == 0) and torch.all(cond.text[1, 3:] == 0)
    assert cond.text[0, :6].abs().sum(-1).min() > 0
    long = wan.encode_text([" ".join(["red"] * 100)])
    assert long.mask.sum() == wan.text_max_length
    null = wan.null_cond(3)
    assert null.text.shape[0] == 3 and torch.equal(null.text[0], null.text[2])
    assert wan._null is not None and wan.null_cond(1).text.data_ptr() != 0
    assert torch.equal(wan.null_cond(1).text[0], wan.encode_text([""]).text[0])


def test_components_subset_reads_configs_only(tmp_path_factory):
    b = load_bundle(tiny_bundle(tmp_path_factory), components=["transformer"])
    assert b.vae is None and b.text_encoder is None and b.transformer is not None
    z = torch.randn(1, b.latent_channels, 5, 16, 16)
    assert torch.allclose(b.denormalize(b.normalize(z)), z, atol=1e-6)
    with pytest.raises(BundleError, match="without its VAE"):
        b.decode(z)
    with pytest.raises(ConfigError, match="unknown"):
        load_bundle(tiny_bundle(tmp_path_factory), components=["unet"])


def test_broken_bundles_name_the_file(tmp_path, tmp_path_factory):
    src = tiny_bundle(tmp_path_factory)
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    shutil.rmtree(missing / "transformer")
    with pytest.raises(BundleError, match=r"transformer/config\.json' is missing"):
        load_bundle(missing)

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "vae" / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"vae/config\.json' is not valid JSON"):
        load_bundle(bad)

    (bad / "model_index.json").write_text("[1, 2")
    with pytest.raises(BundleError, match=r"model_index\.json' is not valid JSON"):
        load_bundle(bad)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    (corrupt / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(
        BundleError, match=r"could not load '.*transformer' as WanTransformer3DModel"
    ):
        load_bundle(corrupt, components=["transformer"])
    (corrupt / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"could not load the tokenizer in") as err:
        load_bundle(corrupt, components=["text_encoder"])
    assert "\n" not in str(err.value)

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "dcm_artifact.json").write_text("{}")
    with pytest.raises(BundleError, match="distilled artifact"):
        load_bundle(artifact)


def test_resolve_model_path(tmp_path, monkeypatch):
    import dcm.bundle as bundle_mod

    monkeypatch.setitem(bundle_mod.BUNDLED, "shapes", tmp_path / "not-built")
    with pytest.raises(BundleError, match="python -m pipelines.pretrain"):
        resolve_model_path("bundled:shapes")
    with pytest.raises(BundleError, match="bundled:shapes"):
        resolve_model_path("bundled:nope")
    with pytest.raises(BundleError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()
    # 'owner/name' that is not a local path is a hub id, handed on unchanged
    assert str(resolve_model_path("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")) == (
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BundleError, match="could not fetch model_index.json of hub model"):
        load_bundle("no-such-owner/no-such-model")
    built = build_tiny_bundle(tmp_path / "built")
    monkeypatch.setitem(bundle_mod.BUNDLED, "shapes", built)
    assert resolve_model_path("bundled:shapes") == built


def test_attention_backends(tmp_path_factory, monkeypatch):
    import dcm.attention as attn

    b = load_bundle(tiny_bundle(tmp_path_factory), components=["transformer"])
    model = b.transformer
    x = torch.randn(1, b.latent_channels, 2, 4, 4)
    t = torch.tensor([500.0])
    text = torch.randn(1, 6, model.config.text_dim)
    with torch.no_grad():
        before = model(x, t, text, return_dict=False)[0]
    assert attn.set_attention_backend(model, "auto") == "native"  # CPU: always SDPA
    assert attn.current_backends(model) == {"native"}
    wrapped = torch.nn.Sequential(model)  # a wrapper (Backbone, DualExpert) is searched
    assert attn.set_attention_backend(wrapped, "native") == "native"
    with torch.no_grad():
        assert torch.allclose(model(x, t, text, return_dict=False)[0], before, atol=1e-6)

    monkeypatch.setattr(attn, "flash_attn_available", lambda: False)
    with pytest.raises(ConfigError, match="flash-attn"):
        attn.set_attention_backend(model, "flash")
    with pytest.raises(ConfigError, match="choose one of"):
        attn.set_attention_backend(model, "xformers")
    # auto picks flash only with the package, CUDA and half precision
    monkeypatch.setattr(attn, "flash_attn_available", lambda: True)
    cuda = torch.device("cuda")
    assert attn.resolve_backend("auto", cuda, torch.bfloat16) == "flash"
    assert attn.resolve_backend("auto", cuda, torch.float32) == "native"
    assert attn.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "native"
    with pytest.raises(ConfigError, match="CUDA"):
        attn.resolve_backend("flash", torch.device("cpu"), torch.bfloat16)


@pytest.mark.gpu
def test_attention_auto_on_gpu(tmp_path_factory):
    import dcm.attention as attn

    b = load_bundle(tiny_bundle(tmp_path_factory), "cuda", torch.bfloat16, ["transformer"])
    expected = "flash" if attn.flash_attn_available() else "native"
    assert attn.set_attention_backend(b.transformer, "auto") == expected
    x = torch.randn(1, b.latent_channels, 2, 4, 4, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 6, b.transformer.config.text_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    with torch.no_grad():
        out = b.transformer(x, t, text, return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()
