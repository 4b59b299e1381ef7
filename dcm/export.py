"""A distilled artifact in formats that leave the platform: diffusers folders and LoRA files.

``export_diffusers`` writes a folder that stock diffusers loads without this package:

- Wan: a ``WanPipeline`` folder. ``transformer`` is the semantic expert (SemE), ``transformer_2``
  the detail expert (DetE) as a plain ``WanTransformer3DModel`` (LoRA merged, its copied
  condition embedder / output layer in place). ``boundary_ratio`` makes the pipeline switch
  from ``transformer`` to ``transformer_2`` exactly where ``Schedule.route`` does.
- HunyuanVideo: a ``HunyuanVideoPipeline`` folder with ``transformer`` = SemE; DetE sits in
  ``transformer_2/`` (not in model_index.json: that pipeline has one transformer) and the
  card swaps it in with a stock ``callback_on_step_end``.

The stock pipelines build their sigma list from ``num_inference_steps`` alone (WanPipeline
has no ``sigmas=`` argument), and no scheduler config reproduces DCM's uneven per-expert
list, so the folder stores the lists (``dcm_sampling.json``) and ships a scheduler with
shift 1 that takes them unchanged through ``set_timesteps(sigmas=...)``; the card shows the
one-line way to hand them to the pipeline. ``export_lora`` writes DetE as a LoRA file that
``load_lora_weights`` reads plus its copied layers as full weights.

``ExportedExperts`` loads such a folder back as a student (``VideoGenerator`` uses it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import Tensor, nn

from dcm.backbones.base import Backbone, Cond, make_backbone
from dcm.config import DETAIL, SEMANTIC, Config, ConfigError, load_config
from dcm.experts import (
    ADAPTER,
    ARTIFACT_JSON,
    DualExpert,
    artifact_config,
    find_bundle,
    read_artifact_meta,
)
from dcm.export_card import (  # noqa: F401 - file names are part of this module's API
    COPIES_FILE,
    LORA_FILE,
    PIPELINES,
    SAMPLING_JSON,
    lora_card,
    model_card,
)
from dcm.schedule import Schedule

CARD = "README.md"
EXPORT_STEPS = tuple(range(2, 17))  # step counts whose sigma lists the folder stores
TRAIN_TIMESTEPS = 1000  # t = 1000 sigma (METHOD.md section 1); the scheduler's num_train_timesteps


class ExportError(ConfigError):
    """An artifact cannot be exported as asked; the message says what to do."""


# ---------------------------------------------------------------- routing and sigma lists
def boundary_ratio(schedule: Schedule) -> float | None:
    """``boundary_ratio`` for WanPipeline so that it routes like ``schedule.route``.

    WanPipeline runs ``transformer`` when ``t >= boundary_ratio * 1000`` with ``t`` the
    scheduler's float32 timestep (float32(sigma) * 1000 in float32), the Python float cast to
    float32 for the comparison; DCM sends sigma > sigma_b to SemE. The boundary is therefore
    the float32 just above t(sigma_b): t(sigma_b) goes to DetE, every larger t to SemE.
    None (one transformer for every step) for a single consistency model.
    """
    if schedule.single_expert:
        return None
    t_b = torch.tensor(schedule.sigma_split, dtype=torch.float32) * TRAIN_TIMESTEPS
    above = float(np.nextafter(np.float32(t_b.item()), np.float32(np.inf)))
    ratio = above / TRAIN_TIMESTEPS
    if float(np.float32(ratio * TRAIN_TIMESTEPS)) != above:  # the float64 round trip held
        raise ExportError(f"boundary ratio {ratio!r} does not round back to t = {above!r}")
    return ratio


def pipeline_route(sigmas: list[float], ratio: float | None) -> list[int]:
    """The expert WanPipeline runs at each sigma of a list (SEMANTIC = ``transformer``)."""
    s = torch.tensor(sigmas, dtype=torch.float32)
    t = s * TRAIN_TIMESTEPS  # as FlowMatchEulerDiscreteScheduler.set_timesteps makes them
    if ratio is None:
        return [SEMANTIC] * len(sigmas)
    return [SEMANTIC if bool(v >= ratio * TRAIN_TIMESTEPS) else DETAIL for v in t]


def pipeline_sigmas(schedule: Schedule, steps: int) -> list[float]:
    """DCM's sigma list for ``steps`` without the closing 0 (``set_timesteps(sigmas=...)``)."""
    return schedule.sampling_sigmas(int(steps))[:-1]


