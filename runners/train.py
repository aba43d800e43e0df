"""The proxy trainer: one `ArchSpec`, one dataset, one training config -> validation accuracy.

A search is thousands of short trainings, so this loop follows airbench
(https://github.com/KellerJordan/cifar10-airbench): nothing runs per sample in Python.

- The whole dataset sits on the device as one uint8 tensor (4x smaller than float32), zero-padded
  once for random crops. A batch is an index slice of a per-epoch permutation.
- Crop and flip are one advanced-indexing gather per batch: per-sample row/column offsets (flipped
  samples read their columns backwards), so augmentation is a single kernel on the device.
- Normalisation happens on the batch, fused with the uint8 -> float conversion.
- AdamW (or SGD with Nesterov momentum), linear warm-up then cosine per step (restarted at the
  rungs of a moasha search: `restart_factor`), label smoothing,
  weight decay only on weight matrices/kernels (not norms, biases or position tables).
- channels_last everywhere (1.3x on CPU too). bf16 autocast on CUDA and on CPUs with native bf16
  matrix units (AMX, AVX512-BF16, with oneDNN free to use them: `runners.machine`; 1.2-2x per step
  there, see `hybridnas bench train`), fp32 on other CPUs, where bf16 is emulated and slower
  (``train.precision`` overrides; forcing bf16 there warns). CPU: torch threads from the trial's CPUs; the same
  seed on the same machine gives the same numbers to the last digit.

``train_model`` is the one entry point: the CLI (`hybridnas train`) and Ray trials both call it,
and per-epoch metrics leave through ``callback``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridnas import __version__
from hybridnas.runners.files import atomic_write, check_writable_dir
from hybridnas.search_space.config import DataConfig, TrainConfig
from hybridnas.search_space.errors import SpecError, UserError

from .data import Dataset, DataShape, expected_shape, load_dataset
from .device import resolve_device, torch_threads
from .machine import Bf16Support, bf16_support
from .optim import lr_factor, make_optimizer, restart_factor

if TYPE_CHECKING:
    from hybridnas.search_space.spec import ArchSpec

MACHINE_KEYS = ("device", "threads")  # TrainConfig keys that describe a machine, not a recipe
EVAL_BATCH = 1024  # inference needs no activations for backward: large batches amortise overhead


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf. ``epoch`` is 1-based; the caller decides what to record."""

    def __init__(self, epoch: int, loss: float | None = None):
        self.epoch = epoch
        self.loss = loss
        super().__init__(f"training diverged in epoch {epoch}: the loss is {loss} (not finite)")


@dataclass
class TrainResult:
    val_acc: float  # 0-1, after the last epoch
    train_loss: float  # mean training loss of the last epoch
    history: list[dict] = field(repr=False)  # one callback dict per epoch
    imgs_per_s: float  # training images per second (evaluation excluded)
    train_time_s: float  # wall time of all epochs, evaluation included
    epochs: int
    model: nn.Module = field(repr=False)  # trained, in eval mode, on the training device
    precision: str = "fp32"  # what the steps ran in: fp32 or bf16 (``auto`` resolved)


# --------------------------------------------------------------------------------------------- devices


