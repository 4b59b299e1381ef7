"""Backbone adapters over the diffusers video transformers (Wan2.1, HunyuanVideo)."""

from dcm.backbones.base import Backbone, Cond, Variant, make_backbone
from dcm.backbones.hunyuan import HunyuanVideoBackbone
from dcm.backbones.wan import WanBackbone

__all__ = [
    "Backbone",
    "Cond",
    "HunyuanVideoBackbone",
    "Variant",
    "WanBackbone",
    "make_backbone",
]