def sampling_table(schedule: Schedule, steps: tuple[int, ...] = EXPORT_STEPS) -> dict[str, Any]:
    """Sigma lists per step count, each checked to route in the pipeline as DCM routes it."""
    ratio = boundary_ratio(schedule)
    table: dict[str, list[float]] = {}
    for n in steps:
        sig = pipeline_sigmas(schedule, n)
        ours = schedule.route(torch.tensor(sig, dtype=torch.float32)).tolist()
        if schedule.single_expert:
            ours = [SEMANTIC] * len(sig)
        if pipeline_route(sig, ratio) != ours:
            raise ExportError(
                f"the {n}-step list {sig} would switch experts elsewhere than DCM does "
                f"(boundary_ratio {ratio}); report this with the artifact's method section"
            )
        table[str(n)] = sig
    return {"boundary_ratio": ratio, "sigmas": table}


# ---------------------------------------------------------------- expert weights
def _plain_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


def expert_state_dicts(model: DualExpert) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(SemE, DetE) as state dicts of the plain diffusers transformer (float32, CPU).

    DetE = base weights + merged LoRA (peft's own delta B A * alpha / r) with the copied
    top-level parts (``Backbone.detail_parts``) in place. None without a detail expert.
    """
    tr = model.base.transformer
    sem: dict[str, Tensor] = {}
    for key, val in tr.state_dict().items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        sem[_plain_key(key)] = val.detach().float().cpu().clone()
    if not model.has_detail:
        return sem, None
    det = dict(sem)
    with torch.no_grad():
        for name, layer in tr.named_modules():
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
                delta = layer.get_delta_weight(ADAPTER).float().cpu()
                det[f"{name}.weight"] = sem[f"{name}.weight"] + delta
    for name, module in model.detail_modules.items():
        for key, val in module.state_dict().items():
            det[f"{name}.{key}"] = val.detach().float().cpu().clone()
    for name, param in model.detail_params.items():
        det[name] = param.detach().float().cpu().clone()
    return sem, det


def plain_transformer(
    config: dict[str, Any], class_name: str, state: dict[str, Tensor]
) -> nn.Module:
    """A stock diffusers transformer from its config, loaded strictly with ``state``."""
    from dcm.experts import _transformer_classes

    cls = _transformer_classes()[class_name]
    tr = cls.from_config(config)
    tr.load_state_dict(state, strict=True)
    return tr.eval().requires_grad_(False)


def expert_transformers(
    model: DualExpert, meta: dict[str, Any]
) -> tuple[nn.Module, nn.Module | None]:
    """(SemE, DetE) as stock diffusers transformers (DetE None without a detail expert)."""
    sem, det = expert_state_dicts(model)
    cfg, cls = meta["transformer_config"], meta["transformer_class"]
    return (
        plain_transformer(cfg, cls, sem),
        None if det is None else plain_transformer(cfg, cls, det),
    )


# ---------------------------------------------------------------- the artifact's facts
def artifact_bundle(root: Path, meta: dict[str, Any], base_model: str = "") -> str:
    """The artifact's teacher bundle (``dcm.experts.find_bundle``), errors as ExportError."""
    try:
        return find_bundle(root, meta, base_model)
    except ValueError as err:
        raise ExportError(str(err)) from None


def _meta(root: Path) -> dict[str, Any]:
    try:
        return read_artifact_meta(root)
    except ExportError:
        raise
    except ValueError as err:  # not an artifact, damaged JSON: one sentence
        raise ExportError(str(err)) from None


def _pick(key: str, *sources: dict[str, Any]) -> Any:
    """The first set (not None/0/'') value of ``key`` in ``sources``."""
    for src in sources:
        if src.get(key) not in (None, 0, ""):
            return src[key]
    return None


def _config(root: Path, cfg: Config | None) -> Config:
    """``cfg``, else the artifact's own training config, else the default preset."""
    if cfg is not None:
        return cfg
    base = artifact_config(root)
    return load_config(base=base) if base is not None else load_config()


def sampling_facts(meta: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Defaults a sampling call needs: the artifact's metadata first, else ``cfg``."""
    saved = meta.get("defaults") or {}
    method = meta.get("method") or {}
    num_frames = _pick("num_frames", saved) or cfg.sample.num_frames or cfg.data.num_frames
    height = _pick("height", saved) or cfg.sample.height or cfg.data.height
    width = _pick("width", saved) or cfg.sample.width or cfg.data.width
    return {
        "steps": int(_pick("steps", saved) or cfg.sample.steps),
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "fps": int(_pick("fps", saved) or cfg.model.fps),
        "max_sequence_length": int(_pick("text_max_length", saved) or cfg.model.text_max_length),
        "guidance": str(_pick("guidance", saved, method) or cfg.method.guidance),
        "embedded_guidance": float(
            _pick("embedded_guidance", saved, method) or cfg.method.embedded_guidance
        ),
    }


def _schedule(meta: dict[str, Any], cfg: Config) -> Schedule:
    m = meta.get("method") or {}
    return Schedule(
        shift=float(m.get("shift", cfg.method.shift)),
        grid_points=int(m.get("grid_points", cfg.method.grid_points)),
        split=int(m.get("split", cfg.method.split)),
    )


# ---------------------------------------------------------------- diffusers folder
def _copy_component(bundle: str, name: str, out: Path) -> None:
    from dcm.bundle import resolve_model_path

    root = resolve_model_path(bundle)
    if not root.is_absolute() and not root.exists():  # a hub id: its cached snapshot
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(str(root), allow_patterns=[f"{name}/*"]))
    src = root / name
    if not src.is_dir():
        raise ExportError(f"the teacher bundle '{bundle}' has no {name}/ folder to export")
    shutil.copytree(src, out / name, dirs_exist_ok=True)


def _index(kind: str, bundle: str, two: bool, ratio: float | None) -> dict[str, Any]:
    from diffusers import __version__ as diffusers_version

    from dcm.bundle import read_model_index, resolve_model_path

    teacher = read_model_index(resolve_model_path(bundle))
    tr_cls = "WanTransformer3DModel" if kind == "wan" else "HunyuanVideoTransformer3DModel"
    index: dict[str, Any] = {
        "_class_name": PIPELINES[kind],
        "_diffusers_version": diffusers_version,
    }
    for name, entry in teacher.items():
        if not name.startswith("_") and name not in ("transformer", "transformer_2", "scheduler"):
            index[name] = entry
    index["transformer"] = ["diffusers", tr_cls]
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    if kind == "wan":
        index["transformer_2"] = ["diffusers", tr_cls] if two else [None, None]
        index["boundary_ratio"] = ratio if two else None
        index["expand_timesteps"] = False
    return index


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the dtype exported weights are written in."""
    if name not in SAVE_DTYPES:
        raise ExportError(f"--dtype {name!r}: choose one of {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[name]


def cast_like_diffusers(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``module``'s floating weights to ``dtype`` except the modules diffusers keeps in
    fp32 (``_keep_in_fp32_modules``: Wan's time embedder, norms and modulation table), by
    the rule ``from_pretrained(torch_dtype=)`` applies: a name part equals a kept name."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return module


def export_diffusers(
    artifact: str | Path,
    out: str | Path,
    cfg: Config | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write ``artifact`` as a stock diffusers pipeline folder under ``out``; returns it.

    The weights come from the artifact's fp32 copy; ``dtype`` 'bfloat16' / 'float16' halves
    the transformers on disk (kept-in-fp32 modules stay fp32, as diffusers loads them)."""
    root = Path(artifact).expanduser().resolve()
    meta = _meta(root)
    cfg = _config(root, cfg)
    kind = meta["backbone"]
    if kind not in PIPELINES:
        raise ExportError(f"'{root / ARTIFACT_JSON}': backbone '{kind}' cannot be exported")
    dest = _fresh_dir(out, overwrite)
    model = DualExpert.load_artifact(root)
    schedule = _schedule(meta, cfg)
    table = sampling_table(schedule)
    sem, det = expert_transformers(model, meta)
    if det is not None and schedule.single_expert:
        raise ExportError(f"'{root}' has a detail expert but method.split=-1: re-save it")
    to = save_dtype(dtype)
    cast_like_diffusers(sem, to).save_pretrained(dest / "transformer", safe_serialization=True)
    if det is not None:
        cast_like_diffusers(det, to).save_pretrained(
            dest / "transformer_2", safe_serialization=True
        )
    bundle = artifact_bundle(root, meta)
    for name in _bundle_parts(bundle):
        _copy_component(bundle, name, dest)
    from diffusers import FlowMatchEulerDiscreteScheduler

    # shift 1: set_timesteps(sigmas=...) keeps the given list unchanged (it shifts by 1).
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=1.0).save_pretrained(
        dest / "scheduler"
    )
    two = det is not None
    ratio = table["boundary_ratio"] if two and kind == "wan" else None
    index = _index(kind, bundle, two, ratio)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    facts = sampling_facts(meta, cfg)
    m = schedule
    info = {
        "format": "dcm-diffusers",
        "schema_version": 1,
        "backbone": kind,
        "pipeline": PIPELINES[kind],
        "two_experts": two,
        "boundary_ratio": table["boundary_ratio"] if two else None,
        "sigma_boundary": m.sigma_split if two else None,
        "method": {"shift": m.shift, "grid_points": m.grid_points, "split": m.split},
        "sigmas": table["sigmas"],
        "guidance_scale": _guidance_scale(facts),
        **facts,
        "teacher": bundle,
        "training": _training(meta),
        "artifact": str(root),
        "weights_dtype": dtype,
        "created_by": meta.get("created_by", ""),
    }
    (dest / SAMPLING_JSON).write_text(json.dumps(info, indent=2) + "\n")
    (dest / CARD).write_text(model_card(info))
    return dest


