"""One typed configuration tree for every stage of the platform.

Frozen dataclasses, one per concern, each field documented through ``doc(...)``
metadata and validated on construction. ``Config`` is the root; named presets
(``PRESETS``) hold the values of METHOD.md; experiment YAML files and ``--set a.b=c``
overrides are deep-merged over a preset by ``load_config``. Unknown keys are errors that
name the closest valid key; bad values name the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SEMANTIC = 0  # expert id of the semantic expert (high noise, sigma > sigma_b)
DETAIL = 1  # expert id of the detail expert (low noise, sigma <= sigma_b)
SCHEMA_VERSION = 1  # of the resolved-config dict written next to every artifact


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and what to do."""


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with a docstring kept in its metadata (shown by `--dry-run --explain`)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


# ---------------------------------------------------------------- value checks
def _range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{name}={value!r} is out of range: allowed [{lo_s}, {hi_s}]")


def _auto_or_bool(section: Any, name: str) -> None:
    """A field that is 'auto' or a boolean; the strings 'true' / 'false' become booleans."""
    value = getattr(section, name)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        object.__setattr__(section, name, value.lower() == "true")
    elif value != "auto" and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not allowed: choose 'auto', true or false")


def _choice(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(
            f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}"
        )


# ---------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig:
    path: str = doc(
        "bundled:shapes",
        "Diffusers-format bundle folder (transformer/, vae/, text_encoder/, tokenizer/), a "
        "distilled artifact folder, 'bundled:shapes' for the tiny teacher shipped in the "
        "package, or a hub id (the only case that downloads).",
    )
    base: str = doc(
        "",
        "For a distilled artifact: its base model (teacher, VAE, text encoder) when the one it "
        "recorded is not found (--base-model); empty = the recorded one.",
    )
    backbone: str = doc("wan", "Transformer family: 'wan' or 'hunyuanvideo'.")
    dtype: str = doc(
        "auto", "Compute dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16'."
    )
    attention: str = doc(
        "auto",
        "Attention backend: 'auto' (flash-attn on CUDA if installed, else SDPA), 'native', 'flash'.",
    )
    text_max_length: int = doc(512, "Text tokens kept per prompt (padding and truncation length).")
    vae_spatial_factor: int = doc(8, "VAE spatial downsampling factor.")
    vae_temporal_factor: int = doc(
        4, "VAE temporal downsampling factor (frame counts must be k*factor+1)."
    )
    patch_size: tuple[int, int, int] = doc(
        (1, 2, 2), "Transformer patch size (t, h, w) in latent cells."
    )
    fps: int = doc(16, "Frames per second of decoded videos.")

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, ("wan", "hunyuanvideo"))
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("attention", self.attention, ("auto", "native", "flash"))
        _range("text_max_length", self.text_max_length, 1, 4096)
        _range("vae_spatial_factor", self.vae_spatial_factor, 1, 64)
        _range("vae_temporal_factor", self.vae_temporal_factor, 1, 16)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(
                f"patch_size={self.patch_size!r} must be three positive integers (t, h, w)"
            )
        _range("fps", self.fps, 1, 240)


