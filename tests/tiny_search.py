"""The tiny search experiment the search tests share (test_search, test_search_moasha, test_faults):
8x8 synthetic images, a conv/window space a few thousand MACs wide, MLflow in SQLite and the output
folder under the test's own tmp directory. Each test file says only what it changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SPACE = {
    "stem": {"channels": 8},
    "stages": [
        {"mixer": ["conv", "window"], "depth": 1, "channels": 8, "addon": ["none", "gc"]},
        {"mixer": ["conv", "window"], "depth": 1, "channels": [8, 16], "downsample": ["conv", "spd"]},
    ],
    "mixer_options": {"window": {"window": [2, 4], "heads": [2]}},
}


def tiny_search_file(
    tmp: Path,
    name: str,
    *,
    search: dict[str, Any],
    epochs: int = 2,
    samples: int = 256,
    objectives: list | None = None,
    **over: Any,
) -> Path:
    """Write ``<tmp>/<name>.yaml`` and return its path; ``over`` replaces whole top-level sections."""
    d = {
        "name": name,
        "data": {
            "dataset": "synthetic",
            "size": 8,
            "channels": 1,
            "classes": 4,
            "samples": samples,
            "seed": 0,
        },
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.003},
        "space": SPACE,
        "objectives": objectives or [{"metric": "val_acc", "mode": "max"}, {"metric": "macs", "mode": "min"}],
        "search": search,
        "resources": {"cpu": 1},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": name},
        "out_dir": str(tmp / "out" / name),
        **over,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path