@functools.cache
def _warn_emulated_bf16(support: Bf16Support) -> None:
    """Once per process (the CLI and every trial in a worker resolve the precision again)."""
    msg = (
        f"precision bf16 on a CPU without native bf16 ({support.why}): bf16 is emulated here and "
        "trains slower than fp32 (precision auto picks fp32 on this CPU)"
    )
    if not support.onednn:
        msg += (
            "; oneDNN has no bf16 kernels, so convolutions run in torch's reference kernels, which "
            "sum weight gradients over the batch in bf16"
        )
    warnings.warn(msg, UserWarning, stacklevel=3)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs with native bf16 (`machine.bf16_support`), else
    ``fp32``; others unchanged. ``bf16`` forced on a CPU without native bf16 warns: it is emulated
    there, slower than fp32 (see the README's ``precision``)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda" or precision == "fp32":
        return "bf16" if precision == "auto" else precision
    support = bf16_support()
    if precision == "auto":
        return "bf16" if support.native else "fp32"
    if not support.native:
        _warn_emulated_bf16(support)
    return precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- the batch


class DeviceData:
    """A dataset on the device plus the per-batch augmentation and normalisation.

    Train images are stored padded once; `train_batch` does index + random crop + flip in one
    advanced-indexing gather and `normalise` turns uint8 into standardised float in one pass.
    """

    def __init__(
        self, data: Dataset, device: torch.device, augment: bool, padding: int, channels_last: bool
    ) -> None:
        self.device = device
        self.augment = augment
        # At most 1/8 of the side: 2 px suits 28-32 px images, but would shift an 8x8 digit by a quarter.
        self.pad = min(padding, max(1, data.size // 8)) if augment else 0
        self.flips = augment and data.flips
        self.channels_last = channels_last
        self.size = data.size
        # Folding /255 into mean and std: x_norm = (x - 255 mean) / (255 std), one sub and one div.
        c = data.channels
        self.mean = torch.tensor([255.0 * m for m in data.mean], device=device).view(1, c, 1, 1)
        self.std = torch.tensor([255.0 * s for s in data.std], device=device).view(1, c, 1, 1)
        train_x = data.train_x
        if self.pad:
            # Zero (black) padding, as in the usual "RandomCrop(32, padding=4)" recipe.
            train_x = F.pad(train_x, (self.pad,) * 4)
        self.train_x = train_x.to(device)
        self.train_y = data.train_y.to(device)
        self.val_x = data.val_x.to(device)
        self.val_y = data.val_y.to(device)
        self._ar = torch.arange(self.size, device=device)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        # The crop gather yields NHWC-strided batches: make the layout the model expects explicit.
        return x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pad and not self.flips:
            return self.normalise(self.train_x[idx]), self.train_y[idx]
        b, p = idx.numel(), self.pad
        off = torch.randint(0, 2 * p + 1, (2, b), generator=gen, device=self.device)
        rows = off[0, :, None] + self._ar  # (B, S): the rows each sample reads
        cols = off[1, :, None] + self._ar
        if self.flips:
            flip = torch.rand(b, generator=gen, device=self.device) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)  # a mirrored crop reads columns backwards
        # Advanced indices around a slice put their dims first: (B, S, S, C) -> permute back to NCHW
        # (the result is channels_last in memory, which convolutions like anyway).
        x = self.train_x[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return self.normalise(x), self.train_y[idx]


# ------------------------------------------------------------------------------------------- training


def check_compatible(spec: ArchSpec, data: Dataset | DataShape) -> None:
    """A `SpecError` naming the arch key and the fix when the arch does not fit the data."""
    inp = spec.input
    resizable = data.name in ("imagefolder", "synthetic")
    if inp.channels != data.channels:
        raise SpecError(
            "input.channels",
            f"arch input has {inp.channels} channel(s) but dataset {data.name} has {data.channels}: "
            f"set input.channels: {data.channels}",
        )
    if inp.size != data.size:
        alt = f" (or data size: {inp.size})" if resizable else ""
        raise SpecError(
            "input.size",
            f"arch input size {inp.size} but dataset {data.name} is {data.size}x{data.size}: "
            f"set input.size: {data.size}{alt}",
        )
    if inp.classes != data.classes:
        raise SpecError(
            "input.classes",
            f"arch has {inp.classes} classes but dataset {data.name} has {data.classes}: "
            f"set input.classes: {data.classes}",
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_model(
    spec: ArchSpec,
    data: Dataset,
    cfg: TrainConfig,
    callback: Callable[[dict], Any] | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    *,
    progress: Callable[[int, int], Any] | None = None,
    restarts: Sequence[int] = (),
) -> TrainResult:
    """Build ``spec`` (seeded), train it on ``data`` and return the result.

    ``device`` overrides ``cfg.device``; ``threads`` (a trial's CPUs) overrides ``cfg.threads`` on
    CPU. ``callback(metrics)`` runs after each epoch with ``epoch`` (1-based), ``train_loss``,
    ``val_acc``, ``imgs_per_s`` and ``epoch_time_s``; ``progress(step, steps)`` after each batch.
    ``restarts``: epochs at which the learning rate has annealed to 0 and starts again (a moasha
    search's rungs, `restart_factor`); none by default. Raises `TrainingDiverged` when the loss
    stops being finite.
    """
    from hybridnas.search_space.build import build_model

    check_compatible(spec, data)
    dev = resolve_device(device if device is not None else cfg.device)
    n_threads = (threads or cfg.threads or None) if dev.type == "cpu" else None
    with torch_threads(n_threads):
        seed_everything(cfg.seed)  # the initial weights depend on the seed only
        model = build_model(spec)
        return fit(
            model,
            data,
            cfg,
            callback=callback,
            device=dev,
            progress=progress,
            precision=cfg.precision,
            restarts=restarts,
        )


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    callback: Callable[[dict], Any] | None = None,
    device: str | torch.device | None = None,
    *,
    progress: Callable[[int, int], Any] | None = None,
    precision: str = "auto",
    restarts: Sequence[int] = (),
) -> TrainResult:
    """Train an already built ``model`` (`train_model` without the spec; benchmarks and tests use it).

    ``precision``: see `resolve_precision` (``auto``: bf16 autocast on CUDA and on CPUs with native
    bf16, fp32 elsewhere); ``bf16`` = autocast on either; ``fp32`` = no autocast.
    """
    steps = fit_steps(
        model, data, cfg, callback, device, progress=progress, precision=precision, restarts=restarts
    )
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def fit_steps(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    callback: Callable[[dict], Any] | None = None,
    device: str | torch.device | None = None,
    *,
    progress: Callable[[int, int], Any] | None = None,
    precision: str = "auto",
    restarts: Sequence[int] = (),
) -> Iterator[str]:
    """`fit` as a generator: yields ``"setup"`` once, ``"step"`` after each training step and
    ``"eval"`` after each epoch's evaluation; returns the `TrainResult`.

    The phases let `hybridnas bench train` run this loop and the textbook one in lockstep, so that
    load from elsewhere on the machine falls on both alike, and time training steps apart from
    setup and evaluation.
    """
    dev = resolve_device(device if device is not None else cfg.device)
    cuda = dev.type == "cuda"
    precision = resolve_precision(precision, dev)
    bf16 = precision == "bf16"
    seed_everything(cfg.seed)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)  # permutations, crops, flips
    # channels_last (NHWC) everywhere: cuDNN's tensor-core kernels want it, and oneDNN's CPU
    # convolutions skip their NCHW reorders with it: 1.3x less CPU time per step measured on the
    # bench architecture (forward + backward, one thread).
    channels_last = True
    model = model.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dd = DeviceData(data, dev, cfg.augment, cfg.crop_padding, channels_last)
    opt = make_optimizer(model, cfg, dev)
    # bf16 keeps fp32's range, so unlike fp16 it needs no loss scaling; weights stay fp32.
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    yield "setup"

    n, bs = len(dd.train_y), cfg.batch_size
    # Drop the last partial batch: a batch of 1 breaks BatchNorm and every epoch reshuffles anyway.
    steps = max(1, n // bs)
    if cfg.max_train_batches > 0:
        steps = min(steps, cfg.max_train_batches)
    total = steps * cfg.epochs
    warmup = max(0, round(cfg.warmup_epochs * steps))
    history: list[dict] = []
    trained_imgs, trained_time = 0, 0.0
    t_start = time.perf_counter()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        _sync(dev)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=dev)
        loss_sum = torch.zeros((), device=dev)
        imgs = 0
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = dd.train_batch(idx, gen)
            if restarts:
                lr = cfg.lr * restart_factor(step, steps, cfg.epochs, warmup, restarts)
            else:
                lr = cfg.lr * lr_factor(step, total, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            # On CPU the check is free (no queue to drain), so a diverged step never updates the
            # weights; on CUDA it would stall the pipeline every step, so check every 32.
            if (not cuda or i % 32 == 31) and not torch.isfinite(loss_sum + loss.detach()):
                raise TrainingDiverged(epoch, float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            imgs += idx.numel()
            step += 1
            if progress is not None:
                progress(i + 1, steps)
            yield "step"
        _sync(dev)
        epoch_train_s = time.perf_counter() - t0
        train_loss = float(loss_sum) / steps
        if not math.isfinite(train_loss):
            raise TrainingDiverged(epoch, train_loss)
        val_acc = evaluate(model, dd, autocast)
        epoch_time = time.perf_counter() - t0
        trained_imgs += imgs
        trained_time += epoch_train_s
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_acc": val_acc,
            "imgs_per_s": imgs / epoch_train_s,
            "epoch_time_s": epoch_time,
        }
        history.append(metrics)
        if callback is not None:
            callback(dict(metrics))
        yield "eval"
    model.eval()
    return TrainResult(
        val_acc=history[-1]["val_acc"],
        train_loss=history[-1]["train_loss"],
        history=history,
        imgs_per_s=trained_imgs / trained_time,
        train_time_s=time.perf_counter() - t_start,
        epochs=cfg.epochs,
        model=model,
        precision=precision,
    )


@torch.inference_mode()
def evaluate(model: nn.Module, dd: DeviceData, autocast: Any = None) -> float:
    """Top-1 accuracy on the validation part (eval mode, no autograd, large batches)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dd.device)
    with autocast or contextlib.nullcontext():
        for i in range(0, len(dd.val_y), EVAL_BATCH):
            logits = model(dd.normalise(dd.val_x[i : i + EVAL_BATCH]))
            correct += (logits.argmax(1) == dd.val_y[i : i + EVAL_BATCH]).sum()
    return int(correct) / len(dd.val_y)


# ------------------------------------------------------------------------------------------------ CLI


def _known(d: Any, cls: type) -> dict:
    """Keys of mapping ``d`` that ``cls`` (a config dataclass) knows; provenance may carry more."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names} if isinstance(d, Mapping) else {}


def data_config_for(spec: ArchSpec, dataset: str | None = None, root: str | None = None) -> DataConfig:
    """The data to train ``spec`` on: the named dataset, else the one in its provenance, else mnist5k.

    Datasets without a native size (imagefolder, synthetic) take the arch's input size, and synthetic
    its channels and classes, so that any arch file trains on them as it is.
    """
    prov = spec.provenance if isinstance(spec.provenance, Mapping) else {}
    pdata = prov.get("data")
    base = _known(pdata, DataConfig) if isinstance(pdata, Mapping) else {}
    if isinstance(pdata, str):
        base = {"dataset": pdata}
    if dataset and dataset != base.get("dataset"):
        base = {"dataset": dataset}
    if root:
        base["root"] = root
    base.setdefault("dataset", "mnist5k")
    if base["dataset"] in ("imagefolder", "synthetic"):
        base.setdefault("size", spec.input.size)
    if base["dataset"] == "synthetic":
        base.setdefault("channels", spec.input.channels)
        base.setdefault("classes", spec.input.classes)
    return DataConfig.from_dict(base, path="data")


@dataclasses.dataclass
class TrainRun:
    """What `train_arch` did: the training result, where it wrote the weights and the arch file,
    and the summary `hybridnas train --json` prints."""

    result: TrainResult
    out: Path
    summary: dict


def train_arch(
    spec: ArchSpec,
    *,
    data: str | None = None,
    root: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    out: str | os.PathLike | None = None,
    on_start: Callable[[str, TrainConfig], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> TrainRun:
    """Train ``spec`` with the recipe its provenance records (flags override), then write
    ``model.pt`` and ``arch.yaml`` (with ``metrics:`` and ``provenance:``) under ``out``.

    Raises `TrainingDiverged` when the loss turns non-finite, `UserError`s for bad input."""
    from hybridnas.runners.macs import profile

    data_cfg = data_config_for(spec, data, root)
    prov = spec.provenance if isinstance(spec.provenance, Mapping) else {}
    # The recipe recorded with the arch (by a search or an earlier `hybridnas train`), minus what
    # belongs to the machine it ran on; flags override it.
    recipe = {k: v for k, v in _known(prov.get("train"), TrainConfig).items() if k not in MACHINE_KEYS}
    cfg = TrainConfig.from_dict(recipe, path="provenance.train").replace(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        precision=precision,
        threads=threads,
    )
    # Before loading and training: a folder that cannot be written should not cost a run.
    folder = Path(out) if out else Path("runs") / f"train-{spec.arch_hash()}"
    check_writable_dir(folder, "--out" if out else "output folder")
    shape = expected_shape(data_cfg)
    if shape is not None:
        check_compatible(spec, shape)  # before a slow load or a download
    dataset = load_dataset(data_cfg)
    check_compatible(spec, dataset)
    dev = resolve_device(cfg.device)
    if on_start is not None:
        on_start(
            f"training {spec.arch_hash()} on {dataset!r} for {cfg.epochs} epoch(s), device {dev}, "
            f"{resolve_precision(cfg.precision, dev)}",
            cfg,
        )
    try:
        res = train_model(spec, dataset, cfg, callback=on_epoch, device=dev, progress=on_batch)
    except TrainingDiverged as e:
        e.lr = cfg.lr  # what to lower
        raise
    model = res.model.to("cpu", memory_format=torch.contiguous_format)
    prof = profile(model, (dataset.channels, dataset.size, dataset.size))
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.pt", lambda p: torch.save(state, p))
    metrics = {
        "val_acc": res.val_acc,
        "train_loss": res.train_loss,
        "macs": prof["macs"],
        "flops": prof["flops"],
        "params": prof["params"],
        "train_time_s": round(res.train_time_s, 2),
        "imgs_per_s": round(res.imgs_per_s, 1),
    }
    # Data and recipe go into provenance, so `hybridnas train out/arch.yaml` trains the same way again.
    provenance = {
        **prov,
        "trained_by": "hybridnas train",
        "data": {k: v for k, v in dataclasses.asdict(data_cfg).items() if v is not None},
        "train": {k: v for k, v in cfg.to_dict().items() if k not in MACHINE_KEYS},
        "hybridnas_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }
    written = dataclasses.replace(spec, metrics=metrics, provenance=provenance)
    atomic_write(folder / "arch.yaml", lambda p: Path(p).write_text(written.to_yaml()))
    summary = {
        "arch_hash": spec.arch_hash(),
        "dataset": dataset.name,
        "val_acc": res.val_acc,
        "train_loss": res.train_loss,
        "macs": prof["macs"],
        "flops": prof["flops"],
        "params": prof["params"],
        "imgs_per_s": res.imgs_per_s,
        "train_time_s": res.train_time_s,
        "epochs": res.epochs,
        "device": str(dev),
        "precision": res.precision,
        "out": str(folder),
        "history": res.history,
    }
    return TrainRun(result=res, out=folder, summary=summary)
