"""``VideoGenerator``: prompts -> uint8 videos from a bundle or a distilled artifact.

One object used by the CLI (``dcm generate``), evaluation and Serve. It loads once:

- a diffusers bundle (or 'bundled:shapes'): the teacher; as a student both experts are the
  base model (so few-step sampling of an undistilled model is the baseline);
- a distilled artifact (``dcm_artifact.json``): the ``DualExpert`` it holds, plus the bundle
  at its ``bundle_path`` for the VAE, the text encoder and (on first teacher use) the
  original transformer as the teacher.

``generate`` draws noise from ``torch.Generator().manual_seed(seed)`` in the latent shape
(on the CPU, so a seed gives the same video on any device), runs ``dcm.sampler.sample`` on
``Schedule.sampling_sigmas(steps)``, or the teacher with guidance on its own scheduler
(``dcm.teacher_sampler``: the folder's ``scheduler/`` config, as the diffusers pipeline
samples it), then de-normalises and decodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcm.attention import set_attention_backend
from dcm.backbones.base import Backbone, Cond, make_backbone
from dcm.bundle import Bundle, BundleError, load_bundle, resolve_model_path
from dcm.config import SIGMA_PRESETS, Config, ConfigError, MethodConfig, load_config
from dcm.experts import (
    ARTIFACT_JSON,
    DualExpert,
    artifact_config,
    find_bundle,
    read_artifact_meta,
)
from dcm.export import is_exported, load_exported
from dcm.guidance import with_embedded_guidance
from dcm.sampler import fresh_seed, sample
from dcm.schedule import Schedule
from dcm.teacher_sampler import TeacherSampler


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """cfg.model.dtype -> torch dtype: 'auto' is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def to_uint8(video: Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> uint8 (B, F, H, W, 3)."""
    pixels = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()


def encoder_prompts(prompts: Sequence[str], backbone: str) -> list[str]:
    """Prompts as the stock diffusers pipeline hands them to the tokenizer.

    WanPipeline cleans each prompt first (ftfy when installed, HTML entities unescaped
    twice, whitespace runs collapsed, ends stripped); doing the same makes a seed give the
    same latents here and in an exported folder run by stock diffusers.
    """
    if backbone != "wan":
        return list(prompts)
    out = []
    for text in prompts:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        out.append(re.sub(r"\s+", " ", text).strip())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class VideoGenerator:
    """A loaded model (student experts, teacher, VAE, text encoder) that writes videos."""

    def __init__(
        self,
        bundle: Bundle,
        student: DualExpert,
        cfg: Config,
        method: MethodConfig,
        teacher: Backbone | None = None,
        source: str = "bundle",
    ) -> None:
        self.bundle = bundle
        self.student = student
        self.cfg = cfg
        self.method = method  # the student's grid and split (from the artifact if any)
        self._teacher = teacher
        self._teacher_sampler: TeacherSampler | None = None
        self.source = source  # "bundle" | "artifact" | "exported"
        # where the teacher transformer and scheduler live (None: not available)
        self.teacher_root: Path | str | None = bundle.path
        self.device = bundle.device
        self.fps = cfg.model.fps
        self.last_timings: dict[str, float] = {}
        # what the last video was made with (the CLI writes it next to the file)
        self.last_meta: dict[str, Any] = {}
        self._split_warned = False

    def untrained(self) -> VideoGenerator:
        """The student's starting point on the same bundle and grid: the teacher's own
        weights in the DCM sampler without guidance (what distillation is compared with)."""
        teacher = self.teacher
        student = DualExpert(teacher).eval().requires_grad_(False)
        gen = VideoGenerator(self.bundle, student, self.cfg, self.method, teacher, "untrained")
        gen.teacher_root = self.teacher_root
        return gen

    # ------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", cfg: Config | None = None
    ) -> VideoGenerator:
        """Load a bundle folder, 'bundled:shapes', a hub id or a distilled artifact, once.

        ``cfg`` supplies text length, fps, guidance, attention and default sizes; without
        one an artifact's own training config is used (``artifact_config``), else the
        shapes-tiny preset (pass the matching preset for real models).
        """
        root = resolve_model_path(path)
        if cfg is None and (root / ARTIFACT_JSON).is_file():
            try:
                base = artifact_config(root)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            cfg = load_config(base=base) if base is not None else None
        cfg = cfg or load_config()
        device = torch.device(device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        if is_exported(root):
            return cls._load_exported(root, device, dtype, cfg)
        if (root / ARTIFACT_JSON).is_file():
            return cls._load_artifact(root, device, dtype, cfg)
        bundle = load_bundle(root, device, dtype, text_max_length=cfg.model.text_max_length)
        teacher = make_backbone(bundle.transformer).eval().requires_grad_(False)
        set_attention_backend(teacher, cfg.model.attention)
        # The undistilled model as a student: both experts are the base model.
        student = DualExpert(teacher).eval().requires_grad_(False)
        return cls(bundle, student, cfg, cfg.method, teacher=teacher, source="bundle")

    @classmethod
    def _load_artifact(
        cls, root: Path, device: torch.device, dtype: torch.dtype, cfg: Config
    ) -> VideoGenerator:
        try:
            meta = read_artifact_meta(root)
            student = DualExpert.load_artifact(root, device, dtype)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            bundle_path = find_bundle(root, meta, cfg.model.base)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            bundle = load_bundle(
                bundle_path,
                device,
                dtype,
                components=["vae", "text_encoder"],
                text_max_length=cfg.model.text_max_length,
            )
        except BundleError as err:
            raise ConfigError(
                f"artifact '{root}' needs its bundle ({bundle_path}): {err}"
            ) from None
        channels = student.base.transformer.config.in_channels
        if channels != bundle.latent_channels:
            raise ConfigError(
                f"artifact '{root}' has {channels} latent channels but its bundle "
                f"'{bundle_path}' has {bundle.latent_channels}: it belongs to another model"
            )
        student.eval().requires_grad_(False)
        set_attention_backend(student, cfg.model.attention)
        # The student's grid and split are the ones it was distilled with.
        saved = meta.get("method") or {}
        keys = ("shift", "grid_points", "split")
        method = dataclasses.replace(cfg.method, **{k: saved[k] for k in keys if k in saved})
        return cls(bundle, student, cfg, method, teacher=None, source="artifact")

    @classmethod
    def _load_exported(
        cls, root: Path, device: torch.device, dtype: torch.dtype, cfg: Config
    ) -> VideoGenerator:
        """An exported diffusers folder (``dcm.export``): its transformers are the experts,
        its dcm_sampling.json the grid and sampling defaults, its VAE and text encoder."""
        student, info = load_exported(root, device, dtype)
        # The model's facts come from the folder; sizes only where the caller set none.
        facts = {
            "model.backbone": info["backbone"],
            "model.text_max_length": info["max_sequence_length"],
            "model.fps": info["fps"],
            "method.guidance": info["guidance"],
            "method.embedded_guidance": info["embedded_guidance"],
            "sample.sigma_preset": "",
        }
        for key in ("num_frames", "height", "width"):
            if not getattr(cfg.sample, key):
                facts[f"sample.{key}"] = info[key]
        cfg = cfg.replace(**facts)
        bundle = load_bundle(
            root, device, dtype, components=["vae", "text_encoder"],
            text_max_length=cfg.model.text_max_length,
        )  # fmt: skip
        set_attention_backend(student, cfg.model.attention)
        method = dataclasses.replace(cfg.method, **info["method"])
        gen = cls(bundle, student, cfg, method, teacher=None, source="exported")
        # The folder holds no teacher: the one it was distilled from, where it still is.
        teacher = str(info.get("teacher") or "")
        local = teacher.startswith("bundled:") or (Path(teacher) / "model_index.json").is_file()
        gen.teacher_root = teacher if local else None
        return gen

    @property
    def teacher(self) -> Backbone:
        """The original base model (for an artifact: loaded from its bundle on first use)."""
        if self._teacher is None:
            b = self.bundle
            if self.teacher_root is None:
                raise ConfigError(
                    f"'{b.path}' is an exported model without its teacher here: pass the teacher "
                    "bundle as --model for teacher runs (or skip them, e.g. --no-teacher)"
                )
            full = load_bundle(self.teacher_root, b.device, b.dtype, components=["transformer"])
            self._teacher = make_backbone(full.transformer).eval().requires_grad_(False)
            set_attention_backend(self._teacher, self.cfg.model.attention)
        return self._teacher

    @property
    def teacher_sampler(self) -> TeacherSampler:
        """How the teacher is sampled: its folder's scheduler (else the distillation grid)."""
        if self._teacher_sampler is None:
            grid = Schedule.from_config(self.cfg.method)
            root = self.teacher_root if self.teacher_root is not None else self.bundle.path
            self._teacher_sampler = TeacherSampler.from_bundle(resolve_model_path(root), grid)
        return self._teacher_sampler

    def teacher_description(self, steps: int) -> str:
        """The teacher baseline in words, e.g. 'teacher, FlowMatchEuler shift 3.0, 50 steps +
        CFG w=5' (every table names its sampler)."""
        return self.teacher_sampler.describe(int(steps), self.cfg.method)

    # ------------------------------------------------------------ checks
    def _sizes(
        self, num_frames: int | None, height: int | None, width: int | None
    ) -> tuple[int, int, int]:
        s, d = self.cfg.sample, self.cfg.data
        f = num_frames or s.num_frames or d.num_frames
        h = height or s.height or d.height
        w = width or s.width or d.width
        tf = self.bundle.temporal_factor
        if f < 1 or (f - 1) % tf:
            k = max(0, (f - 1) // tf)
            raise ConfigError(
                f"num_frames={f} must be k*{tf}+1 for the VAE's temporal factor "
                f"(e.g. {k * tf + 1} or {(k + 1) * tf + 1})"
            )
        _, ph, pw = self.bundle.patch_size
        for axis, size, p in (("height", h, ph), ("width", w, pw)):
            unit = self.bundle.spatial_factor * p
            if size < unit or size % unit:
                raise ConfigError(
                    f"{axis}={size} must be a positive multiple of {unit} "
                    f"(VAE factor {self.bundle.spatial_factor} x patch {p})"
                )
        return f, h, w

    def schedule(self, split: int | None = None) -> Schedule:
        """The student's grid; ``split`` overrides its boundary b (routing moves with it)."""
        m = self.method
        b = m.split if split is None else int(split)
        # -1: one consistency model (the ablation's single expert) takes every step
        if not -1 <= b <= m.grid_points - 2:
            raise ConfigError(
                f"split={b} must lie in 0..{m.grid_points - 2} (grid of {m.grid_points}) "
                "or be -1 (one expert for every step)"
            )
        return Schedule(shift=m.shift, grid_points=m.grid_points, split=b)

    def sigmas(self, steps: int, split: int | None = None) -> list[float]:
        """The student's descending sigma list for ``steps`` (a matching preset wins)."""
        preset = self.cfg.sample.sigma_preset
        if preset and steps != len(SIGMA_PRESETS[preset]):
            preset = ""
        return self.schedule(split).sampling_sigmas(int(steps), preset)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        steps: int = 4,
        seed: int | Sequence[int] = 0,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        split: int | None = None,
        teacher: bool = False,
        teacher_steps: int = 50,
        callback: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """uint8 videos (B, F, H, W, 3), one per prompt; timings in ``last_timings``.

        ``callback(k, n)`` runs after each student sampling step (Serve's job progress; an
        exception it raises aborts the generation).

        ``seed``: one int draws the whole batch's noise from one generator; a list gives row
        i its own seed, so row i equals ``generate([prompts[i]], seed=seed[i])`` whatever the
        batch it runs in (Serve batches concurrent requests this way).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ConfigError("prompts is empty: pass at least one prompt")
        f, h, w = self._sizes(num_frames, height, width)
        self.last_meta = self._describe_call(steps, seed, f, h, w, split, teacher, teacher_steps)
        start = time.perf_counter()
        b, dev = self.bundle, self.device

        # 1. text -> Cond; noise from the seed in the latent shape (B, C, T, h, w)
        cond = b.encode_text(encoder_prompts(prompts, b.backbone_kind))
        noise = self.noise(len(prompts), seed, f, h, w).to(dev)
        _sync(dev)
        t_encode = time.perf_counter()

        # 2. denoise: teacher (guided, METHOD.md section 7) or the experts. The sampler keeps
        # x in float32; half-precision weights run under autocast (the runner's policy).
        with self._precision():
            fresh = self._fresh_noise(len(prompts), seed, f, h, w)
            z, nfe = self._denoise(
                noise, cond, steps, split, teacher, teacher_steps, callback, fresh
            )
        _sync(dev)
        t_denoise = time.perf_counter()

        # 3. de-normalise + VAE decode -> uint8 frames
        frames = to_uint8(b.decode(z))
        t_end = time.perf_counter()
        self.last_timings = {
            "nfe": float(nfe),
            "encode_s": t_encode - start,
            "denoise_s": t_denoise - t_encode,
            "decode_s": t_end - t_denoise,
            "total_s": t_end - start,
        }
        return frames

    def _describe_call(
        self,
        steps: int,
        seed: Any,
        f: int,
        h: int,
        w: int,
        split: int | None,
        teacher: bool,
        teacher_steps: int,
    ) -> dict[str, Any]:
        """The settings of one call; warns once when ``split`` re-routes a trained artifact."""
        trained = self.method.split if self.source == "artifact" else None
        meta: dict[str, Any] = {
            "model": str(self.bundle.path) if self.source == "bundle" else "artifact",
            "backbone": self.bundle.backbone_kind,
            "sampler": "teacher" if teacher else "experts",
            "steps": int(teacher_steps if teacher else steps),
            "seed": int(seed) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed],
            "num_frames": f,
            "height": h,
            "width": w,
            "fps": self.fps,
            "split": trained if split is None else int(split),
            "renoise": 0.0 if teacher else float(self.cfg.sample.renoise),
            "trained_split": trained,
        }
        if not teacher and trained is not None and split is not None and int(split) != trained:
            meta["split_override"] = True
            if not self._split_warned:
                self._split_warned = True
                warnings.warn(
                    f"split={split} differs from the split this artifact was trained with "
                    f"({trained}): the experts are routed at a boundary they never learned",
                    stacklevel=3,
                )
        return meta

    def noise(
        self, batch: int, seed: int | Sequence[int], num_frames: int, height: int, width: int
    ) -> Tensor:
        """float32 CPU noise (B, C, T, h, w): from one seed, or one seed per row."""
        shape = self.bundle.latent_shape(num_frames, height, width)
        if isinstance(seed, (int, np.integer)):
            return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(int(seed)))
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise ConfigError(f"{len(seeds)} seeds for {batch} prompts: give one seed per prompt")
        rows = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.cat(rows)

    def _fresh_noise(
        self, batch: int, seed: int | Sequence[int], num_frames: int, height: int, width: int
    ) -> Callable[[int], Tensor]:
        """Step k's fresh noise for ``sample.renoise``: ``noise`` from ``fresh_seed(seed, k)``
        (per row for a seed list), so a video still depends on its own seed alone."""

        def draw(k: int) -> Tensor:
            if isinstance(seed, (int, np.integer)):
                moved: int | list[int] = fresh_seed(int(seed), k)
            else:
                moved = [fresh_seed(s, k) for s in seed]
            return self.noise(batch, moved, num_frames, height, width).to(self.device)

        return draw

    def _precision(self) -> contextlib.AbstractContextManager:
        half = self.bundle.dtype in (torch.float16, torch.bfloat16)
        if not half:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.bundle.dtype)

    def _denoise(
        self,
        noise: Tensor,
        cond: Cond,
        steps: int,
        split: int | None,
        teacher: bool,
        teacher_steps: int,
        callback: Callable[[int, int], None] | None = None,
        fresh: Callable[[int], Tensor] | None = None,
    ) -> tuple[Tensor, int]:
        """Normalised latents at sigma 0 and the number of network evaluations used."""
        batch = noise.shape[0]
        if teacher:  # the teacher's own scheduler from its folder (dcm.teacher_sampler)
            method, sampler = self.cfg.method, self.teacher_sampler
            null = self.bundle.null_cond(batch) if method.guidance == "cfg" else None
            z = sampler.sample(self.teacher, noise, cond, null, int(teacher_steps), method)
            return z, sampler.nfe(int(teacher_steps), method)
        sig = self.sigmas(steps, split)
        cond = with_embedded_guidance(cond, self.method, batch)
        renoise = self.cfg.sample.renoise
        sch = self.schedule(split)
        z = sample(self.student, noise, cond, sig, sch, callback, renoise=renoise, fresh=fresh)
        return z, len(sig) - 1

    def describe(self) -> dict[str, Any]:
        """What is loaded (for logs, Serve health and the CLI)."""
        return {
            "source": self.source,
            "bundle": str(self.bundle.path),
            "backbone": self.bundle.backbone_kind,
            "has_detail": self.student.has_detail,
            "split": self.method.split,
            "device": str(self.device),
            "dtype": str(self.bundle.dtype).replace("torch.", ""),
        }
