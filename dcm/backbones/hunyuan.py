"""HunyuanVideo adapter over diffusers ``HunyuanVideoTransformer3DModel`` (0.42.1).

The forward follows ``HunyuanVideoTransformer3DModel.forward`` for text-to-video
(``image_condition_type=None``): the text mask feeds the token refiner and the joint
attention mask, ``pooled`` and embedded ``guidance`` feed the conditioning vector. Taps
come from the single-stream blocks, image tokens only (the text tokens are stripped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dcm.backbones.base import Backbone, Cond, Variant


class HunyuanVideoBackbone(Backbone):
    kind = "hunyuanvideo"
    # METHOD.md section 6: DetE copies the timestep/pooled-text/guidance embedder and the
    # output norm (adaLN) + projection.
    detail_parts = ("time_text_embed", "norm_out", "proj_out")
    # Dual-stream blocks, single-stream blocks and the text token refiner.
    lora_scope = (
        r"(?:transformer_blocks\.\d+\.attn|single_transformer_blocks\.\d+\.attn"
        r"|context_embedder\.token_refiner\.refiner_blocks\.\d+\.attn)\.{targets}"
    )

    def __init__(self, transformer) -> None:
        super().__init__(transformer)
        if transformer.config.image_condition_type is not None:
            raise ValueError(
                "HunyuanVideoBackbone supports text-to-video transformers only: this one has "
                f"image_condition_type={transformer.config.image_condition_type!r}"
            )

    @property
    def patch_size(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (int(c.patch_size_t), int(c.patch_size), int(c.patch_size))

    @property
    def tap_blocks(self) -> int:
        return len(self.transformer.single_transformer_blocks)

    def _conditioning(self, t: Tensor, cond: Cond | None, variant: Variant | None) -> Tensor:
        """temb (B, D) = time + guidance + pooled-text embeddings."""
        if cond is None or cond.pooled is None:
            raise ValueError("HunyuanVideo needs cond.pooled (the pooled CLIP text embedding)")
        guidance = cond.guidance
        if self.transformer.config.guidance_embeds:
            if guidance is None:
                raise ValueError(
                    "HunyuanVideo needs cond.guidance (B,): set it to method.embedded_guidance"
                )
            guidance = guidance.to(device=t.device)
            if guidance.ndim == 0:
                guidance = guidance.expand(t.shape[0])
        temb, _ = self._part("time_text_embed", variant)(t, cond.pooled, guidance)
        return temb

    def _run(
        self, x: Tensor, t: Tensor, cond: Cond, every: int, variant: Variant | None
    ) -> tuple[Tensor, list[Tensor]]:
        self._check(x, cond)
        tr = self.transformer
        b = x.shape[0]
        rotary = tr.rope(x)  # (cos, sin), each (N, head_dim)
        temb = self._conditioning(t, cond, variant)  # (B, D)
        h = tr.x_embedder(x)  # (B, N, D)

        mask = cond.mask
        if mask is None:
            mask = torch.ones(cond.text.shape[:2], dtype=torch.long, device=x.device)
        self._prepare(tr.context_embedder, variant)
        text = tr.context_embedder(cond.text, t, mask)  # (B, L, D)

        # Joint attention mask [B, 1, 1, N + L]: the latent tokens and the real text tokens
        # (text is left-aligned, so the first mask.sum() text positions are real).
        n_img, n_txt = h.shape[1], text.shape[1]
        valid = n_img + mask.sum(dim=1, dtype=torch.int)  # (B,)
        idx = torch.arange(n_img + n_txt, device=x.device).unsqueeze(0)  # (1, N + L)
        attn_mask = (idx < valid.unsqueeze(1)).view(b, 1, 1, n_img + n_txt)

        for block in tr.transformer_blocks:
            h, text = self._block(block, variant, h, text, temb, attn_mask, rotary)
        taps: list[Tensor] = []
        for i, block in enumerate(tr.single_transformer_blocks):
            h, text = self._block(block, variant, h, text, temb, attn_mask, rotary)
            if every and i % every == 0:
                taps.append(h)  # image tokens only: the block returns text separately
        return self._final(h, temb, x.shape, variant), taps

    def project(
        self,
        tokens: Tensor,
        t: Tensor,
        latent_shape: Sequence[int],
        cond: Cond | None = None,
        variant: Variant | None = None,
    ) -> Tensor:
        # HunyuanVideo's final adaLN is driven by time + guidance + pooled text, so unlike
        # Wan it needs the cond the tokens were computed with.
        t = self._timestep(tokens, t)
        return self._final(tokens, self._conditioning(t, cond, variant), latent_shape, variant)

    def _final(
        self, h: Tensor, temb: Tensor, latent_shape: Sequence[int], variant: Variant | None
    ) -> Tensor:
        """norm_out (adaLN at temb) + proj_out + unpatchify: (B, N, D) -> (B, C, T, H, W)."""
        b = h.shape[0]
        f, hh, ww = self._tokens_grid(h, latent_shape)
        h = self._part("norm_out", variant)(h, temb)
        h = self._part("proj_out", variant)(h)  # (B, N, C * p_t * p * p)
        p_t, p, _ = self.patch_size
        h = h.reshape(b, f, hh, ww, -1, p_t, p, p)
        h = h.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, f, p_t, h, p, w, p)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)
