"""The config tree: presets, YAML files, overrides and the clarity of every error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dcm.config import (
    PRESETS,
    Config,
    ConfigError,
    IngestConfig,
    LoraConfig,
    MethodConfig,
    TrainConfig,
    all_keys,
    explain,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_yaml(name, tmp_path):
    cfg = load_config(preset=name)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert Config() != cfg or name == "shapes-tiny"


def test_presets_hold_method_values():
    wan = load_config(preset="wan2.1-t2v-1.3b")
    hy = load_config(preset="hunyuanvideo")
    assert (wan.method.shift, wan.method.grid_points, wan.method.split) == (17.0, 50, 34)
    assert (hy.method.shift, hy.method.split, hy.method.guidance) == (17.0, 37, "embedded")
    assert wan.method.cfg_scale == 5.0 and wan.method.fm_weight == 10.0
    assert hy.method.fm_weight == 1.0 and hy.train.global_batch == 6
    assert (wan.lora.rank, wan.lora.alpha) == (128, 256.0)
    assert wan.method.huber_c == 0.001 and wan.method.tc_stride == 3
    assert wan.train.disc_betas == (0.0, 0.999) and wan.train.lr_disc == 1e-5
    assert wan.latent_frames == 21 and hy.latent_frames == 33


def test_every_yaml_in_repo_loads():
    """Experiment files validate as a Config; every other YAML at least parses."""
    files = [p for p in REPO.rglob("*.y*ml") if not {".venv", ".git", "runs"} & set(p.parts)]
    for path in files:
        if "pipelines/configs" in path.as_posix():
            load_config(path)
        else:
            # libyaml's parser: the kuberay CRDs (3 MB) take a minute in pure Python
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            assert list(yaml.load_all(path.read_text(), Loader=loader)), path


def _write(tmp_path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            {"method": {"splitt": 3}},
            "unknown config key 'method.splitt'; did you mean 'method.split'",
        ),
        ({"trian": {"seed": 1}}, "unknown config key 'trian'"),
        ({"method": {"split": 60}}, "method.split=60 is out of range: allowed [-1, 48]"),
        ({"method": {"shift": "big"}}, "method.shift='big' must be a number"),
        ({"data": {"num_frames": 80}}, "data.num_frames=80 must be k*4+1"),
        ({"data": {"height": 100}}, "data.height=100 must be divisible by 8"),
        ({"train": {"stage": "middle"}}, "train.stage='middle' is not allowed"),
        ({"model": {"backbone": "hunyuanvideo"}}, "method.guidance must be 'embedded'"),
        (
            {"train": {"global_batch": 3, "num_workers": 2}},
            "train.global_batch=3 must be divisible",
        ),
        ({"sample": {"sigma_preset": "wan-6", "steps": 4}}, "set sample.steps=6"),
        (
            {"method": {"ema_decay": 0.9}, "train": {"zero_stage": 3}},
            "keeps a whole EMA copy on every worker: use train.zero_stage <= 2",
        ),
        (
            {"train": {"average_decay": 0.99, "zero_stage": 3}},
            "train.average_decay > 0 keeps a whole EMA copy on every worker",
        ),
        ({"lora": {"target_modules": "to_q"}}, "lora.target_modules='to_q' must be a list"),
        # one bad value of each kind: range, type, choice, list length, list item, mapping
        ({"lora": {"rank": 0}}, "lora.rank=0 is out of range: allowed [1, 4096]"),
        ({"method": {"ema_decay": 1.0}}, "method.ema_decay=1.0 is out of range: allowed [0, 1)"),
        ({"lora": {"rank": 2.5}}, "lora.rank=2.5 must be an integer"),
        ({"train": {"seed": True}}, "train.seed=True must be an integer"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled='yes' must be true or false"),
        ({"model": {"path": 5}}, "model.path=5 must be a string"),
        (
            {"train": {"zero_stage": 5}},
            "train.zero_stage=5 is not allowed: choose one of 0, 1, 2, 3",
        ),
        (
            {"train": {"use_gpu": "maybe"}},
            "train.use_gpu='maybe' is not allowed: choose 'auto' or true or false",
        ),
        (
            {"ingest": {"actor_gpus": "many"}},
            "ingest.actor_gpus='many' is not allowed: choose 'auto' or a number",
        ),
        ({"ingest": {"actor_gpus": 9}}, "ingest.actor_gpus=9 is out of range: allowed [0, 8]"),
        ({"model": {"patch_size": [1, 2]}}, "model.patch_size=[1, 2] must be a list of 3 items"),
        ({"model": {"patch_size": [1, 2, 0]}}, "model.patch_size[2]=0 is out of range"),
        ({"train": {"betas": [0.9, 1.0]}}, "train.betas[1]=1.0 is out of range: allowed [0, 1)"),
        ({"sample": {"eval_steps": [1, 4]}}, "sample.eval_steps[0]=1 is out of range"),
        ({"lora": {"target_modules": []}}, "lora.target_modules=[] must have at least 1 item"),
        ({"method": {"disc_hidden": 100}}, "method.disc_hidden=100 must be a multiple of 32"),
        ({"sweep": {"variants": {"abl": 3}}}, "sweep.variants.abl=3 must be a mapping"),
        ({"serve": {"variants": {"v": ""}}}, "serve.variants.v='' must not be empty"),
        ({"serve": {"default_steps": 9}}, "serve.default_steps=9 is out of range: allowed [2, 8]"),
        ({"ray": {"object_store_mb": 10}}, "ray.object_store_mb=10 is out of range"),
        ({"method": 3}, "'method' must be a mapping"),
        ({"trian": {"seed": 1}}, "did you mean 'train'?"),
        # an unknown key is reported before a bad value next to it
        ({"method": {"split": 60, "splitt": 1}}, "did you mean 'method.split'?"),
    ],
)
def test_bad_files_give_one_clear_sentence(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert needle in msg, msg
    assert str(path) in msg
    assert "\n" not in msg


def test_overrides_and_unknown_override():
    cfg = load_config(
        preset="wan2.1-t2v-1.3b", overrides=["method.split=30", "train.betas=[0.8, 0.9]"]
    )
    assert cfg.method.split == 30 and cfg.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="did you mean 'method.tc_weight'"):
        load_config(overrides=["method.tc_wieght=2"])
    with pytest.raises(ConfigError, match="unknown preset 'wan'"):
        load_config(preset="wan")
    with pytest.raises(ConfigError, match="must look like"):
        load_config(overrides=["method.split"])


def test_replace_validates_again():
    cfg = load_config(preset="shapes-tiny")
    assert cfg.replace(**{"method.split": 10}).method.split == 10
    with pytest.raises(ConfigError, match="method.split"):
        cfg.replace(**{"method.split": 49})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: {split: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_explain_documents_every_field():
    text = explain()
    for key in ("method.split", "train.zero_stage", "serve.max_queued", "data.posterior"):
        section, name = key.split(".")
        assert f"  {name}: " in text
    assert all("#" in line for line in text.splitlines())


def test_flat_keys_are_dotted():
    flat = load_config().flat()
    assert flat["method.split"] == 34 and flat["name"] == "shapes-tiny"


def test_single_consistency_model_needs_semantic_stage():
    cfg = load_config(overrides=["method.split=-1", "train.stage=semantic"])
    assert cfg.method.split == -1
    with pytest.raises(ConfigError, match="set train.stage=semantic"):
        load_config(overrides=["method.split=-1"])


def test_values_coerce_as_yaml_writes_them():
    """Lists become tuples, ints become floats where a number is asked, 'auto' stays,
    the strings 'true'/'false' of an auto-or-boolean field become booleans."""
    cfg = load_config(
        overrides=[
            "model.patch_size=[1, 4, 4]",
            "lora.alpha=16",
            "train.use_gpu=FALSE",
            "ingest.actor_gpus=1",
            "sample.prompts=[a red circle]",
            "data.height=64",
        ]
    )
    assert cfg.model.patch_size == (1, 4, 4) and isinstance(cfg.model.patch_size, tuple)
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.train.use_gpu is False and cfg.ingest.actor_gpus == 1.0
    assert cfg.sample.prompts == ("a red circle",)
    assert load_config().serve.replica_gpus == "auto"
    assert Config(**cfg.to_dict()) == cfg  # the dict written next to artifacts reads back


def test_exponent_floats_need_no_dot(tmp_path):
    """YAML 1.1 reads 5e-6 as a string (it wants 5.0e-6), which refused the way everyone
    writes a learning rate: overrides and config files read it as a number; words and
    partial exponents stay strings."""
    cfg = load_config(overrides=["train.lr_semantic=5e-6", "train.lr_detail=2E-5"])
    assert cfg.train.lr_semantic == 5e-6 and cfg.train.lr_detail == 2e-5
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr_semantic: 1e-4\nsweep:\n  space: {train.lr_detail: {grid: [1e-5, 3e-5]}}\n"
    )
    cfg = load_config(path)
    assert cfg.train.lr_semantic == 1e-4
    assert parse_override("sweep.space={x: {grid: [1e-6, 1.0]}}")[1] == {"x": {"grid": [1e-6, 1.0]}}
    assert [parse_override(f"k={v}")[1] for v in ("e5", "1e", "5e-6x")] == ["e5", "1e", "5e-6x"]
    with pytest.raises(ConfigError, match=r"train.lr_semantic=2000.0 is out of range"):
        load_config(overrides=["train.lr_semantic=2e3"])


def test_sections_built_directly_validate_the_same_way():
    """Code that builds a section (MethodConfig(...), dataclasses.replace) gets the same
    one-line ConfigError as a YAML file, with the field's own name."""
    assert LoraConfig(target_modules=["to_q"]).target_modules == ("to_q",)
    with pytest.raises(ConfigError, match=r"^split=60 is out of range: allowed \[-1, 48\]$"):
        MethodConfig(split=60)
    with pytest.raises(ConfigError, match="unknown config key 'rnak'; did you mean 'rank'"):
        LoraConfig(rnak=4)
    with pytest.raises(ConfigError, match="^lr_disc=2.0 is out of range"):
        dataclasses.replace(TrainConfig(), lr_disc=2.0)
    with pytest.raises(ConfigError, match="^encode_actors='2' must be an integer$"):
        IngestConfig(encode_actors="2")
    assert dataclasses.asdict(LoraConfig())["rank"] == 128
    assert MethodConfig.split == 34  # class attributes hold the defaults


def test_every_key_has_a_doc_and_a_default():
    keys = all_keys()
    assert "method.split" in keys and "serve.variants" in keys and len(keys) == len(set(keys))
    lines = [line for line in explain().splitlines() if line.startswith("  ")]
    assert len(lines) == len([k for k in keys if "." in k])
    assert all(not line.rstrip().endswith("# None") for line in lines)


def test_large_presets_shard_the_fp32_student():
    """A 13-14B student in fp32 beside its bf16 teacher does not fit an 80 GB card under
    ZeRO-2: the large presets use ZeRO-3, the 1.3B one keeps ZeRO-2."""
    stages = {p: load_config(preset=p).train.zero_stage for p in PRESETS}
    assert stages["wan2.1-t2v-14b"] == stages["hunyuanvideo"] == 3
    assert stages["wan2.1-t2v-1.3b"] == stages["shapes-tiny"] == 2
