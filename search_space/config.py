"""Plain configs shared by the experiment file, the ablation file and the CLI.

Validated here (no torch, Ray, MLflow or data code), so that a bad file fails before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import SpecError, did_you_mean

DATASETS = ("mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# Sane bounds: beyond them a value is a typo (epochs: 10**12), not a plan.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_LR = 10.0
MAX_THREADS = 1024
MAX_CONCURRENCY = 4096  # trials at a time
MAX_SEED = 2**32 - 1  # numpy's generators take seeds in [0, 2**32)
MAX_SAMPLES = 10_000_000
MAX_SYNTHETIC_PIXELS = 2**28  # samples x channels x size^2 of a synthetic set (its float noise: 1 GiB)
# The input an architecture may have (spec.py checks `input:` against the same bounds).
MAX_INPUT_SIZE = 1024
MAX_INPUT_CHANNELS = 64
MAX_CLASSES = 100_000


def _range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
    why: str = "",
) -> dict:
    """Field metadata: the allowed interval of a value (``why`` is added to the message)."""
    return {"range": (lo, hi, open_lo, open_hi, why)}


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _n(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def check_range(
    value: float,
    path: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
    why: str = "",
) -> None:
    """SpecError unless ``value`` is a finite number inside the interval; the message names the bound."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(path, f"expected a finite number, got {value}")
    if lo is not None and (value <= lo if open_lo else value < lo):
        raise SpecError(path, f"must be {'>' if open_lo else '>='} {_n(lo)}{why}, got {value!r}")
    if hi is not None and (value >= hi if open_hi else value > hi):
        raise SpecError(path, f"must be {'<' if open_hi else '<='} {_n(hi)}{why}, got {value!r}")


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
    """Build a frozen config dataclass, checking each value against its default's type (or the field's
    ``type`` metadata) and its ``range`` metadata."""
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
            raise SpecError(f"{path}.{f.name}", f"expected {_KIND.get(kind, kind.__name__)}, got {v!r}")
        if v is not None and "range" in f.metadata:
            lo, hi, open_lo, open_hi, why = f.metadata["range"]
            check_range(v, f"{path}.{f.name}", lo, hi, open_lo=open_lo, open_hi=open_hi, why=why)
        out[f.name] = v
    return cls(**out)


_PROBABILITY = _range(0.0, 1.0, open_hi=True, why=" (a probability)")
_SEED = _range(0, MAX_SEED)


@dataclass(frozen=True)
class DataConfig:
    """`data:` in experiment and ablation files."""

    dataset: str = "mnist5k"
    root: str | None = field(default=None, metadata={"type": str})  # cifar10/cifar100/imagefolder directory
    val_fraction: float = field(default=0.2, metadata=_range(0.0, 1.0, open_lo=True, open_hi=True))
    seed: int = field(default=0, metadata=_SEED)
    download: bool = False  # cifar only: fetch the official archive and check its checksum
    # imagefolder: resize to this; synthetic: image side
    size: int | None = field(default=None, metadata={"type": int, **_range(1, MAX_INPUT_SIZE)})
    channels: int | None = field(default=None, metadata={"type": int, **_range(1, MAX_INPUT_CHANNELS)})
    classes: int | None = field(default=None, metadata={"type": int, **_range(2, MAX_CLASSES)})
    # synthetic: how many images; others: optional cap (stratified)
    samples: int | None = field(default=None, metadata={"type": int, **_range(1, MAX_SAMPLES)})

    @classmethod
    def from_dict(cls, d: Any, path: str = "data") -> DataConfig:
        cfg = _typed(cls, _check_keys(d, cls, path), path)
        if cfg.dataset not in DATASETS:
            raise SpecError(
                f"{path}.dataset",
                f"{cfg.dataset!r} is not one of {', '.join(DATASETS)}{did_you_mean(cfg.dataset, DATASETS)}",
            )
        if cfg.dataset in ("imagefolder",) and not cfg.root:
            raise SpecError(f"{path}.root", f"dataset {cfg.dataset!r} needs root: a directory")
        if cfg.dataset == "synthetic":
            n, c, side = cfg.samples or 1000, cfg.channels or 3, cfg.size or 16
            if n * c * side * side > MAX_SYNTHETIC_PIXELS:
                raise SpecError(
                    f"{path}.samples",
                    f"{n:,} synthetic images of {c}x{side}x{side} are {n * c * side * side:,} pixels; "
                    f"at most {MAX_SYNTHETIC_PIXELS:,} (fewer samples or a smaller size)",
                )
            if n < 2 * (cfg.classes or 10):
                raise SpecError(
                    f"{path}.samples",
                    f"{n} synthetic images are too few for {cfg.classes or 10} classes; "
                    f"use at least {2 * (cfg.classes or 10)}",
                )
        return cfg


@dataclass(frozen=True)
class TrainConfig:
    """`train:` in experiment and ablation files; `hybridnas train` flags override it."""

    # The default recipe: 3 epochs at batch 16, AdamW 2e-3, half an epoch of warm-up, cosine. Chosen
    # by a sweep (README, "Train one architecture"): a small conv net clears 95 % on mnist5k in 3
    # epochs on every seed, in fp32 and bf16; batch 128 left it at 83-87 % (93 optimizer steps).
    epochs: int = field(default=3, metadata=_range(1, MAX_EPOCHS))
    batch_size: int = field(default=16, metadata=_range(1, MAX_BATCH_SIZE))
    optimizer: str = "adamw"
    lr: float = field(default=2e-3, metadata=_range(0.0, MAX_LR, open_lo=True))
    weight_decay: float = field(default=0.05, metadata=_range(0.0))
    # sgd only (Nesterov momentum, which needs a momentum above 0)
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0, open_lo=True, open_hi=True))
    warmup_epochs: float = field(default=0.5, metadata=_range(0.0, float(MAX_EPOCHS)))
    label_smoothing: float = field(default=0.1, metadata=_PROBABILITY)
    augment: bool = True  # random crop with padding (+ flips where the dataset allows)
    crop_padding: int = field(default=2, metadata=_range(0, 64))
    seed: int = field(default=0, metadata=_SEED)
    device: str = "auto"  # auto = cuda when available
    # torch CPU threads; 0 = from the trial's CPUs / the machine
    threads: int = field(default=0, metadata=_range(0, MAX_THREADS, why=" (0 = from the trial's CPUs)"))
    # auto = bf16 autocast on CUDA and on CPUs with native bf16 matrix units (AMX or AVX512-BF16),
    # fp32 elsewhere; fp32 = no autocast anywhere; bf16 = autocast wherever it runs.
    precision: str = "auto"
    # 0 = whole epoch; >0 caps batches per epoch (smoke runs)
    max_train_batches: int = field(default=0, metadata=_range(0))

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
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)
