"""Timing a network's forward pass: where (`LatencyContext`) and how (`latency`).

Latency is a median of timed forward passes after warm-up, in eval and inference mode, with torch's
thread count fixed and CUDA synchronised. A `LatencyContext` says everything a time depends on
besides the network: device, batch size, threads, dtype and clock. It is built once from an
experiment's ``latency:`` section (`LatencyContext.from_config`) and passed to everything that
times or predicts (`latency`, and the lookup table of `runners.latency_table`); its ``key()`` names
the context inside the table, together with the machine, torch version and block code.

Two clocks: ``wall`` (``time.perf_counter``: what a user sees) and ``cpu`` (the calling thread's CPU
time: with one intra-op thread torch runs every kernel inline on that thread, so this is the wall
time minus the time the thread waited for a core while other processes ran). ``auto``, the default,
picks ``cpu`` for one thread on the CPU and ``wall`` otherwise: on a busy machine the thread's CPU
time moves far less than the wall clock (`hybridnas bench latency --load N`, README "Measuring").
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridnas.runners.device import (
    as_input_shape,
    device_name,
    eval_mode,
    example_input,
    model_device,
    resolve_device,
    sync_for,
    torch_threads,
)
from hybridnas.search_space.errors import UserError


class MeasureError(UserError, ValueError):
    """A bad measuring request from the user: too few runs, an unknown dtype or clock."""


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
CLOCKS = ("auto", "wall", "cpu")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise MeasureError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_clock(clock: str, device: torch.device, n_threads: int | None) -> str:
    """``auto`` -> ``cpu`` for one thread on the CPU, else ``wall``; ``cpu`` is checked to be possible."""
    if clock == "auto":
        return "cpu" if device.type == "cpu" and n_threads == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or n_threads != 1):
        raise MeasureError(
            f"clock 'cpu' times the calling thread only: it needs device cpu and threads 1, "
            f"got device {str(device)!r}, threads {n_threads}; use clock wall (or auto)"
        )
    if clock not in CLOCKS:
        raise MeasureError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")
    return clock


@dataclass(frozen=True)
class LatencyContext:
    """Where and how a latency is measured: device, batch size, threads, dtype and clock.

    Built from names (``LatencyContext(device="cuda", dtype="bf16")``) and checked at once: the
    fields hold the resolved values (a ``torch.device``, a ``torch.dtype``, a concrete clock), so
    two contexts that measure the same thing compare equal. ``threads=None`` leaves torch's thread
    count as it is.
    """

    device: torch.device | str = "cpu"
    batch_size: int = 1
    threads: int | None = 1
    dtype: torch.dtype | str | None = None
    clock: str = "auto"

    def __post_init__(self) -> None:
        dev = resolve_device(self.device)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise MeasureError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise MeasureError(f"threads must be a positive integer, got {self.threads!r}")
        object.__setattr__(self, "device", dev)
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))
        object.__setattr__(self, "clock", resolve_clock(self.clock, dev, self.threads))

    @classmethod
    def from_config(cls, cfg: Any) -> LatencyContext:
        """From an experiment's ``latency:`` section (`search_space.experiment.LatencyConfig`) or a
        mapping with the same keys."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
        return cls(
            device=get("device", "cpu"),
            batch_size=get("batch_size", 1),
            threads=get("threads", 1),
            dtype=get("dtype", None),
            clock=get("clock", "auto"),
        )

    def key(self) -> str:
        """This context's name in a latency table: the machine (CPU or GPU model), threads, batch,
        dtype, clock, torch version and a hash of the block code (an edited block is timed afresh)."""
        return (
            f"{device_name(self.device)}|threads={self.threads}|batch={self.batch_size}"
            f"|dtype={dtype_name(self.dtype)}|clock={self.clock}|torch={torch.__version__}"
            f"|code={code_version()}"
        )

    def describe(self) -> str:
        """``cpu, batch 1, 1 thread, float32, cpu clock``."""
        n = "torch's threads" if self.threads is None else f"{self.threads} thread{'s' * (self.threads != 1)}"
        return f"{self.device}, batch {self.batch_size}, {n}, {dtype_name(self.dtype)}, {self.clock} clock"

    def timer(self) -> Callable[[], float]:
        """Seconds by this context's clock."""
        return time.thread_time if self.clock == "cpu" else time.perf_counter

    def sync(self) -> Callable[[], None]:
        return sync_for(self.device)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Threads fixed, inference mode, and reduced precision under autocast, as training runs it
        (the weights stay fp32, matmuls and convs run in bf16/fp16: what a deployed model costs)."""
        amp = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with torch_threads(self.threads), torch.inference_mode(), amp:
            yield


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the block and builder sources: a changed block invalidates its cached latencies.

    Computed once per process: the code that runs is the code that was imported.
    """
    from hybridnas import blocks
    from hybridnas.search_space import build

    h = hashlib.sha1()
    for path in sorted(Path(blocks.__file__).parent.glob("*.py")) + [Path(build.__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model itself if it already lives on ``device``, else a moved copy (the caller's stays put)."""
    current = model_device(model)
    if current.type == device.type and (device.type == "cpu" or current.index == device.index):
        return model
    return copy.deepcopy(model).to(device)


def time_ms(
    fn: Callable[[], Any],
    warmup: int,
    runs: int,
    sync: Callable[[], None],
    timer: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Time of ``runs`` calls of ``fn`` (ms each) by ``timer``, after ``warmup`` untimed calls.

    The garbage collector is paused (as ``timeit`` does) so that a collection triggered by some
    unrelated allocation does not land inside one timed call.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(runs):
            t0 = timer()
            fn()
            sync()
            times.append((timer() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summary(times: Sequence[float]) -> dict[str, float | int]:
    """``{"median_ms", "p10_ms", "p90_ms", "runs"}`` of per-run times in ms."""
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return {
        "median_ms": statistics.median(times),
        "p10_ms": cuts[0],
        "p90_ms": cuts[-1],
        "runs": len(times),
    }


def check_runs(runs: Any, warmup: Any = 0) -> None:
    if not isinstance(runs, int) or runs < 20:
        raise MeasureError(f"runs must be an integer >= 20 (a median of fewer is noise), got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise MeasureError(f"warmup must be a non-negative integer, got {warmup!r}")


def latency(
    model: nn.Module,
    input_size: Sequence[int],
    context: LatencyContext | None = None,
    warmup: int = 5,
    runs: int = 20,
) -> dict[str, float | int]:
    """Forward latency of ``model`` in ``context`` (default: one CPU thread, batch 1, fp32, auto
    clock): ``{"median_ms", "p10_ms", "p90_ms", "runs"}``.

    The median of ``runs`` (at least 20) timed forward passes after ``warmup`` untimed ones, in
    eval and inference mode, with torch's thread count fixed (restored afterwards) and, on CUDA,
    the device synchronised around each pass. ``input_size`` is ``(C, H, W)`` (the batch is the
    context's) or ``(B, C, H, W)``. A model on another device is timed as a moved copy.
    """
    ctx = LatencyContext() if context is None else context
    check_runs(runs, warmup)
    shape = as_input_shape(input_size, ctx.batch_size)
    net = on_device(model, ctx.device)
    x = example_input(shape, ctx.device)
    with eval_mode(net), ctx.running():
        times = time_ms(lambda: net(x), warmup, runs, ctx.sync(), ctx.timer())
    return summary(times)
