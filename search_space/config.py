"""Plain configs shared by the experiment file, the ablation file and the CLI.

Validated here (no torch, Ray, MLflow or data code), so that a bad file fails before anything runs.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .errors import SpecError, did_you_mean

DATASETS = ("mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def _check_keys(d: Any, cls: type, path: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SpecError(path, f"expected a mapping, got {type(d).__name__} {d!r}")
    names = [f.name for f in fields(cls)]
    for k in d:
        if k not in names:
            raise SpecError(
                f"{path}.{k}", f"unknown key; allowed: {', '.join(names)}{did_you_mean(k, names)}"
            )
    return dict(d)


def _typed(cls: type, d: dict, path: str):
    """Build a frozen config dataclass, checking each value against its default's type."""
    out = {}
    for f in fields(cls):
        if f.name not in d:
            if f.default is MISSING:
                raise SpecError(f"{path}.{f.name}", "required key is missing")
            continue
        v = d[f.name]
        default = f.default
        if v is None and default is None:
            out[f.name] = v
            continue
        kind = f.metadata.get(
            "type", type(default) if default is not MISSING and default is not None else None
        )
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise SpecError(f"{path}.{f.name}", f"expected {kind.__name__}, got {v!r}")
        out[f.name] = v
    return cls(**out)


@dataclass(frozen=True)
class DataConfig:
    """`data:` in experiment and ablation files."""

    dataset: str = "mnist5k"
    root: str | None = None  # cifar10/cifar100/imagefolder directory
    val_fraction: float = 0.2
    seed: int = 0
    download: bool = False  # cifar only: fetch the official archive and check its checksum
    size: int | None = None  # imagefolder: resize to this; synthetic: image side
    channels: int | None = None  # synthetic only
    classes: int | None = None  # synthetic only
    samples: int | None = None  # synthetic: how many images; others: optional cap (stratified)

    @classmethod
    def from_dict(cls, d: Any, path: str = "data") -> DataConfig:
        d = _check_keys(d, cls, path)
        for k in ("size", "channels", "classes", "samples"):
            if d.get(k) is not None and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1):
                raise SpecError(f"{path}.{k}", f"expected a positive integer, got {d[k]!r}")
        if d.get("root") is not None and not isinstance(d["root"], str):
            raise SpecError(f"{path}.root", f"expected a directory path, got {d['root']!r}")
        cfg = _typed(
            cls,
            {k: v for k, v in d.items() if k not in ("size", "channels", "classes", "samples", "root")},
            path,
        )
        cfg = cls(
            **{
                **asdict(cfg),
                **{k: d[k] for k in ("size", "channels", "classes", "samples", "root") if k in d},
            }
        )
        if cfg.dataset not in DATASETS:
            raise SpecError(
                f"{path}.dataset",
                f"{cfg.dataset!r} is not one of {', '.join(DATASETS)}{did_you_mean(cfg.dataset, DATASETS)}",
            )
        if not 0.0 < cfg.val_fraction < 1.0:
            raise SpecError(
                f"{path}.val_fraction", f"must be between 0 and 1 (exclusive), got {cfg.val_fraction}"
            )
        if cfg.dataset in ("imagefolder",) and not cfg.root:
            raise SpecError(f"{path}.root", f"dataset {cfg.dataset!r} needs root: a directory")
        return cfg


@dataclass(frozen=True)
class TrainConfig:
    """`train:` in experiment and ablation files; `hybridnas train` flags override it."""

    # The default recipe: 3 epochs at batch 16, AdamW 2e-3, half an epoch of warm-up, cosine. Chosen
    # by a sweep (README, "Train one architecture"): a small conv net clears 95 % on mnist5k in 3
    # epochs on every seed, in fp32 and bf16; batch 128 left it at 83-87 % (93 optimizer steps).
    epochs: int = 3
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    augment: bool = True  # random crop with padding (+ flips where the dataset allows)
    crop_padding: int = 2
    seed: int = 0
    device: str = "auto"  # auto = cuda when available
    threads: int = 0  # torch CPU threads; 0 = from the trial's CPUs / the machine
    # auto = bf16 autocast on CUDA and on CPUs with native bf16 matrix units (AMX or AVX512-BF16),
    # fp32 elsewhere; fp32 = no autocast anywhere; bf16 = autocast wherever it runs.
    precision: str = "auto"
    max_train_batches: int = 0  # 0 = whole epoch; >0 caps batches per epoch (smoke runs)

    @classmethod
    def from_dict(cls, d: Any, path: str = "train") -> TrainConfig:
        cfg = _typed(cls, _check_keys(d, cls, path), path)
        if cfg.optimizer not in OPTIMIZERS:
            raise SpecError(f"{path}.optimizer", f"{cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if cfg.device not in DEVICES:
            raise SpecError(f"{path}.device", f"{cfg.device!r} is not one of {', '.join(DEVICES)}")
        if cfg.precision not in PRECISIONS:
            raise SpecError(
                f"{path}.precision",
                f"{cfg.precision!r} is not one of {', '.join(PRECISIONS)}{did_you_mean(cfg.precision, PRECISIONS)}",
            )
        for k in ("epochs", "batch_size"):
            if getattr(cfg, k) < 1:
                raise SpecError(f"{path}.{k}", f"must be >= 1, got {getattr(cfg, k)}")
        if cfg.lr <= 0:
            raise SpecError(f"{path}.lr", f"must be > 0, got {cfg.lr}")
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)
