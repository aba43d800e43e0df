"""SPD-Conv, the `spd` downsampler (and the space-to-depth op Swin patch merging shares).

Sunkara and Luo, "No More Strided Convolutions or Pooling: A New CNN Building Block for
Low-Resolution Images and Small Objects", ECML-PKDD 2022, https://arxiv.org/abs/2208.03641
(official code: LabSAINT/SPD-Conv).

Space-to-depth moves each 2x2 patch into channels, losing nothing, then a *non-strided* 3x3 conv
maps the 4C channels to the output width. Sub-maps are stacked in the official (row, col) offset
order (0,0), (1,0), (0,1), (1,1) -- the same order as Swin patch merging and YOLOv5 Focus, and not
``nn.PixelUnshuffle``'s (which is channel-major), which matters when porting weights. Odd sizes are
zero-padded at the bottom/right to even, so the output is ceil(H/2) x ceil(W/2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import check_int


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, 4C, ceil(H/2), ceil(W/2))``; channel block ``r + 2s`` is ``x[..., r::2, s::2]``.

    Equal to ``cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)``
    after zero-padding odd H / W at the bottom / right.
    """
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        x = F.pad(x, (0, W % 2, 0, H % 2))
        H, W = H + H % 2, W + W % 2
    # One reshape + permute (a single copy) instead of four strided slices and a cat.
    x = x.reshape(B, C, H // 2, 2, W // 2, 2)  # (B, C, h, r, w, s)
    return x.permute(0, 5, 3, 1, 2, 4).reshape(B, 4 * C, H // 2, W // 2)  # block index = s * 2 + r


class SPDConv(nn.Module):
    """Space-to-depth + 3x3 conv + BatchNorm: ``(B, in, H, W) -> (B, out, ceil(H/2), ceil(W/2))``."""

    paper = (
        "SPD-Conv: No More Strided Convolutions or Pooling (Sunkara & Luo, ECML-PKDD 2022) "
        "https://arxiv.org/abs/2208.03641"
    )
    options: dict[str, Any] = {}

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        check_int("in_dim", in_dim)
        check_int("out_dim", out_dim)
        # SPD followed by a 1x1 conv would be exactly a 2x2 stride-2 conv (SPD-Conv issue #5); the
        # 3x3 conv is what makes it more: a 6x6 stride-2 receptive field.
        self.conv = nn.Conv2d(4 * in_dim, out_dim, 3, padding=1, bias=False)  # BN has the bias
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(space_to_depth(x)))
