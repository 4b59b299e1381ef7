"""One typed configuration tree for every stage of the platform.

Frozen dataclasses, one per concern, validated by pydantic on construction: each field
declares its type (strict scalars, literal choices, tuples) and, through ``doc(...)``, its
docstring and its rules (``ge``/``le``/``multiple_of``...); ``__post_init__`` holds only
the checks across fields. ``Config`` is the root; named presets
(``PRESETS``) hold the values of METHOD.md; experiment YAML files and ``--set a.b=c``
overrides are deep-merged over a preset by ``load_config``. Unknown keys are errors that
name the closest valid key; bad values name the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic.dataclasses
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.fields import FieldInfo

SEMANTIC = 0  # expert id of the semantic expert (high noise, sigma > sigma_b)
DETAIL = 1  # expert id of the detail expert (low noise, sigma <= sigma_b)
SCHEMA_VERSION = 1  # of the resolved-config dict written next to every artifact


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and what to do."""


# ---------------------------------------------------------------- field types
# Scalars are strict: YAML's 3.0 is not an int, "1" is not a number, 1 is not a boolean;
# an int is accepted (and stored) as a float. Lists from YAML become tuples.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]


def _true_false(value: Any) -> Any:
    # the old spelling of an 'auto'-or-boolean field: the strings 'true' / 'false'
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


Bool = Annotated[bool, Strict()]
Positive = Annotated[Int, Field(ge=1)]
Beta = Annotated[Float, Field(ge=0.0, lt=1.0)]  # an AdamW beta
Filled = Annotated[Str, Field(min_length=1)]
Name = Annotated[Str, Field(pattern=r"\S")]  # not empty, not only spaces
AutoBool = Annotated[Literal["auto"] | Bool, BeforeValidator(_true_false)]


def doc(default: Any, text: str, **rules: Any) -> Any:
    """A field: its default, its docstring (shown by `--dry-run --explain`) and its rules
    (pydantic ``Field`` constraints: ``ge``, ``le``, ``lt``, ``multiple_of``, ``min_length``)."""
    if isinstance(default, (list, dict, set)):
        return Field(default_factory=lambda: copy.deepcopy(default), description=text, **rules)
    return Field(default, description=text, **rules)


_T = typing.TypeVar("_T")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(doc, Field))
def section(cls: type[_T]) -> type[_T]:
    """A frozen dataclass validated by pydantic from its annotations and ``doc`` rules;
    unknown keys and bad values raise a one-line ConfigError naming the field."""
    cls = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as err:
            raise _one_line(type(self), err) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and hasattr(hint, "__pydantic_fields__")


