"""Request limits from the config and the checks that turn a request into generation params.

Every rule names the field it guards so that the 4xx body says which field to fix:
steps in [serve.min_steps, serve.max_steps]; frames k * model.vae_temporal_factor + 1 up to
serve.max_frames; height and width multiples of model.vae_spatial_factor x patch up to
serve.max_height / serve.max_width; prompts non-empty and at most serve.max_prompt_chars.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

from dcm.config import Config
from serve.schemas import GenerateRequest

SEED_LIMIT = 2**32  # seeds are drawn / accepted in [0, 2^32)
DEFAULT_MODEL = "default"  # id of the model given by model.path


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP code, ``field`` the culprit."""

    def __init__(
        self, field: str | None, message: str, status: int = 422, kind: str = "invalid_request"
    ):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    min_steps: int
    max_steps: int
    default_steps: int
    max_frames: int
    max_height: int
    max_width: int
    max_prompt_chars: int
    frame_factor: int  # VAE temporal factor: frames = k * factor + 1
    unit_h: int  # VAE spatial factor x patch height
    unit_w: int  # VAE spatial factor x patch width
    default_frames: int
    default_height: int
    default_width: int
    models: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        s, m = cfg.serve, cfg.model
        return cls(
            min_steps=s.min_steps,
            max_steps=s.max_steps,
            default_steps=s.default_steps,
            max_frames=s.max_frames,
            max_height=s.max_height,
            max_width=s.max_width,
            max_prompt_chars=s.max_prompt_chars,
            frame_factor=m.vae_temporal_factor,
            unit_h=m.vae_spatial_factor * m.patch_size[1],
            unit_w=m.vae_spatial_factor * m.patch_size[2],
            default_frames=min(cfg.sample.num_frames or cfg.data.num_frames, s.max_frames),
            default_height=min(cfg.sample.height or cfg.data.height, s.max_height),
            default_width=min(cfg.sample.width or cfg.data.width, s.max_width),
            models=(DEFAULT_MODEL, *sorted(s.variants)),
        )


@dataclass(frozen=True)
class GenerationParams:
    """A validated request: everything the generator replica needs."""

    prompt: str
    steps: int
    seed: int
    num_frames: int
    height: int
    width: int
    format: str
    model: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(req: GenerateRequest, limits: Limits) -> GenerationParams:
    """Apply defaults and every limit; raise RequestError naming the first bad field."""
    prompt = req.prompt.strip()
    if not prompt:
        raise RequestError("prompt", "prompt is empty: describe the video to generate")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(
            "prompt",
            f"prompt has {len(prompt)} characters: at most {limits.max_prompt_chars} allowed",
        )
    if "\x00" in prompt:
        raise RequestError("prompt", "prompt contains a NUL character: remove it")

    steps = limits.default_steps if req.steps is None else req.steps
    if not limits.min_steps <= steps <= limits.max_steps:
        raise RequestError(
            "steps",
            f"steps={steps} is out of range: allowed {limits.min_steps}..{limits.max_steps}",
        )

    seed = secrets.randbelow(SEED_LIMIT) if req.seed is None else req.seed
    if not 0 <= seed < SEED_LIMIT:
        raise RequestError("seed", f"seed={seed} is out of range: allowed 0..{SEED_LIMIT - 1}")

    frames = limits.default_frames if req.num_frames is None else req.num_frames
    f = limits.frame_factor
    if not 1 <= frames <= limits.max_frames:
        raise RequestError(
            "num_frames", f"num_frames={frames} is out of range: allowed 1..{limits.max_frames}"
        )
    if (frames - 1) % f:
        near = (frames - 1) // f * f + 1
        raise RequestError(
            "num_frames",
            f"num_frames={frames} must be k*{f}+1 for the VAE's temporal factor (e.g. {near})",
        )

    height = _size("height", req.height, limits.default_height, limits.max_height, limits.unit_h)
    width = _size("width", req.width, limits.default_width, limits.max_width, limits.unit_w)

    model = req.model or DEFAULT_MODEL
    if model not in limits.models:
        raise RequestError(
            "model", f"model '{model[:80]}' is not served: choose one of {', '.join(limits.models)}"
        )
    return GenerationParams(prompt, steps, seed, frames, height, width, req.format, model)


def _size(field: str, value: int | None, default: int, top: int, unit: int) -> int:
    size = default if value is None else value
    if not unit <= size <= top:
        raise RequestError(field, f"{field}={size} is out of range: allowed {unit}..{top}")
    if size % unit:
        raise RequestError(
            field,
            f"{field}={size} must be a multiple of {unit} (VAE spatial factor x patch), "
            f"e.g. {max(unit, size // unit * unit)}",
        )
    return size
