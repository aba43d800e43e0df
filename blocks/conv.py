"""Plain convolutions: the `conv` token mixer and the strided-conv downsampler.

The mixer is the convolution baseline that ACmix (Pan et al., "On the Integration of Self-Attention
and Convolution", CVPR 2022, https://arxiv.org/abs/2111.14556) compares attention against: a k x k
convolution with zero padding, so the map size is kept. ``groups=dim`` makes it depthwise.

The argument checks at the bottom are shared by the other block files of this package: they turn a
bad constructor argument into a ValueError that names the argument, the value and what is allowed,
instead of a shape error from deep inside PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_int(arg: str, value: Any, *, minimum: int = 1, odd: bool = False) -> int:
    """``value`` as an int >= ``minimum`` (odd if asked), or a ValueError naming ``arg``."""
    # bool is an int subclass; kernel=True is a typo, not a 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (odd and value % 2 == 0):
        what = f"an odd integer >= {minimum}" if odd else f"an integer >= {minimum}"
        raise ValueError(f"{arg} must be {what}, got {value!r}")
    return value


def check_groups(groups: Any, dim: int, arg: str = "groups") -> int:
    """``groups`` as a positive divisor of ``dim`` (1 = full conv, dim = depthwise)."""
    check_int(arg, groups)
    if dim % groups:
        divisors = [d for d in range(1, dim + 1) if dim % d == 0]
        raise ValueError(f"{arg}={groups} must divide dim={dim}; allowed: {', '.join(map(str, divisors))}")
    return groups


class ConvMixer(nn.Module):
    """k x k convolution token mixer, ``(B, C, H, W) -> (B, C, H, W)``."""

    paper = "k x k convolution, the conv baseline of ACmix (Pan et al., CVPR 2022) https://arxiv.org/abs/2111.14556"
    options: dict[str, Any] = {"kernel": 3, "groups": 1}

    def __init__(self, dim: int, kernel: int = 3, groups: int = 1) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("kernel", kernel, odd=True)  # odd: "same" zero padding is symmetric
        check_groups(groups, dim)
        self.kernel, self.groups = kernel, groups
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (padding 1) + BatchNorm: ``(B, in, H, W) -> (B, out, ceil(H/2), ceil(W/2))``."""

    paper = "3x3 stride-2 convolution + BatchNorm (the usual CNN downsampler)"
    options: dict[str, Any] = {}

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        check_int("in_dim", in_dim)
        check_int("out_dim", out_dim)
        # floor((H + 2 - 3) / 2) + 1 == ceil(H / 2): odd sizes round up with no special case.
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)  # BN has the bias
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # On a map one pixel wide, the CPU's bf16 weight gradient of this stride-2 3x3 conv
            # (oneDNN, torch 2.13) comes back with garbage or NaN in the padded taps that should be
            # zero, in most calls at batch 2 (measured); widths >= 2 are fine. fp32 for this case.
            with torch.autocast("cpu", enabled=False):
                return self.norm(self.conv(x.float()))
        return self.norm(self.conv(x))