def _training(meta: dict[str, Any]) -> dict[str, Any]:
    """How the artifact was trained, from its saved config (empty for older artifacts)."""
    saved = meta.get("config") or {}
    train, lora = saved.get("train") or {}, meta.get("lora") or {}
    keys = ("steps_semantic", "steps_detail", "global_batch", "lr_semantic", "lr_detail")
    out = {k: train[k] for k in keys if k in train}
    if lora:
        out.update(lora_rank=lora.get("rank"), lora_alpha=lora.get("alpha"))
    return out


def _bundle_parts(bundle: str) -> list[str]:
    from dcm.bundle import read_model_index, resolve_model_path

    index = read_model_index(resolve_model_path(bundle))
    skip = ("transformer", "transformer_2", "scheduler")
    return [
        k
        for k, v in index.items()
        if not k.startswith("_") and k not in skip and isinstance(v, list) and v[0]
    ]


def _guidance_scale(facts: dict[str, Any]) -> float:
    """The pipeline's guidance_scale: 1 (no CFG) for Wan; HunyuanVideo embeds guidance
    as guidance_scale * 1000, so it is embedded_guidance / 1000."""
    if facts["guidance"] == "embedded":
        return facts["embedded_guidance"] / 1000.0
    return 1.0


def _fresh_dir(out: str | Path, overwrite: bool) -> Path:
    dest = Path(out).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {dest} exists and is not empty: pick a new folder")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def read_sampling(root: str | Path) -> dict[str, Any]:
    """The dcm_sampling.json of an exported folder (clear error if it is not one)."""
    file = Path(root) / SAMPLING_JSON
    if not file.is_file():
        raise ExportError(f"'{root}' is not an exported DCM folder: {SAMPLING_JSON} is missing")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{file} is not valid JSON ({err}): export the model again") from None
    if data.get("format") != "dcm-diffusers":
        raise ExportError(f"{file} is not a dcm-diffusers sampling file: export the model again")
    return data


