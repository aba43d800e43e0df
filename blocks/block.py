"""The residual block template every mixer lives in (MetaFormer style).

Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022,
https://arxiv.org/abs/2111.11418: the macro design around the token mixer (norm, residual, channel
MLP) accounts for much of a vision transformer's accuracy. hybridnas therefore fixes that template
and varies only the mixer and the add-on, so that an ablation compares mixers, not templates:

    x = x + drop_path(mixer(norm1(x)))
    x = addon(x)
    x = x + drop_path(mlp(norm2(x)))          mlp = 1x1 conv, GELU, 1x1 conv

Everything stays NCHW; "layernorm" normalises over the channels of each position.
Stochastic depth: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016,
https://arxiv.org/abs/1603.09382.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import check_int
from .registry import build_addon, build_mixer

NORMS = ("batchnorm", "layernorm")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (each position normalised on its own)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm rather than mean/var arithmetic: one fused kernel, and MAC counters don't
        # mistake the normalisation for tensor-tensor products.
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def make_norm(kind: str, dim: int) -> nn.Module:
    """``"batchnorm"`` -> BatchNorm2d, ``"layernorm"`` -> LayerNorm over channels (NCHW in and out)."""
    check_int("dim", dim)
    if kind == "batchnorm":
        return nn.BatchNorm2d(dim)
    if kind == "layernorm":
        return LayerNorm2d(dim)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be a number in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # One Bernoulli draw per sample, rescaled so the expected output equals x.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Channel MLP on NCHW maps: 1x1 conv, GELU, 1x1 conv."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One residual block: token mixer, optional add-on, channel MLP. ``(B, dim, H, W) -> same``."""

    def __init__(
        self,
        dim: int,
        mixer: str = "conv",
        mixer_opts: Mapping[str, Any] | None = None,
        addon: str = "none",
        mlp_ratio: float = 2.0,
        drop_path: float = 0.0,
        norm: str = "batchnorm",
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        if mixer_opts is not None and not isinstance(mixer_opts, Mapping):
            raise ValueError(f"mixer_opts must be a mapping of option names to values, got {mixer_opts!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        self.norm1 = make_norm(norm, dim)
        self.mixer = build_mixer(mixer, dim, **dict(mixer_opts or {}))
        self.addon = build_addon(addon, dim)
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, max(1, round(dim * mlp_ratio)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        x = self.addon(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))
