"""Coordinate attention, the `ca` add-on.

Hou, Zhou and Feng, "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021,
https://arxiv.org/abs/2103.02907 (official code: houqb/CoordAttention, coordatt.py).

    z^h = mean over W, z^w = mean over H
    f = h_swish(BN(F1([z^h, z^w])))             F1 shared, C -> mip = max(8, C // 32)
    a^h = sigmoid(F_h(f^h)), a^w = sigmoid(F_w(f^w))
    y = x * a^h * a^w

Unlike SE, the gate keeps one position along each axis, so it can say *where* (which rows and which
columns) a channel matters at the cost of two 1-D pools.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .conv import check_int


class CoordAttention(nn.Module):
    """Coordinate attention gate, ``(B, C, H, W) -> (B, C, H, W)``."""

    paper = (
        "Coordinate Attention for Efficient Mobile Network Design (Hou et al., CVPR 2021) "
        "https://arxiv.org/abs/2103.02907"
    )
    options: dict[str, Any] = {}

    def __init__(self, dim: int) -> None:
        super().__init__()
        check_int("dim", dim)
        mip = max(8, dim // 32)
        self.conv1 = nn.Conv2d(dim, mip, 1)  # F1, shared by both directions
        self.norm = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()  # the official code's h_swish (hard-swish, not SiLU)
        self.conv_h = nn.Conv2d(mip, dim, 1)
        self.conv_w = nn.Conv2d(mip, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        # mean() rather than AdaptiveAvgPool2d((None, 1)): same numbers, and exporters handle it.
        z_h = x.mean(dim=3, keepdim=True)  # (B, C, H, 1)
        z_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        f = self.act(self.norm(self.conv1(torch.cat([z_h, z_w], dim=2))))  # (B, mip, H + W, 1)
        f_h, f_w = torch.split(f, [H, W], dim=2)
        a_h = self.conv_h(f_h).sigmoid()  # (B, C, H, 1)
        a_w = self.conv_w(f_w.transpose(2, 3)).sigmoid()  # (B, C, 1, W)
        return x * a_h * a_w
