"""The stage-2 discriminator: one small conv head per teacher feature tap (METHOD.md section 6).

Each head sees one tap's image tokens (B, N, D) reshaped per latent frame into
(B*T', D, h, w), where (T', h, w) comes from ``Backbone.token_grid(latent_shape)``: the
grid is derived, never hard-coded, so any resolution and frame count works. A head is a
1x1 conv D -> hidden, GroupNorm(32), LeakyReLU(0.01), one residual block of the same and a
1x1 conv hidden -> 1, giving one logit per token. GroupNorm statistics are per latent
frame, which is why the tokens are split by frame rather than treated as one image.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _unit(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.GroupNorm(32, c_out), nn.LeakyReLU(0.01))


class _Head(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.inp = _unit(dim, hidden)
        self.res = _unit(hidden, hidden)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B*T', D, h, w) -> (B*T', 1, h, w)
        x = self.inp(x)
        x = x + self.res(x)
        return self.out(x)


class Discriminator(nn.Module):
    """``disc(taps, grid)`` -> one per-token logits tensor (B, N) per tap."""

    def __init__(self, num_taps: int, dim: int, hidden: int = 1024) -> None:
        super().__init__()
        if num_taps < 1:
            raise ValueError(f"Discriminator needs at least one tap, got num_taps={num_taps}")
        if hidden < 32 or hidden % 32:
            raise ValueError(
                f"method.disc_hidden={hidden} must be a positive multiple of 32 (GroupNorm(32))"
            )
        self.dim = dim
        self.heads = nn.ModuleList(_Head(dim, hidden) for _ in range(num_taps))

    def forward(self, taps: Sequence[Tensor], grid: Sequence[int]) -> list[Tensor]:
        if len(taps) != len(self.heads):
            raise ValueError(
                f"the discriminator has {len(self.heads)} heads but got {len(taps)} taps: "
                "build it with num_taps = backbone.num_taps(method.tap_every)"
            )
        f, h, w = (int(g) for g in grid)
        out = []
        for i, (tokens, head) in enumerate(zip(taps, self.heads, strict=True)):
            b, n, d = tokens.shape
            if n != f * h * w or d != self.dim:
                raise ValueError(
                    f"tap {i} has shape {tuple(tokens.shape)} but the token grid {f}x{h}x{w} "
                    f"and dim {self.dim} need (B, {f * h * w}, {self.dim}): pass "
                    "backbone.token_grid(latent_shape) of the latents these taps came from"
                )
            # Tokens are ordered (T', h, w) by the patch embedding's flatten.
            x = tokens.reshape(b, f, h, w, d).permute(0, 1, 4, 2, 3).reshape(b * f, d, h, w)
            out.append(head(x).reshape(b, n))  # (B, N) per-token logits
        return out
