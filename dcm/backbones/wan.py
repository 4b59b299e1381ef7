"""Wan2.1 adapter over diffusers ``WanTransformer3DModel`` (0.42.1).

The forward follows ``WanTransformer3DModel.forward`` for text-to-video (no image
embedding, timestep (B,)). The text mask is not used: diffusers Wan attends to the
padded text embeddings, as the released model does.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dcm.backbones.base import Backbone, Cond, Variant


class WanBackbone(Backbone):
    kind = "wan"
    # METHOD.md section 6: DetE copies the timestep/text embedder and the output norm +
    # projection with its final scale_shift_table.
    detail_parts = ("condition_embedder", "norm_out", "proj_out", "scale_shift_table")
    # Self (attn1) and cross (attn2) attention of every block.
    lora_scope = r"blocks\.\d+\.attn[12]\.{targets}"

    def __init__(self, transformer) -> None:
        super().__init__(transformer)
        emb = transformer.condition_embedder
        if emb.image_embedder is not None or transformer.config.added_kv_proj_dim is not None:
            raise ValueError(
                "WanBackbone supports text-to-video transformers only: this one has an image "
                "embedding (image_dim / added_kv_proj_dim set); use a Wan T2V model"
            )

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.transformer.config.patch_size)  # type: ignore[return-value]

    @property
    def tap_blocks(self) -> int:
        return len(self.transformer.blocks)

    def _run(
        self, x: Tensor, t: Tensor, cond: Cond, every: int, variant: Variant | None
    ) -> tuple[Tensor, list[Tensor]]:
        self._check(x, cond)
        tr = self.transformer
        rotary = tr.rope(x)  # (cos, sin), each (1, N, 1, head_dim)
        h = tr.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)

        embedder = self._part("condition_embedder", variant)
        temb, t_proj, text, _ = embedder(t, cond.text)  # (B, D), (B, 6D), (B, L, D)
        t_proj = t_proj.unflatten(1, (6, -1))  # (B, 6, D)

        taps: list[Tensor] = []
        for i, block in enumerate(tr.blocks):
            h = self._block(block, variant, h, text, t_proj, rotary)
            if every and i % every == 0:
                taps.append(h)
        return self._final(h, temb, x.shape, variant), taps

    def project(
        self,
        tokens: Tensor,
        t: Tensor,
        latent_shape: Sequence[int],
        cond: Cond | None = None,
        variant: Variant | None = None,
    ) -> Tensor:
        # Wan's final adaLN depends on the timestep only (cond is not needed).
        t = self._timestep(tokens, t)
        embedder = self._part("condition_embedder", variant)
        # The time path of WanTimeTextImageEmbedding.forward.
        freq = embedder.timesteps_proj(t)
        emb_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        temb = embedder.time_embedder(freq.to(emb_dtype)).type_as(tokens)  # (B, D)
        return self._final(tokens, temb, latent_shape, variant)

    def _final(
        self, h: Tensor, temb: Tensor, latent_shape: Sequence[int], variant: Variant | None
    ) -> Tensor:
        """adaLN (shift, scale) + norm_out + proj_out + unpatchify: (B, N, D) -> (B, C, T, H, W)."""
        b = h.shape[0]
        f, hh, ww = self._tokens_grid(h, latent_shape)
        table = self._part("scale_shift_table", variant)  # (1, 2, D)
        shift, scale = (table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D)
        norm_out = self._part("norm_out", variant)
        proj_out = self._part("proj_out", variant)
        h = (norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        h = proj_out(h)  # (B, N, p_t * p_h * p_w * C)
        p_t, p_h, p_w = self.patch_size
        h = h.reshape(b, f, hh, ww, p_t, p_h, p_w, -1)
        h = h.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, p_t, h, p_h, w, p_w)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)