@dataclass(frozen=True)
class MethodConfig:
    shift: float = doc(17.0, "Flow shift s of the training grid: sigma(u) = s*u / (1 + (s-1)*u).")
    grid_points: int = doc(
        50, "Number N of Euler grid points sigma_k = sigma((k+1)/N), k = 0..N-1."
    )
    split: int = doc(
        34,
        "Expert boundary index b: SemE trains on k in b+1..N-1, DetE on 0..b; route sigma > sigma_b to SemE.",
    )
    guidance: str = doc(
        "cfg", "Teacher guidance: 'cfg' (two passes, Wan) or 'embedded' (one pass, HunyuanVideo)."
    )
    cfg_scale: float = doc(5.0, "w in v_T = v(c) + w * (v(c) - v(null)); classic scale = w + 1.")
    embedded_guidance: float = doc(
        6016.0, "Embedded guidance input (HunyuanVideo) for teacher, student and target."
    )
    consistency_loss: str = doc("pseudo_huber", "'pseudo_huber' (reference) or 'l2' (paper).")
    huber_c: float = doc(0.001, "Pseudo-Huber constant c.")
    tc_weight: float = doc(1.0, "lambda_tc: weight of the temporal-coherence loss (stage 1 only).")
    tc_stride: int = doc(3, "Latent-frame stride l of the temporal-coherence loss.")
    adv_weight: float = doc(0.1, "lambda_adv: weight of the adversarial block (stage 2 only).")
    gen_scale: float = doc(
        5.0,
        "Factor on L_G inside the adversarial block: lambda_adv * (gen_scale * L_G + lambda_fm * L_FM).",
    )
    fm_weight: float = doc(
        10.0, "lambda_fm: weight of the feature-matching loss inside the adversarial block."
    )
    ema_decay: float = doc(
        0.0, "EMA decay of the target network; 0 = the current student (reference)."
    )
    disc_hidden: int = doc(1024, "Channels of each discriminator head.")
    tap_every: int = doc(2, "Discriminator taps after every n-th block.")

    def __post_init__(self) -> None:
        _range("shift", self.shift, 1e-3, 1e3)
        _range("grid_points", self.grid_points, 2, 10000)
        _range("split", self.split, -1, self.grid_points - 2)
        _choice("guidance", self.guidance, ("cfg", "embedded"))
        _range("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _range("embedded_guidance", self.embedded_guidance, 0.0, 1e5)
        _choice("consistency_loss", self.consistency_loss, ("pseudo_huber", "l2"))
        _range("huber_c", self.huber_c, 1e-12, 10.0)
        _range("tc_weight", self.tc_weight, 0.0, 1e4)
        _range("tc_stride", self.tc_stride, 1, 1000)
        _range("adv_weight", self.adv_weight, 0.0, 1e4)
        _range("gen_scale", self.gen_scale, 0.0, 1e4)
        _range("fm_weight", self.fm_weight, 0.0, 1e4)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay!r} is out of range: allowed [0, 1)")
        _range("disc_hidden", self.disc_hidden, 32, 65536)
        if self.disc_hidden % 32:
            raise ConfigError(
                f"disc_hidden={self.disc_hidden} must be a multiple of 32 (GroupNorm(32))"
            )
        _range("tap_every", self.tap_every, 1, 1000)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = doc(128, "LoRA rank r of the detail expert.")
    alpha: float = doc(256.0, "LoRA alpha (scale = alpha / rank).")
    target_modules: tuple[str, ...] = doc(
        ("to_q", "to_k", "to_v", "to_out.0"), "Attention projections that get LoRA."
    )
    dropout: float = doc(0.0, "LoRA dropout.")

    def __post_init__(self) -> None:
        _range("rank", self.rank, 1, 4096)
        _range("alpha", self.alpha, 1e-6, 1e6)
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name at least one module, e.g. to_q")
        _range("dropout", self.dropout, 0.0, 0.99)


@dataclass(frozen=True)
class DataConfig:
    input: str = doc(
        "",
        "Raw videos: a manifest (JSONL/CSV/parquet with path, caption) or a folder with .txt sidecars; local or a pyarrow URI.",
    )
    latents: str = doc("", "Folder of ingested parquet shards + manifest.json (parquet mode).")
    mode: str = doc(
        "online", "'online' (ingest streams into training) or 'parquet' (read pre-encoded shards)."
    )
    num_frames: int = doc(81, "Frames per clip (k * vae_temporal_factor + 1).")
    height: int = doc(480, "Clip height in pixels.")
    width: int = doc(832, "Clip width in pixels.")
    target_fps: float = doc(
        0.0, "Resample clips to this fps; 0 = stride frames to cover the whole clip."
    )
    clips_per_video: int = doc(1, "Clips taken from each video (evenly spaced).")
    empty_prompt_prob: float = doc(
        0.1, "Probability of replacing a caption with the empty prompt in training."
    )
    posterior: str = doc(
        "sample", "VAE latent: 'sample' the posterior (reference) or take its 'mean'."
    )

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("online", "parquet"))
        _range("num_frames", self.num_frames, 1, 10000)
        _range("height", self.height, 8, 16384)
        _range("width", self.width, 8, 16384)
        _range("target_fps", self.target_fps, 0.0, 1000.0)
        _range("clips_per_video", self.clips_per_video, 1, 10000)
        _range("empty_prompt_prob", self.empty_prompt_prob, 0.0, 1.0)
        _choice("posterior", self.posterior, ("sample", "mean"))