def _range_text(lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    return f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"


def _range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """A bound that depends on another field (the static ones are ``doc`` rules)."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name}={value!r} is out of range: allowed {_range_text(lo, hi)}")


def _bounds(hint: Any, rules: typing.Sequence[Any] = ()) -> str:
    """The allowed interval of a field from its rules and the Annotated parts of its type."""
    found: dict[str, Any] = {}

    def visit(items: typing.Iterable[Any]) -> None:
        for item in items:
            for key in ("ge", "gt", "le", "lt"):
                if getattr(item, key, None) is not None:
                    found[key] = getattr(item, key)
            visit(getattr(item, "metadata", ()) if isinstance(item, FieldInfo) else ())

    visit(rules)
    stack = [hint]
    while stack:  # the Annotated parts of the type, through unions (not into containers)
        h = stack.pop()
        if typing.get_origin(h) is Annotated:
            stack.append(typing.get_args(h)[0])
            visit(typing.get_args(h)[1:])
        elif typing.get_origin(h) in (typing.Union, types.UnionType):
            stack += typing.get_args(h)
    lo, hi = found.get("ge", found.get("gt")), found.get("le", found.get("lt"))
    return _range_text(lo, hi, "gt" in found, "lt" in found)


def _allowed(hint: Any) -> str:
    """What a type accepts, in words: 'an integer', "one of 'a', 'b'", 'a list'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _allowed(args[0])
    if origin in (typing.Union, types.UnionType):
        words = [_allowed(a) for a in args]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if origin is Literal:
        listed = ", ".join(map(repr, args))
        return listed if len(args) == 1 else f"one of {listed}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list"
        return f"a list of {len(args)} items"
    named = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if origin is dict or hint is dict:
        return "a mapping"
    return named.get(hint, getattr(hint, "__name__", str(hint)))


def _has_literal(hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _has_literal(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_has_literal(a) for a in args)
    return origin is Literal


def _leaf(cls: type, loc: tuple[Any, ...]) -> tuple[str, Any, list[Any]]:
    """The dotted name, type and rules of the value an error location points at: a section
    field, a tuple item (``betas[1]``) or a mapping entry (``variants.abl``)."""
    names: list[str] = []
    hint: Any = cls
    rules: list[Any] = []
    for part in loc:
        if _is_section(hint) and part in hint.__pydantic_fields__:
            info = hint.__pydantic_fields__[part]
            names.append(str(part))
            hint, rules = info.annotation, list(info.metadata)
            continue
        bare = hint
        while typing.get_origin(bare) is Annotated:
            bare = typing.get_args(bare)[0]
        origin, args = typing.get_origin(bare), typing.get_args(bare)
        if isinstance(part, int) and origin is tuple:
            names[-1] += f"[{part}]"
            hint, rules = args[0] if args[-1] is Ellipsis else args[min(part, len(args) - 1)], []
        elif origin is dict and "[key]" in loc:  # the key itself is bad
            names[-1] += " key"
            hint, rules = args[0], []
            break
        elif origin is dict:
            names.append(str(part))
            hint, rules = args[1], []
        # else: a union member's tag or a dict key marker: the value stays where it is
    return ".".join(names), hint, rules


def _sentence(cls: type, errors: list[Any]) -> str:
    """One sentence for the first problem: an unknown key (with the closest valid one), a
    value out of range (with the interval), a value of the wrong type (with what is allowed)."""
    for err in errors:
        if err["type"] == "unexpected_keyword_argument":
            return str(_unknown(".".join(map(str, err["loc"])), cls))
    err = errors[0]
    name, hint, rules = _leaf(cls, err["loc"])
    if err["type"] == "value_error":  # a check across fields, raised by __post_init__
        prefix = f"{name}." if name else ""
        return prefix + str(err["ctx"]["error"])
    # a union reports one error per member: prefer the one about the value, not the type
    same = [e for e in errors if _leaf(cls, e["loc"])[0] == name]
    ranged = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    err = next((e for e in same if e["type"] in ranged + ("multiple_of",)), err)
    value, ctx = err["input"], err.get("ctx", {})
    if err["type"] in ranged:
        return f"{name}={value!r} is out of range: allowed {_bounds(hint, rules)}"
    if err["type"] == "multiple_of":
        return f"{name}={value!r} must be a multiple of {ctx['multiple_of']}"
    if err["type"] in ("string_too_short", "string_pattern_mismatch"):
        return f"{name}={value!r} must not be empty"
    if err["type"] == "too_short" and "min_length" in ctx:
        n = ctx["min_length"]
        return f"{name}={value!r} must have at least {n} item{'s' if n > 1 else ''}"
    if err["type"] == "missing" and isinstance(err["loc"][-1], int):
        # a fixed-length tuple one item short: name the tuple, not the missing item
        name, hint, _ = _leaf(cls, err["loc"][:-1])
    if err["type"] in ("dataclass_type", "dataclass_args_type") and _is_section(hint):
        return f"'{name}' must be a mapping of keys to values, got {value!r}"
    if _has_literal(hint):
        return f"{name}={value!r} is not allowed: choose {_allowed(hint)}"
    return f"{name}={value!r} must be {_allowed(hint)}"


def _one_line(cls: type, err: ValidationError) -> ConfigError:
    return ConfigError(_sentence(cls, err.errors(include_url=False)))


# ---------------------------------------------------------------- sections
@section
class ModelConfig:
    path: Str = doc(
        "bundled:shapes",
        "Diffusers-format bundle folder (transformer/, vae/, text_encoder/, tokenizer/), a "
        "distilled artifact folder, 'bundled:shapes' for the tiny teacher shipped in the "
        "package, or a hub id (the only case that downloads).",
    )
    base: Str = doc(
        "",
        "For a distilled artifact: its base model (teacher, VAE, text encoder) when the one it "
        "recorded is not found (--base-model); empty = the recorded one.",
    )
    backbone: Literal["wan", "hunyuanvideo"] = doc(
        "wan", "Transformer family: 'wan' or 'hunyuanvideo'."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "auto", "Compute dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16'."
    )
    attention: Literal["auto", "native", "flash"] = doc(
        "auto",
        "Attention backend: 'auto' (flash-attn on CUDA if installed, else SDPA), 'native', 'flash'.",
    )
    text_max_length: Int = doc(
        512, "Text tokens kept per prompt (padding and truncation length).", ge=1, le=4096
    )
    vae_spatial_factor: Int = doc(8, "VAE spatial downsampling factor.", ge=1, le=64)
    vae_temporal_factor: Int = doc(
        4, "VAE temporal downsampling factor (frame counts must be k*factor+1).", ge=1, le=16
    )
    patch_size: tuple[Positive, Positive, Positive] = doc(
        (1, 2, 2), "Transformer patch size (t, h, w) in latent cells."
    )
    fps: Int = doc(16, "Frames per second of decoded videos.", ge=1, le=240)


@section
class MethodConfig:
    shift: Float = doc(
        17.0, "Flow shift s of the training grid: sigma(u) = s*u / (1 + (s-1)*u).", ge=1e-3, le=1e3
    )
    grid_points: Int = doc(
        50, "Number N of Euler grid points sigma_k = sigma((k+1)/N), k = 0..N-1.", ge=2, le=10000
    )
    split: Int = doc(
        34,
        "Expert boundary index b: SemE trains on k in b+1..N-1, DetE on 0..b; route sigma > "
        "sigma_b to SemE; -1 = one consistency model (no detail expert); at most N-2.",
        ge=-1,
    )
    guidance: Literal["cfg", "embedded"] = doc(
        "cfg", "Teacher guidance: 'cfg' (two passes, Wan) or 'embedded' (one pass, HunyuanVideo)."
    )
    cfg_scale: Float = doc(
        5.0, "w in v_T = v(c) + w * (v(c) - v(null)); classic scale = w + 1.", ge=0.0, le=100.0
    )
    embedded_guidance: Float = doc(
        6016.0,
        "Embedded guidance input (HunyuanVideo) for teacher, student and target.",
        ge=0.0,
        le=1e5,
    )
    consistency_loss: Literal["pseudo_huber", "l2"] = doc(
        "pseudo_huber", "'pseudo_huber' (reference) or 'l2' (paper)."
    )
    huber_c: Float = doc(0.001, "Pseudo-Huber constant c.", ge=1e-12, le=10.0)
    tc_weight: Float = doc(
        1.0, "lambda_tc: weight of the temporal-coherence loss (stage 1 only).", ge=0.0, le=1e4
    )
    tc_stride: Int = doc(3, "Latent-frame stride l of the temporal-coherence loss.", ge=1, le=1000)
    adv_weight: Float = doc(
        0.1, "lambda_adv: weight of the adversarial block (stage 2 only).", ge=0.0, le=1e4
    )
    gen_scale: Float = doc(
        5.0,
        "Factor on L_G inside the adversarial block: lambda_adv * (gen_scale * L_G + lambda_fm * L_FM).",
        ge=0.0,
        le=1e4,
    )
    fm_weight: Float = doc(
        10.0,
        "lambda_fm: weight of the feature-matching loss inside the adversarial block.",
        ge=0.0,
        le=1e4,
    )
    ema_decay: Float = doc(
        0.0, "EMA decay of the target network; 0 = the current student (reference).", ge=0.0, lt=1.0
    )
    disc_hidden: Int = doc(
        1024,
        "Channels of each discriminator head (a multiple of 32: GroupNorm(32)).",
        ge=32,
        le=65536,
        multiple_of=32,
    )
    tap_every: Int = doc(2, "Discriminator taps after every n-th block.", ge=1, le=1000)
    semantic_target: Literal["bootstrap", "teacher"] = doc(
        "bootstrap",
        "SemE consistency target: 'bootstrap' (the student one teacher step on, reference) "
        "or 'teacher' (the teacher's own grid steps down to sigma_b).",
    )
    detail_target: Literal["bootstrap", "teacher"] = doc(
        "bootstrap",
        "DetE consistency target: 'bootstrap' (reference) or 'teacher' (the teacher's own "
        "grid steps down to sigma_min; METHOD.md section 4 step 4').",
    )
    top_share: Float = doc(
        0.0,
        "Share of the consistency samples that start at the training expert's top grid index "
        "(the DetE's is sigma_b: the one jump of a 2-step sample); the rest is uniform over "
        "the expert's indices. 0 = uniform (reference).",
        ge=0.0,
        lt=1.0,
    )
    detail_inputs: Literal["data", "semantic"] = doc(
        "data",
        "Where the DetE's training states x_k come from: 'data' (noised clips, reference) or "
        "'semantic' (the SemE's sampling steps from pure noise to sigma_b, then the guided "
        "teacher's grid steps down to sigma_k: the states sampling hands the DetE; METHOD.md "
        "section 6, docs/QUALITY.md section 12).",
    )
    adv_real: Literal["target", "data"] = doc(
        "target",
        "The discriminator's 'real' sample: 'target' (the consistency target, reference) or "
        "'data' (the training clip, re-noised to sigma_a with the same eps2; METHOD.md "
        "section 6, docs/QUALITY.md section 13).",
    )

    def __post_init__(self) -> None:
        _range("split", self.split, -1, self.grid_points - 2)
        if self.detail_inputs == "semantic" and self.split < 0:
            raise ConfigError(
                "method.detail_inputs='semantic' needs two experts: set method.split >= 0 "
                "or method.detail_inputs='data'"
            )


@section
class LoraConfig:
    rank: Int = doc(128, "LoRA rank r of the detail expert.", ge=1, le=4096)
    alpha: Float = doc(256.0, "LoRA alpha (scale = alpha / rank).", ge=1e-6, le=1e6)
    target_modules: tuple[Str, ...] = doc(
        ("to_q", "to_k", "to_v", "to_out.0"),
        "Attention projections that get LoRA (at least one).",
        min_length=1,
    )
    dropout: Float = doc(0.0, "LoRA dropout.", ge=0.0, le=0.99)


@section
class DataConfig:
    input: Str = doc(
        "",
        "Raw videos: a manifest (JSONL/CSV/parquet with path, caption) or a folder with .txt sidecars; local or a pyarrow URI.",
    )
    latents: Str = doc("", "Folder of ingested parquet shards + manifest.json (parquet mode).")
    mode: Literal["online", "parquet"] = doc(
        "online", "'online' (ingest streams into training) or 'parquet' (read pre-encoded shards)."
    )
    num_frames: Int = doc(81, "Frames per clip (k * vae_temporal_factor + 1).", ge=1, le=10000)
    height: Int = doc(480, "Clip height in pixels.", ge=8, le=16384)
    width: Int = doc(832, "Clip width in pixels.", ge=8, le=16384)
    target_fps: Float = doc(
        0.0,
        "Resample clips to this fps; 0 = stride frames to cover the whole clip.",
        ge=0.0,
        le=1000.0,
    )
    clips_per_video: Int = doc(1, "Clips taken from each video (evenly spaced).", ge=1, le=10000)
    empty_prompt_prob: Float = doc(
        0.1,
        "Probability of replacing a caption with the empty prompt in training.",
        ge=0.0,
        le=1.0,
    )
    posterior: Literal["sample", "mean"] = doc(
        "sample", "VAE latent: 'sample' the posterior (reference) or take its 'mean'."
    )


@section
class IngestConfig:
    out: Str = doc(
        "",
        "Output folder for parquet shards, manifest.json and rejects (default runs/<name>/latents).",
    )
    encode_batch_size: Int = doc(4, "Clips per VAE/text-encoder batch.", ge=1, le=4096)
    encode_actors: Int = doc(1, "Encoder actors in the pool.", ge=1, le=1024)
    actor_cpus: Float = doc(
        0.5,
        "CPUs per encoder actor (fractional avoids the 2-CPU Ray Data deadlock).",
        ge=0.01,
        le=256,
    )
    actor_gpus: Literal["auto"] | Annotated[Float, Field(ge=0.0, le=8)] = doc(
        "auto", "GPUs per encoder actor: 'auto' (1 when the cluster has GPUs, else 0) or a number."
    )
    decode_cpus: Float = doc(0.5, "CPUs per decode task.", ge=0.01, le=256)
    rows_per_shard: Int = doc(64, "Clips per parquet shard.", ge=1, le=1_000_000)
    dtype: Literal["float32", "bfloat16"] = doc(
        "float32",
        "Stored latents/text: 'float32' (lossless) or 'bfloat16' (half the bytes; exact when "
        "the encoders compute in bf16, as on GPU).",
    )


@section
class TrainConfig:
    stage: Literal["semantic", "detail", "both"] = doc(
        "both", "'semantic', 'detail' or 'both' (semantic, then detail from its checkpoint)."
    )
    out: Str = doc(
        "runs", "Root folder of run directories (local path or a pyarrow URI for checkpoints)."
    )
    run_name: Str = doc(
        "", "Run name; re-running the same name resumes. Default: the experiment name."
    )
    init_from: Str = doc(
        "", "For stage 'detail' alone: the semantic artifact folder to start from."
    )
    steps_semantic: Int = doc(1000, "Optimiser steps of stage 1.", ge=1, le=10**9)
    steps_detail: Int = doc(1000, "Optimiser steps of stage 2.", ge=1, le=10**9)
    lr_semantic: Float = doc(1e-6, "Stage-1 learning rate.", ge=0.0, le=1.0)
    lr_detail: Float = doc(5e-6, "Stage-2 generator learning rate.", ge=0.0, le=1.0)
    lr_decay: Literal["constant", "cosine"] = doc(
        "constant",
        "The student's rate over each stage's steps: 'constant' (reference) or 'cosine' (from "
        "the stage's rate to 0 at its last step; docs/QUALITY.md section 18).",
    )
    lr_disc: Float = doc(1e-5, "Discriminator learning rate.", ge=0.0, le=1.0)
    betas: tuple[Beta, Beta] = doc((0.9, 0.999), "AdamW betas of the student.")
    disc_betas: tuple[Beta, Beta] = doc((0.0, 0.999), "AdamW betas of the discriminator.")
    adam_eps: Float = doc(1e-8, "AdamW epsilon.", ge=0.0, le=1.0)
    weight_decay: Float = doc(
        1e-3, "AdamW weight decay (student and discriminator).", ge=0.0, le=10.0
    )
    grad_clip: Float = doc(1.0, "Gradient-norm clip.", ge=0.0, le=1e6)
    average_decay: Float = doc(
        0.0,
        "Decay of an exponential moving average of the student's trained weights (float32, "
        "a plain mean for the first 1 / (1 - decay) steps); validation scores and checkpoints "
        "export the average, training goes on from the live weights. 0 = the live weights.",
        ge=0.0,
        lt=1.0,
    )
    global_batch: Int = doc(
        4,
        "Samples per optimiser step across all workers and accumulation steps.",
        ge=1,
        le=10**6,
    )
    grad_accum: Int = doc(
        1, "Gradient-accumulation micro-steps per optimiser step.", ge=1, le=10**4
    )
    num_workers: Int = doc(1, "Ray Train workers.", ge=1, le=10**4)
    use_gpu: AutoBool = doc(
        "auto", "'auto' (a GPU per worker when the cluster has GPUs), true or false."
    )
    cpus_per_worker: Float = doc(1.0, "CPUs per Ray Train worker.", ge=0.01, le=256)
    zero_stage: Literal[0, 1, 2, 3] = doc(2, "DeepSpeed ZeRO stage (0-3).")
    offload: Bool = doc(
        False, "DeepSpeed CPU offload of optimiser state (and parameters at stage 3)."
    )
    activation_checkpointing: Bool = doc(True, "Recompute every transformer block in backward.")
    checkpoint_every: Int = doc(
        100, "Steps between checkpoints (0 = only at the end).", ge=0, le=10**9
    )
    keep_checkpoints: Int = doc(2, "Checkpoints kept (best by checkpoint_metric).", ge=1, le=1000)
    checkpoint_metric: Str = doc(
        "val/score", "Validation metric that ranks checkpoints (higher is better)."
    )
    val_every: Int = doc(
        0,
        "Steps between validations (0 = only at checkpoints); step 0 (the untrained student) "
        "and the last step are always validated.",
        ge=0,
        le=10**9,
    )
    val_prompts: Int = doc(
        2,
        "Validation prompts taken from the data's captions when sample.prompts is empty.",
        ge=1,
        le=1000,
    )
    log_every: Int = doc(10, "Steps between metric logs.", ge=1, le=10**9)
    seed: Int = doc(0, "Seed of every random draw of the run.")
    max_failures: Int = doc(
        0, "Worker-group restarts allowed (Ray Train FailureConfig).", ge=-1, le=1000
    )


@section
class SampleConfig:
    steps: Int = doc(
        4, "Student sampling steps (any n >= 2; split evenly between the experts).", ge=2, le=1000
    )
    sigma_preset: Literal["", "wan-6", "hunyuan-4"] = doc(
        "", "Reference sigma list instead of the even-split rule: '', 'wan-6', 'hunyuan-4'."
    )
    renoise: Float = doc(
        0.0,
        "Share of fresh noise in each detail-expert step (0: deterministic Euler, the "
        "reference; 1: a fresh draw, the multistep consistency sampler; METHOD.md section 7).",
        ge=0.0,
        le=1.0,
    )
    teacher_steps: Int = doc(
        50, "Teacher Euler steps (with guidance) for comparisons.", ge=1, le=10000
    )
    eval_steps: tuple[Annotated[Int, Field(ge=2, le=1000)], ...] = doc(
        (2, 4, 8), "Student step counts evaluated against the teacher."
    )
    prompts: tuple[Str, ...] = doc(
        (), "Fixed validation prompts (empty: the data's held-out captions)."
    )
    seeds: tuple[Int, ...] = doc((0,), "Fixed validation seeds.")
    num_frames: Int = doc(0, "Frames sampled (0 = data.num_frames).", ge=0, le=10000)
    height: Int = doc(0, "Sample height (0 = data.height).", ge=0, le=16384)
    width: Int = doc(0, "Sample width (0 = data.width).", ge=0, le=16384)


@section
class TrackingConfig:
    enabled: Bool = doc(True, "Record runs in MLflow.")
    uri: Str = doc("", "MLflow tracking URI; empty = sqlite:///<run dir>/mlflow.db.")
    experiment: Str = doc("dcm", "MLflow experiment name.")
    register_as: Str = doc(
        "",
        "Registered-model name: a finished distill run exports its model (diffusers folder), "
        "logs it as an MLflow pyfunc and registers a new version under this name; empty = no.",
    )


@section
class RayConfig:
    address: Str = doc(
        "", "Cluster address; empty = RAY_ADDRESS / the job's cluster, else start a local one."
    )
    num_cpus: Int = doc(0, "CPUs of a local cluster (0 = detect).", ge=0, le=10**5)
    num_gpus: Int = doc(-1, "GPUs of a local cluster (-1 = detect).", ge=-1, le=10**4)
    object_store_mb: Int = doc(
        0,
        "Object store of a local cluster in MiB (at least 64); 0 = sized by Ray from the "
        "machine's memory.",
        ge=0,
        le=10**7,
    )
    dashboard: Bool = doc(
        True,
        "Start the dashboard of a local cluster on 127.0.0.1. Keep it on: Ray's State API "
        "lives there; without it ASHA sweeps hang and every Train run logs a warning a second.",
    )
    dashboard_port: Int = doc(8265, "Dashboard port of a local cluster.", ge=1024, le=65535)
    auth_mode: Literal["disabled", "token"] = doc(
        "disabled", "RAY_AUTH_MODE of a local cluster: 'disabled' or 'token'."
    )

    def __post_init__(self) -> None:
        if self.object_store_mb:
            _range("object_store_mb", self.object_store_mb, 64, 10**7)


@section
class SweepConfig:
    space: dict[Str, Any] = doc(
        {},
        "Search space: dotted config key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]} (randint: hi inclusive).",
    )
    variants: dict[Str, dict[Str, Any]] = doc(
        {},
        "Named sets of dotted overrides (e.g. the ablation's 'single-cm', 'dcm'), crossed with the space as one more dimension.",
    )
    searcher: Literal["grid", "random", "optuna"] = doc(
        "grid", "'grid', 'random' or 'optuna' (model-based, TPE)."
    )
    num_samples: Int = doc(1, "Trials (random/optuna) or repeats of the grid.", ge=1, le=10**6)
    metric: Str = doc("val/score", "Metric the scheduler and the best-config choice use.")
    mode: Literal["max", "min"] = doc("max", "'max' or 'min'.")
    asha: Bool = doc(True, "Early-stop weak trials with ASHA.")
    grace_period: Int = doc(1, "ASHA grace period in reports.", ge=1, le=10**6)
    reduction_factor: Int = doc(
        2, "ASHA reduction factor (keep the top 1/rf at each rung).", ge=2, le=100
    )
    teacher_baseline: Bool = doc(
        False,
        "Also score the teacher at sample.teacher_steps on the validation prompts and seeds (shapes world), as the reference line of the report.",
    )
    max_concurrent: Int = doc(1, "Trials running at once.", ge=1, le=10**4)
    trial_cpus: Float = doc(1.0, "CPUs per trial worker.", ge=0.01, le=256)
    trial_gpus: Float = doc(0.0, "GPUs per trial worker.", ge=0.0, le=64)


@section
class ServeConfig:
    host: Str = doc("127.0.0.1", "HTTP host.")
    port: Int = doc(8000, "HTTP port.", ge=1, le=65535)
    default_steps: Int = doc(4, "Steps when a request gives none (min_steps..max_steps).")
    min_steps: Int = doc(2, "Smallest steps a request may ask.", ge=2, le=1000)
    max_steps: Int = doc(8, "Largest steps a request may ask (>= min_steps).", le=1000)
    max_frames: Int = doc(81, "Largest frame count a request may ask.", ge=1, le=10000)
    max_height: Int = doc(480, "Largest height a request may ask.")
    max_width: Int = doc(832, "Largest width a request may ask.")
    max_prompt_chars: Int = doc(2000, "Longest prompt accepted.", ge=1, le=10**6)
    api_key_env: Str = doc("", "Environment variable holding the API key; empty = no auth.")
    request_timeout_s: Float = doc(300.0, "Per-request timeout.", ge=0.1, le=86400)
    max_queued: Int = doc(
        16, "Requests waiting per replica before 503 + Retry-After.", ge=1, le=10**6
    )
    min_replicas: Int = doc(1, "Autoscaling minimum replicas.", ge=0, le=10**4)
    max_replicas: Int = doc(2, "Autoscaling maximum replicas (>= 1 and >= min_replicas).", le=10**4)
    target_ongoing_requests: Float = doc(
        1.0, "Autoscaling target of ongoing requests per replica.", ge=0.01, le=10**4
    )
    replica_cpus: Float = doc(0.5, "CPUs per generator replica.", ge=0.0, le=256)
    replica_gpus: Literal["auto"] | Annotated[Float, Field(ge=0.0, le=64)] = doc(
        "auto",
        "GPUs per generator replica: 'auto' (1 when the cluster has GPUs, else 0) or a number (0.5 packs two replicas per GPU).",
    )
    device: Literal["auto", "cpu", "cuda"] = doc(
        "auto",
        "Generator device: 'auto' (cuda when Ray gave the replica a GPU, else cpu), 'cpu', 'cuda'.",
    )
    variants: dict[Name, Filled] = doc(
        {},
        "Extra models served by multiplexing: name -> distilled artifact or bundle folder; a request picks one with its 'model' field.",
    )
    max_models_per_replica: Int = doc(
        3, "Variants kept loaded per replica (least recently used are unloaded).", ge=1, le=1000
    )
    max_batch_size: Int = doc(
        4, "Concurrent same-shape requests generated as one batch.", ge=1, le=1024
    )
    batch_wait_timeout_s: Float = doc(
        0.0,
        "How long a batch waits for more requests after its first; 0 = take those already waiting (they pile up while a batch runs), so a lone request never waits.",
        ge=0.0,
        le=60.0,
    )
    max_ongoing_requests: Int = doc(
        4,
        "Requests a generator replica holds at once (>= max_batch_size so batches can form).",
        le=10**4,
    )
    upscale_delay_s: Float = doc(
        5.0,
        "Autoscaling: load must stay above target this long before adding a replica.",
        ge=0.0,
        le=86400,
    )
    downscale_delay_s: Float = doc(
        60.0,
        "Autoscaling: load must stay below target this long before removing a replica.",
        ge=0.0,
        le=86400,
    )
    look_back_period_s: Float = doc(
        30.0, "Autoscaling: window over which ongoing requests are averaged.", ge=0.1, le=86400
    )
    metrics_interval_s: Float = doc(
        10.0,
        "Autoscaling: how often handles and replicas report load (Serve's default 10 s; lower reacts faster).",
        ge=0.1,
        le=3600,
    )
    retry_after_s: Int = doc(
        5, "Retry-After seconds sent with a 503 when the queue is full.", ge=0, le=3600
    )
    job_store: Str = doc(
        "",
        "Where /v1/videos jobs keep their JSON records and videos: a folder or a pyarrow/fsspec URI (s3://bucket/prefix); empty = ~/.cache/dcm/serve-jobs. Replicas on several nodes need a shared one.",
    )
    job_ttl_s: Float = doc(
        86400.0, "Seconds a finished job and its video are kept.", ge=1.0, le=10**8
    )
    max_queued_jobs: Int = doc(
        64, "Jobs waiting for a generator before POST /v1/videos gets 503.", ge=0, le=10**6
    )
    job_lease_s: Float = doc(
        60.0,
        "A running job whose replica has not written a heartbeat for this long is retried once, then failed.",
        ge=1.0,
        le=86400,
    )

    def __post_init__(self) -> None:
        # bounds that depend on another field (the static ones are the fields' rules)
        _range("max_steps", self.max_steps, self.min_steps, 1000)
        _range("default_steps", self.default_steps, self.min_steps, self.max_steps)
        _range("max_replicas", self.max_replicas, max(1, self.min_replicas), 10**4)
        _range("max_ongoing_requests", self.max_ongoing_requests, self.max_batch_size, 10**4)


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


@section
class Config:
    name: Str = doc("dcm", "Experiment name (run folder and MLflow run name).")
    preset: Str = doc("shapes-tiny", "Preset the file starts from.")
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
        # ZeRO-3 partitions the student; an EMA target or a weight average would be a whole
        # copy of it on every worker
        for key, decay in (
            ("method.ema_decay", self.method.ema_decay),
            ("train.average_decay", t.average_decay),
        ):
            if decay > 0 and t.zero_stage == 3:
                raise ConfigError(
                    f"{key} > 0 keeps a whole EMA copy on every worker: use "
                    f"train.zero_stage <= 2, or {key}=0"
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


# 13-14B students train in fp32 weights under bf16 autocast (pipelines/train_loop.py); ZeRO-2
# would keep a whole fp32 copy (~55 GB) beside the bf16 teacher (~28 GB) on every GPU, more
# than an 80 GB card holds. ZeRO-3 shards the student's weights across the workers.
_LARGE = {"train": {"zero_stage": 3}}


PRESETS: dict[str, dict[str, Any]] = {
    # METHOD.md values; dataclass defaults are the Wan2.1 reference, so these stay short.
    "wan2.1-t2v-1.3b": _wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "wan2.1-t2v-14b": {**_wan("Wan-AI/Wan2.1-T2V-14B-Diffusers"), **_LARGE},
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
        "train": {"global_batch": 6, **_LARGE["train"]},
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


def all_keys(cls: type | None = None) -> list[str]:
    """Every valid key of ``cls`` (default: Config), dotted into its sections."""
    keys = []
    for name, info in (cls or Config).__pydantic_fields__.items():
        if _is_section(info.annotation):
            keys += [f"{name}.{key}" for key in all_keys(info.annotation)]
        else:
            keys.append(name)
    return keys


def _unknown(key: str, cls: type | None = None) -> ConfigError:
    keys = all_keys(cls)
    if "." not in key:  # a misspelt section is closest to a section's name
        keys = list((cls or Config).__pydantic_fields__)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = (
        f"; did you mean '{close[0]}'?"
        if close
        else "; run with --dry-run --explain to list the keys"
    )
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict (already merged over a preset) into a Config."""
    if not isinstance(data, dict):
        raise ConfigError(f"'config' must be a mapping, got {data!r}")
    for key in data:
        if not isinstance(key, str):
            raise _unknown(str(key))
    return Config(**data)


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (presets: {', '.join(PRESETS)})")
    return _merge({"preset": name, "name": name}, copy.deepcopy(PRESETS[name]))


class _Yaml(yaml.SafeLoader):
    """PyYAML's safe loader, reading 5e-6 and 1e30 as floats (YAML 1.2, as every other
    YAML and JSON reader does) rather than the strings of YAML 1.1, which wants 5.0e-6:
    learning rates are written the short way, and a string is no number to the config."""


_Yaml.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """A YAML document as Python values (``_Yaml``: exponent floats need no dot)."""
    return yaml.load(text, Loader=_Yaml)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml value of c)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
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
        return yaml_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None


def artifact_base(
    model: str | None, config: str | None = None, preset: str | None = None
) -> dict[str, Any] | None:
    """The training config of ``model`` (a dict for ``load_config(base=)``) when it names a
    distilled artifact and neither a ``config`` file nor a ``preset`` is given, else None: a
    stage given only an artifact starts from the settings it was trained with (grid, split,
    sizes, guidance) rather than from a preset; a config or preset the user names wins.
    Torch is imported only when the answer needs the artifact's files."""
    if config or preset or not model:
        return None
    from dcm.bundle import resolve_model_path
    from dcm.experts import artifact_config, is_artifact

    if not is_artifact(model):
        return None
    try:
        return artifact_config(resolve_model_path(model))
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
    for name, info in Config.__pydantic_fields__.items():
        if _is_section(info.annotation):
            lines.append(f"{name}:  # {info.description}")
            for key, sub in info.annotation.__pydantic_fields__.items():
                default = sub.get_default(call_default_factory=True)
                lines.append(f"  {key}: {default!r}  # {sub.description}")
        else:
            lines.append(f"{name}: {info.default!r}  # {info.description}")
    return "\n".join(lines)