# ---------------------------------------------------------------- LoRA file
def export_lora(
    artifact: str | Path, out: str | Path, cfg: Config | None = None, overwrite: bool = False
) -> Path:
    """DetE as ``dcm_detail_lora.safetensors`` (diffusers ``load_lora_weights`` format, peft
    keys ``transformer.blocks.N.attn1.to_q.lora_A.weight``, alpha / r folded into lora_B) plus its
    copied layers as full weights in ``dcm_detail_copies.safetensors`` (plain transformer
    keys: ``transformer.load_state_dict(copies, strict=False)``), with a card."""
    root = Path(artifact).expanduser().resolve()
    meta = _meta(root)
    if not meta["has_detail"]:
        raise ExportError(
            f"'{root}' has no detail expert (a semantic-stage or split=-1 artifact): there is "
            "no LoRA to export; use --format diffusers"
        )
    cfg = _config(root, cfg)
    dest = _fresh_dir(out, overwrite)
    model = DualExpert.load_artifact(root)
    tr = model.base.transformer
    # peft keys blocks.N.attn1.to_q.lora_A.weight; loaders that ignore the file's metadata
    # assume scale 1 (alpha = r), so alpha / r is folded into lora_B and alpha written as r.
    lora = {}
    targets = []
    for name, layer in tr.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            targets.append(name)
            a = layer.lora_A[ADAPTER].weight.detach().float().cpu()
            b = layer.lora_B[ADAPTER].weight.detach().float().cpu() * layer.scaling[ADAPTER]
            lora[f"{name}.lora_A.weight"] = a.contiguous()
            lora[f"{name}.lora_B.weight"] = b.contiguous()
    rank = int(meta["lora"]["rank"])
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(targets)}
    pipeline_cls = _pipeline_class(meta["backbone"])
    pipeline_cls.save_lora_weights(
        str(dest),
        transformer_lora_layers=lora,
        weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=metadata,
    )
    copies: dict[str, Tensor] = {}
    for name, module in model.detail_modules.items():
        for key, val in module.state_dict().items():
            copies[f"{name}.{key}"] = val.detach().float().cpu().contiguous()
    for name, param in model.detail_params.items():
        copies[name] = param.detach().float().cpu().contiguous()
    save_file(copies, str(dest / COPIES_FILE), metadata={"format": "pt"})
    facts = sampling_facts(meta, cfg)
    schedule = _schedule(meta, cfg)
    info = {
        "backbone": meta["backbone"],
        "rank": metadata["r"],
        "alpha": float(meta["lora"]["alpha"]),
        "targets": len(targets),
        "copies": sorted({k.split(".")[0] for k in copies}),
        "sigma_boundary": schedule.sigma_split,
        "boundary_ratio": boundary_ratio(schedule),
        "teacher": artifact_bundle(root, meta),
        **facts,
    }
    (dest / CARD).write_text(lora_card(info))
    return dest