@dataclass(frozen=True)
class IngestConfig:
    out: str = doc(
        "",
        "Output folder for parquet shards, manifest.json and rejects (default runs/<name>/latents).",
    )
    encode_batch_size: int = doc(4, "Clips per VAE/text-encoder batch.")
    encode_actors: int = doc(1, "Encoder actors in the pool.")
    actor_cpus: float = doc(
        0.5, "CPUs per encoder actor (fractional avoids the 2-CPU Ray Data deadlock)."
    )
    actor_gpus: float | str = doc(
        "auto", "GPUs per encoder actor: 'auto' (1 when the cluster has GPUs, else 0) or a number."
    )
    decode_cpus: float = doc(0.5, "CPUs per decode task.")
    rows_per_shard: int = doc(64, "Clips per parquet shard.")

    def __post_init__(self) -> None:
        _range("encode_batch_size", self.encode_batch_size, 1, 4096)
        _range("encode_actors", self.encode_actors, 1, 1024)
        _range("actor_cpus", self.actor_cpus, 0.01, 256)
        if self.actor_gpus != "auto":
            _coerce("actor_gpus", self.actor_gpus, float)
            _range("actor_gpus", self.actor_gpus, 0.0, 8)
        _range("decode_cpus", self.decode_cpus, 0.01, 256)
        _range("rows_per_shard", self.rows_per_shard, 1, 1_000_000)


