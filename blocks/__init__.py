"""The layer zoo: token mixers, add-ons and downsamplers for hybrid conv/attention backbones.

Nothing here knows about search, data or tracking. See shared BLOCKS.md for what each computes.
"""

from .block import Block
from .describe import describe
from .registry import (
    ADDONS,
    ATTENTION_MIXERS,
    DOWNSAMPLES,
    MIXERS,
    build_addon,
    build_downsample,
    build_mixer,
)
from .reparam import reparameterize

__all__ = [
    "ADDONS",
    "ATTENTION_MIXERS",
    "DOWNSAMPLES",
    "MIXERS",
    "Block",
    "build_addon",
    "build_downsample",
    "build_mixer",
    "describe",
    "reparameterize",
]
