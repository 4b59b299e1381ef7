"""The dual-expert student: SemE base + DetE (LoRA and copies), one artifact (METHOD.md 5-6).

``DualExpert.base`` is the semantic expert (SemE): a ``Backbone`` whose transformer trains
fully in stage 1. ``enable_detail_expert`` starts stage 2: it freezes everything, adds
LoRA (B = 0) to the backbone's attentions and trainable copies of the conditioning
embedder and the output layer (``Backbone.detail_parts``). The detail expert (DetE) is the
base run with LoRA on and the copies swapped in, so it starts equal to SemE.

``forward`` routes each sample by an explicit expert id (``dcm.config.SEMANTIC`` /
``DETAIL``), never by the first element of the batch (METHOD.md section 3). Before stage 2
there is one expert only and every row runs the base.

Artifact: ``experts.safetensors`` (the whole state dict: SemE weights, LoRA, copies) +
``dcm_artifact.json``; ``load_artifact`` rebuilds the diffusers transformer from its
config, re-applies the same LoRA and loads strictly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dcm.backbones.base import (
    Backbone,
    Cond,
    Variant,
    cast_keeping_fp32,
    fp32_modules,
    make_backbone,
)
from dcm.config import (
    DETAIL,
    SECTIONS,
    SEMANTIC,
    Config,
    LoraConfig,
    all_keys,
    plain_data,
)
from dcm.files import is_remote, write_atomic

ARTIFACT_SCHEMA_VERSION = 1
ARTIFACT_JSON = "dcm_artifact.json"
ARTIFACT_WEIGHTS = "experts.safetensors"
ADAPTER = "default"  # peft adapter name of the detail expert


def _transformer_classes() -> dict[str, type]:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    return {c.__name__: c for c in (WanTransformer3DModel, HunyuanVideoTransformer3DModel)}


def _set_lora(module: nn.Module, enabled: bool) -> None:
    """LoRA on/off for the peft layers inside ``module``, leaving requires_grad as it was.

    peft's enable_adapters() also flips requires_grad of the adapter weights; the detail
    expert's trainable set must not change when a SemE part of a mixed batch runs.
    """
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer) and layer.disable_adapters == enabled:
            params = [
                p for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()
            ]
            flags = [p.requires_grad for p in params]
            layer.enable_adapters(enabled)
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)


class DualExpert(nn.Module):
    """SemE (the base backbone) + DetE (LoRA + copies), routed per sample."""

    def __init__(self, base: Backbone | nn.Module) -> None:
        super().__init__()
        self.base = make_backbone(base)
        # DetE copies of Backbone.detail_parts: modules here, bare parameters (Wan's final
        # scale_shift_table) in a ParameterDict.
        self.detail_modules = nn.ModuleDict()
        self.detail_params = nn.ParameterDict()
        self.lora_cfg: LoraConfig | None = None
        # experts.safetensors this model was loaded from: the float32 source of the frozen
        # weights when training keeps only low-precision copies of them (save_artifact)
        self.frozen_source: Path | None = None
        # Stage 1 (METHOD.md section 5): every transformer parameter trains.
        self.base.requires_grad_(True)

    @property
    def has_detail(self) -> bool:
        return self.lora_cfg is not None

    @property
    def kind(self) -> str:
        return self.base.kind

    # ------------------------------------------------------------ stage 2 set-up
    def enable_detail_expert(self, lora_cfg: LoraConfig) -> None:
        """Freeze everything, add LoRA (B = 0) and trainable copies (METHOD.md section 6)."""
        if self.has_detail:
            raise ValueError("the detail expert is already enabled on this model")
        self.requires_grad_(False)
        tr = self.base.transformer
        for name in self.base.detail_parts:
            part = copy.deepcopy(getattr(tr, name))
            part.requires_grad_(True)
            if isinstance(part, nn.Parameter):
                self.detail_params[name] = part
            else:
                self.detail_modules[name] = part
        peft_cfg = PeftLoraConfig(
            r=lora_cfg.rank,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=self.base.lora_target_regex(lora_cfg.target_modules),
            init_lora_weights=True,  # A Kaiming-uniform, B zero: DetE == SemE at start
        )
        inject_adapter_in_model(peft_cfg, tr, adapter_name=ADAPTER)
        # peft marks only adapters trainable; state it explicitly rather than rely on it.
        for name, p in tr.named_parameters():
            p.requires_grad_(f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name)
        self.lora_cfg = lora_cfg

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_checkpointing(self, enabled: bool) -> None:
        self.base.set_checkpointing(enabled)

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, cond: Cond, expert: Tensor) -> Tensor:
        """Velocity (B, C, T, H, W); ``expert`` (B,) long picks SemE (0) or DetE (1) per row."""
        expert = torch.as_tensor(expert, device=x.device)
        if expert.shape != (x.shape[0],):
            raise ValueError(
                f"expert ids shape {tuple(expert.shape)} must be (B,) = ({x.shape[0]},)"
            )
        is_detail = expert == DETAIL
        if not bool(((expert == SEMANTIC) | is_detail).all()):
            raise ValueError(f"expert ids must be {SEMANTIC} (semantic) or {DETAIL} (detail)")
        if not self.has_detail:
            return self.base(x, t, cond)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        n_detail = int(is_detail.sum())
        if n_detail == 0:
            return self._semantic(x, t, cond)
        if n_detail == x.shape[0]:
            return self._detail(x, t, cond)
        sem = torch.nonzero(~is_detail).squeeze(1)
        det = torch.nonzero(is_detail).squeeze(1)
        out = torch.cat(
            [
                self._semantic(x[sem], t[sem], cond.index(sem)),
                self._detail(x[det], t[det], cond.index(det)),
            ]
        )
        return out[torch.argsort(torch.cat([sem, det]))]  # back to the input row order

    def _semantic(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.base(x, t, cond, variant=self._variant(detail=False))

    def _detail(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.base(x, t, cond, variant=self._variant(detail=True))

    def _variant(self, detail: bool) -> Variant:
        modules: dict[str, Any] = {}
        if detail:
            modules.update(self.detail_modules.items())
            modules.update(self.detail_params.items())
        # The whole transformer is set now; each block is set again right before it runs
        # (and when checkpointing recomputes it) so the two parts cannot leak into each other.
        _set_lora(self.base.transformer, detail)
        return Variant(modules=modules, prepare=lambda m: _set_lora(m, detail))

    # ------------------------------------------------------------ artifact
    def save_artifact(
        self,
        out_dir: str | Path,
        cfg: Config,
        bundle_path: str,
        masters: dict[str, Tensor] | None = None,
    ) -> Path:
        """Write experts.safetensors + dcm_artifact.json into ``out_dir``; returns the folder.

        Weights are saved in float32 from the most precise copy there is: ``masters`` (the
        optimiser's fp32 master weights of trained parameters, by name, when the module
        itself holds bf16 copies), else the frozen weights' source file
        (``frozen_source``), else the module's own values.
        Each file is written under a temporary name and renamed, weights first: a crash
        mid-save leaves the previous artifact's JSON (and, before its rename, weights) intact.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tr = self.base.transformer
        meta = {
            "schema_version": ARTIFACT_SCHEMA_VERSION,
            "backbone": self.base.kind,
            "transformer_class": type(tr).__name__,
            "transformer_config": plain_data(
                {k: v for k, v in tr.config.items() if not k.startswith("_")}
            ),
            "lora": plain_data(dataclasses.asdict(self.lora_cfg)) if self.lora_cfg else None,
            "has_detail": self.has_detail,
            "method": {
                "shift": cfg.method.shift,
                "grid_points": cfg.method.grid_points,
                "split": cfg.method.split,
            },
            "bundle_path": str(bundle_path),
            # what generate, evaluate and Serve default to (flags override), and the whole
            # training config those defaults come from (``artifact_config``)
            "defaults": artifact_defaults(cfg),
            "config": cfg.to_dict(),
            "created_by": _created_by(),
        }
        state = self._fp32_state(masters or {})
        write_atomic(out / ARTIFACT_WEIGHTS, lambda p: save_file(state, str(p)), fsync=True)
        write_atomic(out / ARTIFACT_JSON, json.dumps(meta, indent=2), fsync=True)
        return out

    def _fp32_state(self, masters: dict[str, Tensor]) -> dict[str, Tensor]:
        own = self.state_dict()
        unknown = sorted(set(masters) - set(own))
        if unknown:  # a silent fallback would export the live weights instead
            raise ValueError(f"weights to export name no parameter of this model: {unknown[:3]}")
        state = {k: masters.get(k, v).detach() for k, v in own.items()}
        low = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
        if low and self.frozen_source is not None and Path(self.frozen_source).is_file():
            from safetensors import safe_open

            with safe_open(str(self.frozen_source), framework="pt") as f:
                names = set(f.keys())
                for key in low:
                    # stage 2 wraps LoRA'd linears: '<x>.base_layer.weight' was '<x>.weight'
                    src = key if key in names else key.replace(".base_layer.", ".")
                    if src in names and tuple(f.get_slice(src).get_shape()) == state[key].shape:
                        state[key] = f.get_tensor(src)
        return {
            k: (v.float() if v.is_floating_point() else v).to("cpu").contiguous()
            for k, v in state.items()
        }

    @classmethod
    def load_artifact(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DualExpert:
        """Rebuild a saved DualExpert (diffusers model from config + peft + strict load)."""
        meta = read_artifact_meta(path)
        folder = Path(path)
        classes = _transformer_classes()
        tr_cls = classes.get(meta["transformer_class"])
        if tr_cls is None:
            raise ValueError(
                f"{folder / ARTIFACT_JSON}: transformer_class '{meta['transformer_class']}' is not "
                f"supported (supported: {', '.join(classes)})"
            )
        transformer = tr_cls.from_config(meta["transformer_config"])
        model = cls(transformer)
        if meta["has_detail"]:
            lora = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["lora"].items()}
            model.enable_detail_expert(LoraConfig(**lora))
        weights = folder / ARTIFACT_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"artifact '{folder}' has no {ARTIFACT_WEIGHTS}: it is incomplete")
        try:
            model.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise ValueError(
                f"{weights} does not match {ARTIFACT_JSON} ({first}): the artifact is damaged or "
                "its save was interrupted; re-save it from the training checkpoint"
            ) from None
        model.frozen_source = weights
        _cast(model, dtype)  # on the CPU first: half the device memory for bf16
        return model.to(device=device)


