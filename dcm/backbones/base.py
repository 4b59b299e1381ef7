"""One diffusers video transformer behind one interface (METHOD.md sections 1 and 6).

A ``Backbone`` wraps ONE diffusers transformer (``self.transformer``) and re-writes its
forward from the transformer's own submodules (rope, patch embedding, condition
embedders, blocks, output norm and projection). Writing the forward here, rather than
calling ``transformer(...)``, is what makes three things possible:

- feature taps: the raw image tokens after chosen blocks (the discriminator's input);
- ``project``: the transformer's final layer applied to any tapped tokens (feature matching);
- a ``Variant``: per-call replacements of top-level modules plus a hook run before each
  block, which is how ``dcm.experts.DualExpert`` runs its detail expert (LoRA switched on,
  copied conditioning embedder and output layer) on the same weights.

Parity with the plain diffusers forward is tested (tests/test_backbones.py).
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Cond:
    """Text conditioning of a batch; every field has the batch as its first dim."""

    text: Tensor  # (B, L, D) text-encoder hidden states
    mask: Tensor | None = None  # (B, L) 1 = real token
    pooled: Tensor | None = None  # (B, P) HunyuanVideo pooled CLIP text
    guidance: Tensor | None = None  # (B,) embedded guidance (HunyuanVideo)

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def index(self, idx: Any) -> Cond:
        """Rows ``idx`` (a LongTensor, slice or bool mask) of every field."""
        return Cond(**{k: None if v is None else v[idx] for k, v in self._fields().items()})

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Rows of several Conds stacked; they must set the same fields and text length."""
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond")
        out: dict[str, Tensor | None] = {}
        for name in conds[0]._fields():
            vals = [getattr(c, name) for c in conds]
            if all(v is None for v in vals):
                out[name] = None
            elif any(v is None for v in vals):
                raise ValueError(
                    f"Cond.cat: field '{name}' is set in some Conds and None in others"
                )
            else:
                out[name] = torch.cat(vals, dim=0)
        return Cond(**out)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Cond:
        """Moved to ``device``; ``dtype`` applies to the float features (text, pooled) only:
        the mask stays integer and guidance stays float32 (METHOD.md section 1)."""
        out = {}
        for name, v in self._fields().items():
            if v is None:
                out[name] = None
            elif name in ("text", "pooled") and dtype is not None:
                out[name] = v.to(device=device, dtype=dtype)
            else:
                out[name] = v.to(device=device)
        return Cond(**out)

    def _fields(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Variant:
    """How one call deviates from the plain transformer (used by ``DualExpert`` for DetE).

    modules: replacements of top-level transformer attributes by name (``detail_parts``).
    prepare: called with each block (and the Hunyuan text refiner) right before it runs,
    also when activation checkpointing recomputes it in backward, so per-module state such
    as LoRA on/off is always the one this call needs.
    """

    modules: Mapping[str, nn.Module | nn.Parameter] = field(default_factory=dict)
    prepare: Callable[[nn.Module], None] | None = None


class Backbone(nn.Module, abc.ABC):
    """Velocity, feature taps and final-layer projection over one diffusers transformer."""

    kind: str = ""
    # Top-level transformer attributes the detail expert copies (METHOD.md section 6).
    detail_parts: tuple[str, ...] = ()
    # Regex (re.fullmatch) of the attention modules that get LoRA; '{targets}' is filled
    # with the alternation of LoraConfig.target_modules.
    lora_scope: str = ""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.checkpointing = False

    # ------------------------------------------------------------ public API
    def forward(self, x: Tensor, t: Tensor, cond: Cond, variant: Variant | None = None) -> Tensor:
        """Velocity (B, C, T, H, W) at x (B, C, T, H, W), t = 1000 sigma (B,) float32."""
        return self._run(x, self._timestep(x, t), cond, 0, variant)[0]

    def forward_with_taps(
        self, x: Tensor, t: Tensor, cond: Cond, every: int = 2, variant: Variant | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Velocity and the raw image tokens (B, N, D) after tapped blocks 0, every, ..."""
        if every < 1:
            raise ValueError(f"forward_with_taps: every={every} must be at least 1")
        return self._run(x, self._timestep(x, t), cond, every, variant)

    @abc.abstractmethod
    def project(
        self,
        tokens: Tensor,
        t: Tensor,
        latent_shape: Sequence[int],
        cond: Cond | None = None,
        variant: Variant | None = None,
    ) -> Tensor:
        """The final layer (adaLN at t, norm_out, proj_out, unpatchify) on tapped tokens
        (B, N, D) -> (B, C, T, H, W) for a latent of ``latent_shape`` (METHOD.md section 6)."""

    @property
    @abc.abstractmethod
    def patch_size(self) -> tuple[int, int, int]:
        """(p_t, p_h, p_w) of the patch embedding."""

    @property
    def dim(self) -> int:
        """Width D of the image tokens (heads x head dim of the diffusers config)."""
        c = self.transformer.config
        return int(c.num_attention_heads * c.attention_head_dim)

    @property
    @abc.abstractmethod
    def tap_blocks(self) -> int:
        """Number of blocks the taps are taken from."""

    def num_taps(self, every: int = 2) -> int:
        """How many taps ``forward_with_taps(..., every)`` returns."""
        return (self.tap_blocks - 1) // every + 1

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(T', h, w) token grid of a latent whose last three dims are (T, H, W)."""
        if len(latent_shape) < 3:
            raise ValueError(f"token_grid: latent shape {tuple(latent_shape)} needs (..., T, H, W)")
        sizes = tuple(int(s) for s in latent_shape[-3:])
        for axis, size, p in zip("THW", sizes, self.patch_size, strict=True):
            if size % p:
                raise ValueError(
                    f"latent {axis}={size} is not divisible by the {self.kind} patch size {p}: "
                    f"choose a frame count / resolution whose latent {axis} is a multiple of {p}"
                )
        return tuple(s // p for s, p in zip(sizes, self.patch_size, strict=True))  # type: ignore[return-value]

    def _tokens_grid(self, tokens: Tensor, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """``token_grid(latent_shape)``, checked against the N of ``tokens`` (B, N, D)."""
        f, hh, ww = self.token_grid(latent_shape)
        if tokens.shape[1] != f * hh * ww:
            raise ValueError(
                f"project: {tokens.shape[1]} tokens do not match the latent shape "
                f"{tuple(latent_shape)} (token grid {f}x{hh}x{ww})"
            )
        return f, hh, ww

    def set_checkpointing(self, enabled: bool) -> None:
        """Recompute every block in backward (only while grad is enabled)."""
        self.checkpointing = bool(enabled)

    def lora_target_regex(self, target_modules: Sequence[str]) -> str:
        """peft ``target_modules`` regex: these projections inside this backbone's attentions."""
        alts = "|".join(re.escape(m) for m in target_modules)
        return self.lora_scope.format(targets=f"(?:{alts})")

    # ------------------------------------------------------------ shared helpers
    @abc.abstractmethod
    def _run(
        self, x: Tensor, t: Tensor, cond: Cond, every: int, variant: Variant | None
    ) -> tuple[Tensor, list[Tensor]]:
        """Velocity and taps (none when every == 0)."""

    def _part(self, name: str, variant: Variant | None) -> Any:
        """A top-level transformer module/parameter, or its replacement in ``variant``."""
        if variant is not None and name in variant.modules:
            return variant.modules[name]
        return getattr(self.transformer, name)

    @staticmethod
    def _prepare(module: nn.Module, variant: Variant | None) -> None:
        if variant is not None and variant.prepare is not None:
            variant.prepare(module)

    def _block(self, block: nn.Module, variant: Variant | None, *args: Any) -> Any:
        """Run one block; under checkpointing it is recomputed in backward (the prepare
        hook runs inside, so the recomputation sees the same LoRA state)."""

        def run(*a: Any) -> Any:
            self._prepare(block, variant)
            return block(*a)

        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False)
        return run(*args)

    @staticmethod
    def _timestep(x: Tensor, t: Tensor) -> Tensor:
        # Always float32: bf16 would round 977.64 to 976 (METHOD.md section 1).
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timestep shape {tuple(t.shape)} must be (B,) = ({x.shape[0]},)")
        return t.to(torch.float32)

    @staticmethod
    def _check(x: Tensor, cond: Cond) -> None:
        if x.ndim != 5:
            raise ValueError(f"latents must be (B, C, T, H, W); got shape {tuple(x.shape)}")
        if cond.text.shape[0] != x.shape[0]:
            raise ValueError(
                f"cond.text has {cond.text.shape[0]} rows but the latents have {x.shape[0]}"
            )


def cast_keeping_fp32(module: nn.Module, dtype: torch.dtype, keep: Sequence[str] = ()) -> nn.Module:
    """Cast ``module``'s floating weights to ``dtype`` in place, except those under a module
    named in ``keep`` (diffusers' ``_keep_in_fp32_modules``: rope, time embedder, adaLN
    tables), which stay float32 as ``from_pretrained(torch_dtype=...)`` leaves them."""
    if dtype == torch.float32:
        return module
    keep = set(keep)
    for mod_name, sub in module.named_modules():
        kept = bool(keep & set(mod_name.split(".")))
        for key, p in sub.named_parameters(recurse=False):
            if p.is_floating_point() and not (kept or key in keep):
                p.data = p.data.to(dtype)
        for key, buf in sub.named_buffers(recurse=False):
            if buf.is_floating_point() and not (kept or key in keep):
                setattr(sub, key, buf.to(dtype))
    return module


def fp32_modules(transformer: nn.Module) -> tuple[str, ...]:
    """The module names a diffusers transformer keeps in float32 under half precision."""
    if isinstance(transformer, Backbone):
        transformer = transformer.transformer
    return tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())


def make_backbone(transformer: nn.Module) -> Backbone:
    """The adapter for a diffusers transformer, chosen by its class."""
    if isinstance(transformer, Backbone):
        return transformer
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    from dcm.backbones.hunyuan import HunyuanVideoBackbone
    from dcm.backbones.wan import WanBackbone

    if isinstance(transformer, WanTransformer3DModel):
        return WanBackbone(transformer)
    if isinstance(transformer, HunyuanVideoTransformer3DModel):
        return HunyuanVideoBackbone(transformer)
    raise ValueError(
        f"no backbone adapter for {type(transformer).__name__}: use a diffusers "
        "WanTransformer3DModel or HunyuanVideoTransformer3DModel"
    )
