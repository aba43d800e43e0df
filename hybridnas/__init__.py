"""hybridnas: search and ablate hybrid conv/attention vision backbones.

The repository keeps ``blocks/``, ``search_space/`` and ``runners/`` at its top level; the packaging
maps them to ``hybridnas.blocks``, ``hybridnas.search_space`` and ``hybridnas.runners``. The public
API below is imported lazily, so ``import hybridnas`` is cheap and pulls in no torch, Ray or MLflow
until a name is used. See the README's "Python API" section.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    "search": "hybridnas.runners.api",
    "ablate": "hybridnas.runners.api",
    "train": "hybridnas.runners.api",
    "profile": "hybridnas.runners.api",
    "SearchResult": "hybridnas.runners.search",
    "AblationResult": "hybridnas.runners.ablation",
    "TrainRun": "hybridnas.runners.train",
    "TrainResult": "hybridnas.runners.train",
    "AblationStudy": "hybridnas.search_space",
    "ArchSpec": "hybridnas.search_space",
    "SearchSpace": "hybridnas.search_space",
    "Experiment": "hybridnas.search_space",
    "SpecError": "hybridnas.search_space",
    "UserError": "hybridnas.search_space",
    "build_model": "hybridnas.search_space",
    "load_dataset": "hybridnas.runners.data",
    "Dataset": "hybridnas.runners.data",
}

__all__ = [
    "AblationResult",
    "AblationStudy",
    "ArchSpec",
    "Dataset",
    "Experiment",
    "SearchResult",
    "SearchSpace",
    "SpecError",
    "TrainResult",
    "TrainRun",
    "UserError",
    "__version__",
    "ablate",
    "build_model",
    "load_dataset",
    "profile",
    "search",
    "train",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from hybridnas.runners.ablation import AblationResult
    from hybridnas.runners.api import ablate, profile, search, train
    from hybridnas.runners.data import Dataset, load_dataset
    from hybridnas.runners.search import SearchResult
    from hybridnas.runners.train import TrainResult, TrainRun
    from hybridnas.search_space import (
        AblationStudy,
        ArchSpec,
        Experiment,
        SearchSpace,
        SpecError,
        UserError,
        build_model,
    )


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'hybridnas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
