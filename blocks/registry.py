"""String registries for mixers, add-ons and downsamplers (timm's create_attn idea, as plain dicts).

Every registered class declares:
  paper:   str             the paper it implements, with a link
  options: dict[str, Any]  every option it accepts and its default (empty for add-ons/downsamplers)
and is constructed as ``cls(dim, **opts)`` (mixers), ``cls(dim)`` (add-ons) or
``cls(in_dim, out_dim)`` (downsamplers).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .acmix import ACmix
from .axial import AxialAttention
from .conv import ConvDownsample, ConvMixer
from .coord_attn import CoordAttention
from .deform import DeformConv
from .gc import ContextBlock
from .slide import SlideAttention
from .spd import SPDConv
from .swin import PatchMerging, ShiftedWindowAttention, WindowAttention

MIXERS: dict[str, type[nn.Module]] = {
    "conv": ConvMixer,
    "acmix": ACmix,
    "window": WindowAttention,
    "shifted_window": ShiftedWindowAttention,
    "slide": SlideAttention,
    "axial": AxialAttention,
    "deform": DeformConv,
}


class Identity(nn.Identity):
    """No add-on."""

    paper = "-"
    options: dict[str, Any] = {}

    def __init__(self, dim: int | None = None):
        super().__init__()


ADDONS: dict[str, type[nn.Module]] = {"none": Identity, "gc": ContextBlock, "ca": CoordAttention}
DOWNSAMPLES: dict[str, type[nn.Module]] = {
    "conv": ConvDownsample,
    "spd": SPDConv,
    "patch_merge": PatchMerging,
}

# Mixers whose options include heads (attention-based); used by the search space for conditionals.
ATTENTION_MIXERS = ("acmix", "window", "shifted_window", "slide", "axial")


def _check_dim(dim: Any, arg: str = "dim") -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"{arg} must be a positive integer, got {dim!r}")


def _lookup(table: dict[str, type], kind: str, name: Any) -> type:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(table)}")
    return table[name]


def build_mixer(name: str, dim: int, **opts: Any) -> nn.Module:
    """A token mixer ``(B, dim, H, W) -> (B, dim, H, W)``. Unknown options raise ValueError naming them."""
    cls = _lookup(MIXERS, "mixer", name)
    _check_dim(dim)
    unknown = sorted(set(opts) - set(cls.options))
    if unknown:
        allowed = ", ".join(cls.options) or "none"
        raise ValueError(f"unknown option {unknown[0]!r} for mixer {name!r}; allowed: {allowed}")
    return cls(dim, **opts)


def build_addon(name: str, dim: int) -> nn.Module:
    cls = _lookup(ADDONS, "addon", name)
    _check_dim(dim)
    return cls(dim)


def build_downsample(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Halves H and W (ceil for odd sizes) and maps in_dim -> out_dim channels."""
    cls = _lookup(DOWNSAMPLES, "downsample", name)
    _check_dim(in_dim, "in_dim")
    _check_dim(out_dim, "out_dim")
    return cls(in_dim, out_dim)