def artifact_defaults(cfg: Config) -> dict[str, Any]:
    """The sampling settings an artifact describes itself with (dcm_artifact.json)."""
    d, m = cfg.data, cfg.method
    return {
        "backbone": cfg.model.backbone,
        "num_frames": cfg.sample.num_frames or d.num_frames,
        "height": cfg.sample.height or d.height,
        "width": cfg.sample.width or d.width,
        "fps": cfg.model.fps,
        "text_max_length": cfg.model.text_max_length,
        "guidance": m.guidance,
        "cfg_scale": m.cfg_scale,
        "embedded_guidance": m.embedded_guidance,
        "trained_split": m.split,
        "steps": cfg.sample.steps,
        "sigma_preset": cfg.sample.sigma_preset,
    }


def is_artifact(path: str | Path) -> bool:
    """True for a local artifact folder (holding dcm_artifact.json) or a bundled student."""
    from dcm.bundle import BUNDLED

    text = str(path)
    if is_remote(text):
        return False
    if text.startswith("bundled:"):
        folder = BUNDLED.get(text.split(":", 1)[1])
        return folder is not None and (folder / ARTIFACT_JSON).is_file()
    return (Path(text).expanduser() / ARTIFACT_JSON).is_file()


def artifact_config(path: str | Path) -> dict[str, Any] | None:
    """The training config an artifact was saved with (a dict for ``load_config(base=)``),
    its model path set to the artifact; None for an artifact saved before configs were kept."""
    meta = read_artifact_meta(path)
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return None
    # Keys this version does not know (an artifact from another version) are left out.
    known = set(all_keys())
    base: dict[str, Any] = {}
    for key, val in saved.items():
        if isinstance(val, dict) and key in SECTIONS:
            base[key] = {k: copy.deepcopy(v) for k, v in val.items() if f"{key}.{k}" in known}
        elif key in known:
            base[key] = copy.deepcopy(val)
    base.setdefault("model", {})["path"] = str(Path(path).expanduser().resolve())
    return base