@dataclass(frozen=True)
class TrainConfig:
    stage: str = doc(
        "both", "'semantic', 'detail' or 'both' (semantic, then detail from its checkpoint)."
    )
    out: str = doc(
        "runs", "Root folder of run directories (local path or a pyarrow URI for checkpoints)."
    )
    run_name: str = doc(
        "", "Run name; re-running the same name resumes. Default: the experiment name."
    )
    init_from: str = doc(
        "", "For stage 'detail' alone: the semantic artifact folder to start from."
    )
    steps_semantic: int = doc(1000, "Optimiser steps of stage 1.")
    steps_detail: int = doc(1000, "Optimiser steps of stage 2.")
    lr_semantic: float = doc(1e-6, "Stage-1 learning rate (constant).")
    lr_detail: float = doc(5e-6, "Stage-2 generator learning rate (constant).")
    lr_disc: float = doc(1e-5, "Discriminator learning rate.")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas of the student.")
    disc_betas: tuple[float, float] = doc((0.0, 0.999), "AdamW betas of the discriminator.")
    adam_eps: float = doc(1e-8, "AdamW epsilon.")
    weight_decay: float = doc(1e-3, "AdamW weight decay (student and discriminator).")
    grad_clip: float = doc(1.0, "Gradient-norm clip.")
    global_batch: int = doc(
        4, "Samples per optimiser step across all workers and accumulation steps."
    )
    grad_accum: int = doc(1, "Gradient-accumulation micro-steps per optimiser step.")
    num_workers: int = doc(1, "Ray Train workers.")
    use_gpu: bool | str = doc(
        "auto", "'auto' (a GPU per worker when the cluster has GPUs), true or false."
    )
    cpus_per_worker: float = doc(1.0, "CPUs per Ray Train worker.")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage (0-3).")
    offload: bool = doc(
        False, "DeepSpeed CPU offload of optimiser state (and parameters at stage 3)."
    )
    activation_checkpointing: bool = doc(True, "Recompute every transformer block in backward.")
    checkpoint_every: int = doc(100, "Steps between checkpoints (0 = only at the end).")
    keep_checkpoints: int = doc(2, "Checkpoints kept (best by checkpoint_metric).")
    checkpoint_metric: str = doc(
        "val/score", "Validation metric that ranks checkpoints (higher is better)."
    )
    val_every: int = doc(
        0,
        "Steps between validations (0 = only at checkpoints); step 0 (the untrained student) "
        "and the last step are always validated.",
    )
    val_prompts: int = doc(
        2, "Validation prompts taken from the data's captions when sample.prompts is empty."
    )
    log_every: int = doc(10, "Steps between metric logs.")
    seed: int = doc(0, "Seed of every random draw of the run.")
    max_failures: int = doc(0, "Worker-group restarts allowed (Ray Train FailureConfig).")

    def __post_init__(self) -> None:
        _choice("stage", self.stage, ("semantic", "detail", "both"))
        for name in ("steps_semantic", "steps_detail"):
            _range(name, getattr(self, name), 1, 10**9)
        for name in ("lr_semantic", "lr_detail", "lr_disc"):
            _range(name, getattr(self, name), 0.0, 1.0)
        for name in ("betas", "disc_betas"):
            val = getattr(self, name)
            if len(val) != 2 or not all(0.0 <= b < 1.0 for b in val):
                raise ConfigError(f"{name}={val!r} must be two numbers in [0, 1)")
        _range("adam_eps", self.adam_eps, 0.0, 1.0)
        _range("weight_decay", self.weight_decay, 0.0, 10.0)
        _range("grad_clip", self.grad_clip, 0.0, 1e6)
        _range("global_batch", self.global_batch, 1, 10**6)
        _range("grad_accum", self.grad_accum, 1, 10**4)
        _range("num_workers", self.num_workers, 1, 10**4)
        _auto_or_bool(self, "use_gpu")
        _range("cpus_per_worker", self.cpus_per_worker, 0.01, 256)
        _choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        _range("checkpoint_every", self.checkpoint_every, 0, 10**9)
        _range("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        _range("val_every", self.val_every, 0, 10**9)
        _range("val_prompts", self.val_prompts, 1, 1000)
        _range("log_every", self.log_every, 1, 10**9)
        _range("max_failures", self.max_failures, -1, 1000)


@dataclass(frozen=True)
class SampleConfig:
    steps: int = doc(4, "Student sampling steps (any n >= 2; split evenly between the experts).")
    sigma_preset: str = doc(
        "", "Reference sigma list instead of the even-split rule: '', 'wan-6', 'hunyuan-4'."
    )
    teacher_steps: int = doc(50, "Teacher Euler steps (with guidance) for comparisons.")
    eval_steps: tuple[int, ...] = doc(
        (2, 4, 8), "Student step counts evaluated against the teacher."
    )
    prompts: tuple[str, ...] = doc(
        (), "Fixed validation prompts (empty: the data's held-out captions)."
    )
    seeds: tuple[int, ...] = doc((0,), "Fixed validation seeds.")
    num_frames: int = doc(0, "Frames sampled (0 = data.num_frames).")
    height: int = doc(0, "Sample height (0 = data.height).")
    width: int = doc(0, "Sample width (0 = data.width).")

    def __post_init__(self) -> None:
        _range("steps", self.steps, 2, 1000)
        _choice("sigma_preset", self.sigma_preset, ("", "wan-6", "hunyuan-4"))
        _range("teacher_steps", self.teacher_steps, 1, 10000)
        for n in self.eval_steps:
            _range("eval_steps", n, 2, 1000)
        _range("num_frames", self.num_frames, 0, 10000)
        _range("height", self.height, 0, 16384)
        _range("width", self.width, 0, 16384)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = doc(True, "Record runs in MLflow.")
    uri: str = doc("", "MLflow tracking URI; empty = sqlite:///<run dir>/mlflow.db.")
    experiment: str = doc("dcm", "MLflow experiment name.")
    register_as: str = doc(
        "",
        "Registered-model name: a finished distill run exports its model (diffusers folder), "
        "logs it as an MLflow pyfunc and registers a new version under this name; empty = no.",
    )


@dataclass(frozen=True)
class RayConfig:
    address: str = doc(
        "", "Cluster address; empty = RAY_ADDRESS / the job's cluster, else start a local one."
    )
    num_cpus: int = doc(0, "CPUs of a local cluster (0 = detect).")
    num_gpus: int = doc(-1, "GPUs of a local cluster (-1 = detect).")
    object_store_mb: int = doc(
        0, "Object store of a local cluster in MiB; 0 = sized by Ray from the machine's memory."
    )
    dashboard: bool = doc(True, "Start the dashboard of a local cluster on 127.0.0.1.")
    dashboard_port: int = doc(8265, "Dashboard port of a local cluster.")
    auth_mode: str = doc("disabled", "RAY_AUTH_MODE of a local cluster: 'disabled' or 'token'.")

    def __post_init__(self) -> None:
        _range("num_cpus", self.num_cpus, 0, 10**5)
        _range("num_gpus", self.num_gpus, -1, 10**4)
        if self.object_store_mb:
            _range("object_store_mb", self.object_store_mb, 64, 10**7)
        _range("dashboard_port", self.dashboard_port, 1024, 65535)
        _choice("auth_mode", self.auth_mode, ("disabled", "token"))


@dataclass(frozen=True)
class SweepConfig:
    space: dict[str, Any] = doc(
        {},
        "Search space: dotted config key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]} (randint: hi inclusive).",
    )
    variants: dict[str, Any] = doc(
        {},
        "Named sets of dotted overrides (e.g. the ablation's 'single-cm', 'dcm'), crossed with the space as one more dimension.",
    )
    searcher: str = doc("grid", "'grid', 'random' or 'optuna' (model-based, TPE).")
    num_samples: int = doc(1, "Trials (random/optuna) or repeats of the grid.")
    metric: str = doc("val/score", "Metric the scheduler and the best-config choice use.")
    mode: str = doc("max", "'max' or 'min'.")
    asha: bool = doc(True, "Early-stop weak trials with ASHA.")
    grace_period: int = doc(1, "ASHA grace period in reports.")
    reduction_factor: int = doc(2, "ASHA reduction factor (keep the top 1/rf at each rung).")
    teacher_baseline: bool = doc(
        False,
        "Also score the teacher at sample.teacher_steps on the validation prompts and seeds (shapes world), as the reference line of the report.",
    )
    max_concurrent: int = doc(1, "Trials running at once.")
    trial_cpus: float = doc(1.0, "CPUs per trial worker.")
    trial_gpus: float = doc(0.0, "GPUs per trial worker.")

    def __post_init__(self) -> None:
        _choice("searcher", self.searcher, ("grid", "random", "optuna"))
        _range("num_samples", self.num_samples, 1, 10**6)
        _choice("mode", self.mode, ("max", "min"))
        _range("grace_period", self.grace_period, 1, 10**6)
        _range("reduction_factor", self.reduction_factor, 2, 100)
        _range("max_concurrent", self.max_concurrent, 1, 10**4)
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                raise ConfigError(
                    f"variants.{name} must be a mapping of dotted keys to values, got {overrides!r}"
                )
        _range("trial_cpus", self.trial_cpus, 0.01, 256)
        _range("trial_gpus", self.trial_gpus, 0.0, 64)


@dataclass(frozen=True)
class ServeConfig:
    host: str = doc("127.0.0.1", "HTTP host.")
    port: int = doc(8000, "HTTP port.")
    default_steps: int = doc(4, "Steps when a request gives none.")
    min_steps: int = doc(2, "Smallest steps a request may ask.")
    max_steps: int = doc(8, "Largest steps a request may ask.")
    max_frames: int = doc(81, "Largest frame count a request may ask.")
    max_height: int = doc(480, "Largest height a request may ask.")
    max_width: int = doc(832, "Largest width a request may ask.")
    max_prompt_chars: int = doc(2000, "Longest prompt accepted.")
    api_key_env: str = doc("", "Environment variable holding the API key; empty = no auth.")
    request_timeout_s: float = doc(300.0, "Per-request timeout.")
    max_queued: int = doc(16, "Requests waiting per replica before 503 + Retry-After.")
    min_replicas: int = doc(1, "Autoscaling minimum replicas.")
    max_replicas: int = doc(2, "Autoscaling maximum replicas.")
    target_ongoing_requests: float = doc(1.0, "Autoscaling target of ongoing requests per replica.")
    replica_cpus: float = doc(0.5, "CPUs per generator replica.")
    replica_gpus: float | str = doc(
        "auto",
        "GPUs per generator replica: 'auto' (1 when the cluster has GPUs, else 0) or a number (0.5 packs two replicas per GPU).",
    )
    device: str = doc(
        "auto",
        "Generator device: 'auto' (cuda when Ray gave the replica a GPU, else cpu), 'cpu', 'cuda'.",
    )
    variants: dict[str, str] = doc(
        {},
        "Extra models served by multiplexing: name -> distilled artifact or bundle folder; a request picks one with its 'model' field.",
    )
    max_models_per_replica: int = doc(
        3, "Variants kept loaded per replica (least recently used are unloaded)."
    )
    max_batch_size: int = doc(4, "Concurrent same-shape requests generated as one batch.")
    batch_wait_timeout_s: float = doc(
        0.0,
        "How long a batch waits for more requests after its first; 0 = take those already waiting (they pile up while a batch runs), so a lone request never waits.",
    )
    max_ongoing_requests: int = doc(
        4, "Requests a generator replica holds at once (>= max_batch_size so batches can form)."
    )
    upscale_delay_s: float = doc(
        5.0, "Autoscaling: load must stay above target this long before adding a replica."
    )
    downscale_delay_s: float = doc(
        60.0, "Autoscaling: load must stay below target this long before removing a replica."
    )
    look_back_period_s: float = doc(
        30.0, "Autoscaling: window over which ongoing requests are averaged."
    )
    metrics_interval_s: float = doc(
        10.0,
        "Autoscaling: how often handles and replicas report load (Serve's default 10 s; lower reacts faster).",
    )
    retry_after_s: int = doc(5, "Retry-After seconds sent with a 503 when the queue is full.")
    job_store: str = doc(
        "",
        "Where /v1/videos jobs keep their JSON records and videos: a folder or a pyarrow/fsspec URI (s3://bucket/prefix); empty = ~/.cache/dcm/serve-jobs. Replicas on several nodes need a shared one.",
    )
    job_ttl_s: float = doc(86400.0, "Seconds a finished job and its video are kept.")
    max_queued_jobs: int = doc(64, "Jobs waiting for a generator before POST /v1/videos gets 503.")
    job_lease_s: float = doc(
        60.0,
        "A running job whose replica has not written a heartbeat for this long is retried once, then failed.",
    )

    def __post_init__(self) -> None:
        _range("port", self.port, 1, 65535)
        _range("min_steps", self.min_steps, 2, 1000)
        _range("max_steps", self.max_steps, self.min_steps, 1000)
        _range("default_steps", self.default_steps, self.min_steps, self.max_steps)
        _range("max_frames", self.max_frames, 1, 10000)
        _range("max_prompt_chars", self.max_prompt_chars, 1, 10**6)
        _range("request_timeout_s", self.request_timeout_s, 0.1, 86400)
        _range("max_queued", self.max_queued, 1, 10**6)
        _range("min_replicas", self.min_replicas, 0, 10**4)
        _range("max_replicas", self.max_replicas, max(1, self.min_replicas), 10**4)
        _range("target_ongoing_requests", self.target_ongoing_requests, 0.01, 10**4)
        _range("replica_cpus", self.replica_cpus, 0.0, 256)
        if isinstance(self.replica_gpus, str):
            _choice("replica_gpus", self.replica_gpus, ("auto",))
        else:
            _range("replica_gpus", self.replica_gpus, 0.0, 64)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for name, path in self.variants.items():
            if (
                not isinstance(name, str)
                or not name.strip()
                or not isinstance(path, str)
                or not path
            ):
                raise ConfigError(
                    f"variants entry {name!r}: {path!r} must map a name to a model folder"
                )
        _range("max_models_per_replica", self.max_models_per_replica, 1, 1000)
        _range("max_batch_size", self.max_batch_size, 1, 1024)
        _range("batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0, 60.0)
        _range("max_ongoing_requests", self.max_ongoing_requests, self.max_batch_size, 10**4)
        _range("upscale_delay_s", self.upscale_delay_s, 0.0, 86400)
        _range("downscale_delay_s", self.downscale_delay_s, 0.0, 86400)
        _range("look_back_period_s", self.look_back_period_s, 0.1, 86400)
        _range("metrics_interval_s", self.metrics_interval_s, 0.1, 3600)
        _range("retry_after_s", self.retry_after_s, 0, 3600)
        _range("job_ttl_s", self.job_ttl_s, 1.0, 10**8)
        _range("max_queued_jobs", self.max_queued_jobs, 0, 10**6)
        _range("job_lease_s", self.job_lease_s, 1.0, 86400)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "ingest": IngestConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "tracking": TrackingConfig,
    "ray": RayConfig,
    "sweep": SweepConfig,
    "serve": ServeConfig,
}


@dataclass(frozen=True)
class Config:
    name: str = doc("dcm", "Experiment name (run folder and MLflow run name).")
    preset: str = doc("shapes-tiny", "Preset the file starts from.")
    model: ModelConfig = doc(ModelConfig(), "Model bundle and backbone.")
    method: MethodConfig = doc(MethodConfig(), "The DCM maths (METHOD.md).")
    lora: LoraConfig = doc(LoraConfig(), "Detail-expert LoRA.")
    data: DataConfig = doc(DataConfig(), "Training clips.")
    ingest: IngestConfig = doc(IngestConfig(), "Ray Data ingest.")
    train: TrainConfig = doc(TrainConfig(), "Ray Train + DeepSpeed distillation.")
    sample: SampleConfig = doc(SampleConfig(), "Sampling and evaluation.")
    tracking: TrackingConfig = doc(TrackingConfig(), "MLflow.")
    ray: RayConfig = doc(RayConfig(), "Ray cluster.")
    sweep: SweepConfig = doc(SweepConfig(), "Ray Tune sweep.")
    serve: ServeConfig = doc(ServeConfig(), "Ray Serve endpoint.")

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        if d.num_frames % m.vae_temporal_factor != 1 % m.vae_temporal_factor:
            k = d.num_frames // m.vae_temporal_factor
            raise ConfigError(
                f"data.num_frames={d.num_frames} must be k*{m.vae_temporal_factor}+1 "
                f"(e.g. {k * m.vae_temporal_factor + 1}) for the VAE's temporal factor"
            )
        for axis, p in (("height", m.patch_size[1]), ("width", m.patch_size[2])):
            size, unit = getattr(d, axis), m.vae_spatial_factor * p
            if size % unit:
                raise ConfigError(
                    f"data.{axis}={size} must be divisible by {unit} "
                    f"(VAE factor {m.vae_spatial_factor} x patch {p})"
                )
        if self.method.split < 0 and self.train.stage != "semantic":
            raise ConfigError(
                "method.split=-1 is one consistency model with no detail expert: "
                f"set train.stage=semantic (got '{self.train.stage}')"
            )
        if m.backbone == "hunyuanvideo" and self.method.guidance != "embedded":
            raise ConfigError(
                "method.guidance must be 'embedded' for model.backbone='hunyuanvideo'"
            )
        t = self.train
        if t.global_batch % (t.num_workers * t.grad_accum):
            raise ConfigError(
                f"train.global_batch={t.global_batch} must be divisible by "
                f"train.num_workers x train.grad_accum = {t.num_workers * t.grad_accum}"
            )
        if self.sample.sigma_preset and self.sample.steps != len(
            SIGMA_PRESETS[self.sample.sigma_preset]
        ):
            n = len(SIGMA_PRESETS[self.sample.sigma_preset])
            raise ConfigError(
                f"sample.steps={self.sample.steps} does not match sample.sigma_preset="
                f"'{self.sample.sigma_preset}' ({n} steps): set sample.steps={n} or clear the preset"
            )

    # ------------------------------------------------------------ conveniences
    @property
    def run_name(self) -> str:
        return self.train.run_name or self.name

    @property
    def latent_frames(self) -> int:
        return (self.data.num_frames - 1) // self.model.vae_temporal_factor + 1

    def to_dict(self) -> dict[str, Any]:
        return plain_data(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (MLflow params, sweep keys)."""
        out: dict[str, Any] = {}
        for key, val in self.to_dict().items():
            if isinstance(val, dict) and key != "space":
                for sub, v in val.items():
                    out[f"{key}.{sub}"] = v
            else:
                out[key] = val
        return out

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted keys set, validated again: cfg.replace(**{"method.split": 30})."""
        return from_dict(_merge(self.to_dict(), _unflatten(dotted)))


# Reference sigma lists of METHOD.md section 7 (the sampler appends the final 0).
SIGMA_PRESETS: dict[str, tuple[float, ...]] = {
    "wan-6": (1.0, 0.992, 0.982, 0.949, 0.905, 0.81),
    "hunyuan-4": (1.0, 0.992, 0.9818, 0.9124),
}


# ---------------------------------------------------------------- presets
def _wan(path: str) -> dict[str, Any]:
    return {"model": {"path": path, "backbone": "wan", "text_max_length": 512, "fps": 16}}


PRESETS: dict[str, dict[str, Any]] = {
    # METHOD.md values; dataclass defaults are the Wan2.1 reference, so these stay short.
    "wan2.1-t2v-1.3b": _wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "wan2.1-t2v-14b": _wan("Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    "hunyuanvideo": {
        "model": {
            "path": "hunyuanvideo-community/HunyuanVideo",
            "backbone": "hunyuanvideo",
            "text_max_length": 256,
            "fps": 24,
        },
        "method": {"split": 37, "guidance": "embedded", "fm_weight": 1.0},
        # no prompt dropout: HunyuanVideo has no CFG pass to learn the empty prompt for
        "data": {"num_frames": 129, "height": 720, "width": 1280, "empty_prompt_prob": 0.0},
        "train": {"global_batch": 6},
        "serve": {"max_frames": 129, "max_height": 720, "max_width": 1280},
    },
    # The synthetic shapes world (dcm/shapes): 17 frames of 64x64 -> 5 x 16 x 16 latents
    # (VAE factor 4), patch 1x2x2 -> 320 tokens: small enough to distil on two CPU cores.
    "shapes-tiny": {
        "model": {
            "path": "bundled:shapes",
            "backbone": "wan",
            "text_max_length": 24,
            "vae_spatial_factor": 4,
            "patch_size": (1, 2, 2),
            "fps": 8,
        },
        # Guidance w = 2 (classic 3): the bundled teacher's best scale at 50 steps, and a
        # smoother consistency target: at w = 5 the untrained student starts twice as far
        # from its teacher and semantic training does not close the gap (docs/QUALITY.md).
        "method": {"shift": 3.0, "disc_hidden": 64, "cfg_scale": 2.0},
        "lora": {"rank": 8, "alpha": 16.0},
        "data": {"num_frames": 17, "height": 64, "width": 64},
        "ingest": {"encode_batch_size": 8, "rows_per_shard": 64},
        "train": {
            "steps_semantic": 200,
            "steps_detail": 200,
            "lr_semantic": 1e-4,
            "lr_detail": 1e-4,
            "lr_disc": 1e-4,
            "global_batch": 8,
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "zero_stage": 2,
            "activation_checkpointing": False,
            "checkpoint_every": 100,
            "val_every": 0,
        },
        "serve": {"max_frames": 33, "max_height": 128, "max_width": 128},
    },
}


# ---------------------------------------------------------------- loading
def plain_data(obj: Any) -> Any:
    """``obj`` with every tuple turned into a list, recursively: what YAML/JSON write back."""
    if isinstance(obj, dict):
        return {k: plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    return obj


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if (
            isinstance(val, dict)
            and isinstance(out.get(key), dict)
            and key not in ("space", "variants")
        ):
            out[key] = _merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def _unflatten(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in dotted.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = val
    return out


def all_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(SECTIONS[f.name])]
        else:
            keys.append(f.name)
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = (
        f"; did you mean '{close[0]}'?"
        if close
        else "; run with --dry-run --explain to list the keys"
    )
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against a field's type hint; lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name}={value!r} must have {len(args)} items")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a mapping")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, val in data.items():
        if key not in names:
            raise _unknown(prefix + key)
        if cls is Config and key in SECTIONS:
            kwargs[key] = _build(SECTIONS[key], val, f"{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, val, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        if prefix and not msg.startswith(prefix):
            msg = prefix + msg
        raise ConfigError(msg) from None


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict (already merged over a preset) into a Config."""
    return _build(Config, data, "")


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (presets: {', '.join(PRESETS)})")
    return _merge({"preset": name, "name": name}, copy.deepcopy(PRESETS[name]))


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml value of c)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_file(path: str | Path) -> Any:
    """The parsed content of the YAML file ``path`` ({} when empty); ConfigError when the
    file is missing or is not valid YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: typing.Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Preset <- YAML file <- `--set` overrides, validated into one Config.

    ``base``: a resolved config dict (an artifact's training config) to start from instead
    of a preset, used when neither ``preset`` nor the file names one.
    """
    data: dict[str, Any] = {}
    if path:
        data = read_yaml_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    if base is not None and not preset and not data.get("preset"):
        name = str(base.get("preset") or "shapes-tiny")
        start = _merge(base, {"preset": name})
    else:
        name = preset or data.get("preset") or "shapes-tiny"
        start = preset_dict(name)
    merged = _merge(start, data)
    merged["preset"] = name
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        if parts[0] not in SECTIONS and len(parts) > 1:
            raise _unknown(key)
        merged = _merge(merged, _unflatten({key: value}))
    try:
        return from_dict(merged)
    except ConfigError as err:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{err}{where}") from None


def explain() -> str:
    """Every key with its default and docstring (for `--dry-run --explain`)."""
    lines = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            lines.append(f"{f.name}:  # {f.metadata['doc']}")
            for g in dataclasses.fields(SECTIONS[f.name]):
                default = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                lines.append(f"  {g.name}: {default!r}  # {g.metadata['doc']}")
        else:
            lines.append(f"{f.name}: {f.default!r}  # {f.metadata['doc']}")
    return "\n".join(lines)
