"""`build_model(spec)`: the only way an `ArchSpec` becomes a network.

Layout (MetaFormer-style stages of the one residual `blocks.Block` template, so ablations change only the mixer)::

    stem   3x3 conv (stride 1) + norm + GELU                      full resolution
    stage  downsample (or a 1x1 conv + norm when only the width changes), then `depth` Blocks
    head   global average pool, LayerNorm, dropout, linear

Swin's alternation (Liu et al., ICCV 2021, https://arxiv.org/abs/2103.14030): a `shifted_window` stage alternates
regular and shifted windows and always ends on a shifted block, so depth 2 is (W, SW) as in Swin and depth 1 is
(SW). Stochastic depth rises linearly from 0 on the first block to `drop_path` on the last (as in timm).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridnas.blocks import MIXERS, Block, build_downsample
from hybridnas.blocks.block import make_norm

from .checks import key_path
from .errors import SpecError
from .spec import ArchSpec, StageSpec


def block_mixers(stage: StageSpec) -> list[tuple[str, dict]]:
    """(mixer name, options) of each block in a stage, with Swin's regular/shifted alternation."""
    out = []
    for j in range(stage.depth):
        name, opts = stage.mixer, dict(stage.options)
        if name == "shifted_window" and (stage.depth - 1 - j) % 2 == 1:
            name = "window"  # the regular half of a (W, SW) pair: drop options only the shifted variant has
            opts = {k: v for k, v in opts.items() if k in MIXERS["window"].options}
        out.append((name, opts))
    return out


class Stage(nn.Sequential):
    """`downsample` (an identity when the stage keeps resolution and width) followed by `blocks`."""

    def __init__(self, downsample: nn.Module, blocks: nn.Sequential):
        super().__init__()
        self.downsample = downsample
        self.blocks = blocks


class Head(nn.Module):
    """Global average pool, LayerNorm (a BatchNorm here would fail on a training batch of one), dropout, linear."""

    def __init__(self, dim: int, classes: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x.mean(dim=(2, 3)))))


class HybridNet(nn.Module):
    """stem -> stages -> head, built from an `ArchSpec` (kept as `.spec`)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        c_in, c_stem = spec.input.channels, spec.stem.channels
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, c_stem, 3, stride=1, padding=1, bias=False),
            make_norm(spec.norm, c_stem),
            nn.GELU(),
        )
        n_blocks = sum(s.depth for s in spec.stages)
        rates = torch.linspace(0, spec.drop_path, n_blocks).tolist() if n_blocks > 1 else [0.0] * n_blocks
        stages, width, b = [], c_stem, 0
        for i, stage in enumerate(spec.stages):
            try:
                stages.append(self._stage(stage, width, rates[b : b + stage.depth], spec.norm))
            except (
                ValueError
            ) as e:  # the blocks' own argument checks; check_arch should have caught them first
                raise SpecError(key_path("stages", i), str(e)) from None
            width, b = stage.channels, b + stage.depth
        self.stages = nn.ModuleList(stages)
        self.head = Head(width, spec.input.classes, spec.head.dropout)

    @staticmethod
    def _stage(stage: StageSpec, in_dim: int, rates: list[float], norm: str) -> Stage:
        if stage.downsample != "none":
            down: nn.Module = build_downsample(stage.downsample, in_dim, stage.channels)
        elif in_dim != stage.channels:
            # Width changes without a downsampling: a 1x1 projection, the cheapest layer that can do it.
            down = nn.Sequential(
                nn.Conv2d(in_dim, stage.channels, 1, bias=False), make_norm(norm, stage.channels)
            )
        else:
            down = nn.Identity()
        blocks = nn.Sequential(
            *(
                Block(
                    stage.channels,
                    mixer=name,
                    mixer_opts=opts,
                    addon=stage.addon,
                    mlp_ratio=stage.mlp_ratio,
                    drop_path=rate,
                    norm=norm,
                )
                for (name, opts), rate in zip(block_mixers(stage), rates)
            )
        )
        return Stage(down, blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, C, H, W)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_model(spec: ArchSpec) -> HybridNet:
    """Validate `spec` (SpecError on anything the YAML loader would reject) and build its network."""
    if not isinstance(spec, ArchSpec):
        raise SpecError("", f"expected an ArchSpec, got {type(spec).__name__}")
    # Re-validate: a spec built directly from the dataclasses skipped from_dict's checks.
    ArchSpec.from_dict(spec.to_dict(), warn=False)
    return HybridNet(spec)
