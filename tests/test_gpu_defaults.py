"""GPU-ready defaults (issue #14 part 4): 'auto' GPU settings, typed booleans, object store
sized by Ray, HF_HUB_OFFLINE only for local models, offline hub ids fail in one sentence."""

from __future__ import annotations

import pytest

from dcm.bundle import BundleError, load_bundle
from dcm.config import ConfigError, load_config
from pipelines.cluster import hub_env, local_env


def test_gpu_settings_default_to_auto_and_booleans_are_booleans():
    cfg = load_config(preset="wan2.1-t2v-1.3b")
    assert cfg.train.use_gpu == "auto" and cfg.ingest.actor_gpus == "auto"
    assert cfg.serve.replica_gpus == "auto"
    assert cfg.ray.object_store_mb == 0  # Ray sizes it from the machine
    off = load_config(overrides=["train.use_gpu=false", "ingest.actor_gpus=0.5"])
    assert off.train.use_gpu is False and off.ingest.actor_gpus == 0.5
    # the old string spelling still reads, as a boolean
    assert load_config(overrides=["train.use_gpu='true'"]).train.use_gpu is True
    with pytest.raises(ConfigError, match="use_gpu='sometimes' is not allowed"):
        load_config(overrides=["train.use_gpu=sometimes"])
    with pytest.raises(ConfigError, match="actor_gpus"):
        load_config(overrides=["ingest.actor_gpus=many"])
    # the shipped experiment files are CPU-only and say so with a boolean
    assert load_config("pipelines/configs/shapes-tiny.yaml").train.use_gpu is False


def test_offline_only_for_local_models():
    assert hub_env("bundled:shapes") == {"HF_HUB_OFFLINE": "1"}
    assert hub_env("/models/wan") == {"HF_HUB_OFFLINE": "1"}
    assert hub_env("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == {}
    assert "HF_HUB_OFFLINE" not in local_env("disabled", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert local_env("disabled")["HF_HUB_OFFLINE"] == "1"


def test_hub_id_offline_names_the_id_and_the_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BundleError) as err:
        load_bundle("Wan-AI/Wan2.1-T2V-1.3B-Diffusers-not-cached")
    msg = str(err.value)
    assert "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers-not-cached'" in msg and "--model" in msg
    assert "\n" not in msg
