"""Attention backend selection for diffusers transformers: 'auto', 'native' or 'flash'.

diffusers 0.42 routes every attention call through ``attention_dispatch``; a model's
``set_attention_backend(name)`` sets the backend on each attention processor. We expose
three choices (``cfg.model.attention``): 'native' is PyTorch SDPA, 'flash' is flash-attn,
and 'auto' picks flash-attn only where it can run (installed, CUDA, half precision) and
SDPA everywhere else. flash-attn stays an optional extra (DESIGN.md, runtime facts).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator

import torch
from torch import nn

from dcm.config import ConfigError

CHOICES = ("auto", "native", "flash")
# Our names -> diffusers AttentionBackendName values (diffusers/models/attention_dispatch.py).
DIFFUSERS_NAMES = {"native": "native", "flash": "flash"}


def flash_attn_available() -> bool:
    """flash-attn importable at a version diffusers accepts."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    from diffusers.models import attention_dispatch

    return bool(getattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", False))


def _diffusers_models(model: nn.Module) -> Iterator[nn.Module]:
    """The outermost sub-modules that are diffusers models (a Backbone or DualExpert wraps them)."""
    if hasattr(model, "set_attention_backend"):
        yield model
        return
    for child in model.children():
        yield from _diffusers_models(child)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' | 'native' | 'flash' -> the concrete choice 'native' or 'flash' for this model."""
    if name not in CHOICES:
        raise ConfigError(
            f"model.attention={name!r} is not allowed: choose one of {', '.join(CHOICES)}"
        )
    if name == "native":
        return "native"
    usable = flash_attn_available()
    if name == "flash":
        if not usable:
            raise ConfigError(
                "model.attention='flash' needs the flash-attn package (pip install "
                "'dcm-platform[gpu]' on a CUDA machine): install it or set model.attention=auto"
            )
        if device.type != "cuda":
            raise ConfigError(
                f"model.attention='flash' needs a CUDA device, the model is on {device.type}: "
                "set model.attention=auto"
            )
        return "flash"
    # auto: flash-attn kernels take fp16/bf16 on CUDA only
    half = dtype in (torch.float16, torch.bfloat16)
    return "flash" if usable and device.type == "cuda" and half else "native"


def set_attention_backend(model: nn.Module, name: str = "auto") -> str:
    """Select the attention backend of every diffusers model inside ``model``; returns
    the concrete backend ('native' or 'flash')."""
    targets = list(_diffusers_models(model))
    if not targets:
        raise ConfigError(
            f"{type(model).__name__} holds no diffusers model: attention backends apply to "
            "diffusers transformers"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    chosen = resolve_backend(name, device, dtype)
    # diffusers logs an "experimental feature" warning on every call; keep logs quiet.
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for target in targets:
            target.set_attention_backend(DIFFUSERS_NAMES[chosen])
    finally:
        log.setLevel(level)
    return chosen


def current_backends(model: nn.Module) -> set[str]:
    """The backend names set on ``model``'s attention processors (for checks and logs)."""
    found = set()
    for module in model.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            found.add(getattr(backend, "value", str(backend)))
    return found
