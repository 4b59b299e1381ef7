"""pipelines.pretrain: a few real steps through Ray Train produce a loadable bundle."""

from __future__ import annotations

import json

import pytest
import torch

from dcm.config import ConfigError, load_config
from pipelines.pretrain import (
    PretrainSettings,
    evaluate_teacher,
    located,
    main,
    run_pretrain,
)

TINY = dict(
    vae_steps=2, vae_frames=5, vae_batch=2, vae_pool=3, clips=4, steps=3, batch=2, log_every=1,
    checkpoint_minutes=0.0, threads=1, eval_prompts=0, layers=1, heads=2, head_dim=8, ffn_dim=32, z_dim=4,
    vae_base_dim=4, text_dim=16, text_layers=1, text_ff=32,
)  # fmt: skip


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_few_steps_through_ray_train_give_a_loadable_bundle(ray_cluster, tmp_path, monkeypatch):
    from dcm.bundle import load_bundle
    from dcm.shapes.grammar import VOCAB

    cfg = load_config()
    out = run_pretrain(cfg, PretrainSettings(**TINY), tmp_path / "bundle", tmp_path / "work")
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] == 3 and info["vae_psnr"] > 0 and "machine" in info
    assert 0.0 <= info["vae_summary"] <= 1.0  # the reconstructions, scored
    assert info["command"].startswith("python -m pipelines.pretrain")

    b = load_bundle(out, text_max_length=cfg.model.text_max_length)
    # the VAE config carries the measured latent statistics, not the identity
    assert b.vae_config["latents_std"] != [1.0] * 4 and len(b.vae_config["latents_mean"]) == 4
    # every grammar word is its own token (no <unk>)
    ids = b.tokenizer(" ".join(VOCAB)).input_ids
    assert len(ids) == len(VOCAB) + 1 and b.tokenizer.unk_token_id not in ids
    # pretraining encodes text with Bundle.encode_text(grad=True): same values, with a graph
    prompts = ["a red circle moves left on a plain background", ""]
    b.text_encoder.requires_grad_(True)
    train = b.encode_text(prompts, grad=True)
    ref = b.encode_text(prompts)
    assert train.text.requires_grad and not ref.text.requires_grad
    # (autograd takes other kernels: equal to float32 rounding)
    assert torch.equal(train.mask, ref.mask)
    assert torch.allclose(train.text, ref.text, atol=1e-5)
    z = b.encode_video(torch.zeros(1, 3, 17, 64, 64), posterior="mean")
    assert z.shape == (1, 4, 5, 16, 16)
    assert b.decode(b.normalize(z)).shape == (1, 3, 17, 64, 64)

    # the held-out teacher evaluation, per CFG scale, and the --evaluate-only path
    quick = cfg.replace(**{"sample.teacher_steps": 2})
    res = evaluate_teacher(
        quick, PretrainSettings(**{**TINY, "eval_prompts": 1, "eval_cfg": "5,0"}), out
    )
    assert res["prompts"] == 1 and set(res) >= {"cfg_5", "cfg_0"}
    assert res["cfg_5"]["nfe"] == 4 and 0.0 <= res["cfg_5"]["summary"] <= 1.0
    argv = [
        "--evaluate-only",
        "--out",
        str(out),
        "--eval-prompts",
        "1",
        "--set",
        "sample.teacher_steps=2",
    ]
    assert main(argv) == 0
    info = json.loads((out / "pretrain.json").read_text())
    w = f"cfg_{cfg.method.cfg_scale:g}"  # no --eval-cfg: the preset's guidance
    assert info["heldout_eval"][w]["steps"] == 2 and info["steps"] == 3

    # continue from that bundle: the decoder alone on full-length clips; the encoder, the
    # latent statistics and the transformer (--steps 0) are kept as they were
    # (--init relative to the caller's directory: the worker runs elsewhere)
    monkeypatch.chdir(tmp_path)
    more = PretrainSettings(
        **{**TINY, "init": "bundle", "vae_steps": 0, "steps": 0, "decoder_steps": 2}
    )
    out2 = run_pretrain(cfg, more, tmp_path / "bundle2", tmp_path / "work")
    info2 = json.loads((out2 / "pretrain.json").read_text())
    assert info2["decoder_steps_done"] == 2 and info2["vae_steps_done"] == 0
    assert info2["init_run"]["steps"] == 3  # the run it continued is recorded
    assert info2["settings"]["init"] == "bundle"  # as given, not this machine's path
    b2 = load_bundle(out2, text_max_length=cfg.model.text_max_length)
    assert b2.vae_config["latents_mean"] == b.vae_config["latents_mean"]
    assert b2.vae_config["latents_std"] == b.vae_config["latents_std"]
    for part, kept in (("encoder", True), ("quant_conv", True), ("decoder", False)):
        old = getattr(b.vae, part).state_dict()
        new = getattr(b2.vae, part).state_dict()
        same = all(torch.equal(old[k], new[k]) for k in old)
        assert same == kept, part
    for k, v in b.transformer.state_dict().items():
        assert torch.equal(v, b2.transformer.state_dict()[k]), k


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="vae-frames"):
        PretrainSettings(vae_frames=6)
    with pytest.raises(ConfigError, match="--steps 0 keeps a transformer"):
        PretrainSettings(steps=0)
    with pytest.raises(ConfigError, match="decoder-steps"):
        PretrainSettings(decoder_steps=-1)
    with pytest.raises(ConfigError, match="ema"):
        PretrainSettings(ema=1.0)
    with pytest.raises(ConfigError, match="eval-cfg"):
        PretrainSettings(eval_cfg="high")


def test_init_is_located_before_ray_starts(tmp_path, monkeypatch):
    from dcm.bundle import BundleError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert located(PretrainSettings(init="here")).init == str((tmp_path / "here").resolve())
    assert located(PretrainSettings(init="bundled:shapes")).init == "bundled:shapes"
    assert located(PretrainSettings(init="owner/model")).init == "owner/model"  # a hub id
    # a missing folder is one BundleError from the driver, not a failed Ray Train run
    with pytest.raises(BundleError, match="model path 'nowhere' does not exist"):
        run_pretrain(load_config(), PretrainSettings(init="nowhere"), tmp_path / "b", "w")
