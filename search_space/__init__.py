"""Architectures and search spaces: the YAML formats users write, and the one way a spec becomes a model."""

from .config import DataConfig, TrainConfig
from .errors import SpecError, UserError

__all__ = ["DataConfig", "SpecError", "TrainConfig", "UserError"]
