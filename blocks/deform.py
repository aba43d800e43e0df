"""Modulated deformable convolution (DCNv2), the `deform` token mixer.

Zhu, Hu, Lin and Dai, "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019,
https://arxiv.org/abs/1811.11168.

    y(p) = sum_t w_t * m_t(p) * x(p + p_t + dp_t(p))

for the k*k taps p_t of a k x k kernel. A 3x3 conv predicts, per position, 2 offsets (dy, dx) and
one modulation scalar per tap; x is read by bilinear interpolation, zero outside the image.

hybridnas decisions:
- The offset/modulation conv starts at zero and the modulation is ``2 * sigmoid``, so at
  initialisation every offset is 0 and every modulation exactly 1: the block *is* a plain k x k
  conv (DCNv2's ``sigmoid`` would start at 0.5 x the conv).
- Pure PyTorch, no custom kernel: one ``grid_sample`` call gathers all k*k taps at once, then one
  matmul contracts (channels x taps) with the weights, so MAC counters see the main conv product.
  Sampling positions are computed and sampled in fp32 even under bf16 autocast: in bf16 a pixel
  coordinate of 28 is only exact to 1/8, which would blur even the zero-offset conv.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import check_groups, check_int


class DeformConv(nn.Module):
    """k x k modulated deformable conv (DCNv2), ``(B, C, H, W) -> (B, C, H, W)``."""

    paper = (
        "Deformable ConvNets v2: More Deformable, Better Results (Zhu et al., CVPR 2019) "
        "https://arxiv.org/abs/1811.11168"
    )
    options: dict[str, Any] = {"kernel": 3, "groups": 1}

    def __init__(self, dim: int, kernel: int = 3, groups: int = 1) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("kernel", kernel, odd=True)  # odd: taps are centred on the output pixel
        check_groups(groups, dim)
        self.dim, self.kernel, self.groups = dim, kernel, groups
        taps = kernel * kernel
        # Per tap t: channels 2t, 2t+1 = (dy, dx) offsets in pixels; channel 2*taps + t = modulation logit.
        self.offset = nn.Conv2d(dim, 3 * taps, 3, padding=1)
        self.weight = nn.Parameter(torch.empty(dim, dim // groups, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(dim))
        self._grids: dict[tuple, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Main weights as nn.Conv2d initialises them, so "deform at init" is a drop-in for "conv".
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt((self.dim // self.groups) * self.kernel**2)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def _base_grid(self, H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Zero-offset sampling positions of every tap, normalised for grid_sample: (taps, H, W, 2)."""
        key = (H, W, device, dtype)
        grid = self._grids.get(key)
        if grid is None:
            r = self.kernel // 2
            d = torch.arange(-r, r + 1, device=device, dtype=dtype)
            dy, dx = torch.meshgrid(d, d, indexing="ij")  # tap t = i * k + j, same order as the weight
            ys = torch.arange(H, device=device, dtype=dtype)
            xs = torch.arange(W, device=device, dtype=dtype)
            py = dy.reshape(-1, 1, 1) + ys.view(1, H, 1)  # (taps, H, 1) pixel row of each tap
            px = dx.reshape(-1, 1, 1) + xs.view(1, 1, W)  # (taps, 1, W)
            # align_corners=False: pixel p sits at (2p + 1) / size - 1, which is defined even for size 1.
            gx = ((2 * px + 1) / W - 1).expand(-1, H, W)
            gy = ((2 * py + 1) / H - 1).expand(-1, H, W)
            grid = torch.stack([gx, gy], dim=-1)
            if len(self._grids) >= 8:  # a model sees a handful of resolutions; don't grow without bound
                self._grids.clear()
            self._grids[key] = grid
        return grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        taps, g = self.kernel * self.kernel, self.groups
        om = self.offset(x)
        sample_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, fp64 kept
        with torch.autocast(device_type=x.device.type, enabled=False):
            om = om.to(sample_dtype)
            off = om[:, : 2 * taps].view(B, taps, 2, H, W)
            # Offsets are in pixels; one pixel is 2 / size in grid_sample's normalised coordinates.
            shift = torch.stack([off[:, :, 1] * (2.0 / W), off[:, :, 0] * (2.0 / H)], dim=-1)
            grid = (self._base_grid(H, W, x.device, sample_dtype) + shift).view(B, taps * H, W, 2)
            # All taps in one call: (B, C, taps * H, W); zeros padding = zero outside the image.
            cols = F.grid_sample(
                x.to(sample_dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            modulation = 2.0 * om[:, 2 * taps :].sigmoid()  # (B, taps, H, W), 1.0 at init
            cols = cols.view(B, C, taps, H, W) * modulation.unsqueeze(1)
        # (groups, out/g, in/g * taps) @ (B, groups, in/g * taps, HW) -> (B, groups, out/g, HW);
        # a plain matmul, so autocast runs it in bf16 and FlopCounterMode counts it. Back to x's
        # dtype so a model cast to bf16 (no autocast) matches its bf16 weights.
        cols = cols.to(x.dtype).view(B, g, (C // g) * taps, H * W)
        out = torch.matmul(
            self.weight.reshape(g, C // g, (C // g) * taps), cols
        )  # reshape: channels_last weights
        return out.view(B, C, H, W) + self.bias.view(1, C, 1, 1).to(out.dtype)