def _pipeline_class(kind: str) -> Any:
    import diffusers

    return getattr(diffusers, PIPELINES[kind])


# ---------------------------------------------------------------- loading an export back
class ExportedExperts(nn.Module):
    """Two stock transformers routed per sample like ``DualExpert`` (SemE = ``base``)."""

    def __init__(self, semantic: nn.Module, detail: nn.Module | None) -> None:
        super().__init__()
        self.base: Backbone = make_backbone(semantic)
        self.detail: Backbone | None = None if detail is None else make_backbone(detail)

    @property
    def has_detail(self) -> bool:
        return self.detail is not None

    @property
    def kind(self) -> str:
        return self.base.kind

    def forward(self, x: Tensor, t: Tensor, cond: Cond, expert: Tensor) -> Tensor:
        """Velocity (B, C, T, H, W); ``expert`` (B,) long picks SemE (0) or DetE (1) per row."""
        expert = torch.as_tensor(expert, device=x.device)
        if self.detail is None or not bool((expert == DETAIL).any()):
            return self.base(x, t, cond)
        if bool((expert == DETAIL).all()):
            return self.detail(x, t, cond)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        out = torch.empty_like(x, dtype=torch.float32)
        for model, ids in ((self.base, SEMANTIC), (self.detail, DETAIL)):
            rows = torch.nonzero(expert == ids).squeeze(1)
            out[rows] = model(x[rows], t[rows], cond.index(rows)).float()
        return out


def load_exported(
    root: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ExportedExperts, dict[str, Any]]:
    """An exported folder's experts (from its transformer folders) and its sampling facts."""
    from dcm.bundle import read_model_index
    from dcm.experts import _transformer_classes

    root = Path(root)
    info = read_sampling(root)
    index = read_model_index(root)
    cls = _transformer_classes()[index["transformer"][1]]
    sem = cls.from_pretrained(str(root), subfolder="transformer", torch_dtype=dtype)
    det = None
    if info.get("two_experts"):
        det = cls.from_pretrained(str(root), subfolder="transformer_2", torch_dtype=dtype)
    model = ExportedExperts(sem, det).to(device).eval().requires_grad_(False)
    return model, info


def is_exported(root: str | Path) -> bool:
    return (Path(root) / SAMPLING_JSON).is_file() and (Path(root) / "model_index.json").is_file()