def find_bundle(root: str | Path, meta: dict[str, Any], base_model: str = "") -> str:
    """The base model (teacher, VAE, text encoder) of the artifact at ``root``.

    ``base_model`` (``--base-model`` / model.base) wins. Else the recorded ``bundle_path``:
    'bundled:..' and URIs as they are; a local folder where it was saved, else a folder of
    the same name inside the artifact or next to it or any folder above it (a run tree or an
    artifact moved together with its model); a hub id as it is.
    """
    if base_model:
        return base_model
    root = Path(root).expanduser().resolve()
    path = str(meta.get("bundle_path") or "")
    if not path:
        raise ValueError(f"'{root / ARTIFACT_JSON}' has no bundle_path: re-save the artifact")
    if path.startswith("bundled:") or is_remote(path):
        return path
    saved = Path(path).expanduser()
    for cand in (saved, root / saved) if not saved.is_absolute() else (saved,):
        if (cand / "model_index.json").is_file():
            return str(cand.resolve())
    for folder in (root, *root.parents):
        cand = folder / saved.name
        if (cand / "model_index.json").is_file():
            return str(cand)
    if not saved.is_absolute() and len(saved.parts) == 2:
        return path  # a hub id 'owner/name'
    raise ValueError(
        f"artifact '{root}' needs its base model folder '{saved.name}' (saved as {path}), "
        f"which is not there: put a folder '{saved.name}' next to the artifact or pass "
        "--base-model PATH (model.base)"
    )


