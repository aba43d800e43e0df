"""Architectures and search spaces: the YAML formats users write, and the one way a spec becomes a model."""

from .ablation import AblationStudy
from .build import HybridNet, build_model
from .config import DataConfig, TrainConfig
from .errors import SpecError, UserError
from .experiment import (
    Bound,
    Experiment,
    LatencyConfig,
    Objective,
    Resources,
    SearchConfig,
    TrackingConfig,
    known_input,
)
from .space import GRID_PARAM, SearchSpace
from .spec import ArchSpec, HeadSpec, InputSpec, StageSpec, StemSpec

__all__ = [
    "GRID_PARAM",
    "AblationStudy",
    "ArchSpec",
    "Bound",
    "DataConfig",
    "Experiment",
    "HeadSpec",
    "HybridNet",
    "InputSpec",
    "LatencyConfig",
    "Objective",
    "Resources",
    "SearchConfig",
    "SearchSpace",
    "SpecError",
    "StageSpec",
    "StemSpec",
    "TrackingConfig",
    "TrainConfig",
    "UserError",
    "build_model",
    "known_input",
]