def read_artifact_meta(path: str | Path) -> dict[str, Any]:
    """The parsed dcm_artifact.json of an artifact folder, with a clear error if it is not one."""
    file = Path(path) / ARTIFACT_JSON
    if not file.is_file():
        raise ValueError(f"'{path}' is not a DCM artifact: {ARTIFACT_JSON} is missing")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}): re-save the artifact") from None
    version = meta.get("schema_version")
    if version != ARTIFACT_SCHEMA_VERSION:
        raise ValueError(
            f"{file}: schema_version {version!r} is not supported (expected "
            f"{ARTIFACT_SCHEMA_VERSION}); re-export it with this version of dcm"
        )
    missing = {"backbone", "transformer_class", "transformer_config", "has_detail", "lora"} - set(
        meta
    )
    if missing:
        raise ValueError(f"{file} lacks the fields {sorted(missing)}: re-save the artifact")
    return meta


def _cast(model: DualExpert, dtype: torch.dtype) -> None:
    """Cast floating weights to ``dtype``, keeping diffusers' fp32 modules (rope, time
    embedder, adaLN tables) in float32 as ``from_pretrained(torch_dtype=...)`` does."""
    cast_keeping_fp32(model, dtype, fp32_modules(model.base.transformer))


def _created_by() -> str:
    try:
        return f"dcm-platform {metadata.version('dcm-platform')}"
    except metadata.PackageNotFoundError:
        return "dcm-platform"
