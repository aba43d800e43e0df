"""Measuring sticks: MACs, params and latency of a network, and a latency lookup table.

MACs are multiply-accumulates (what vision papers print as "FLOPs"); ``flops = 2 * macs``.
Counting builds on PyTorch's ``FlopCounterMode`` (a ``TorchDispatchMode`` that sees every aten op
after autograd and composite decomposition) and registers formulas for what it misses:

* scaled dot-product attention, every aten overload: torch 2.13 counts the CPU flash kernel
  (``_scaled_dot_product_flash_attention_for_cpu``, what ``F.scaled_dot_product_attention`` runs on
  the CPU under ``no_grad``) as zero, and the undecomposed op that ``inference_mode`` dispatches not
  at all. Each is counted as ``B*heads*Lq*Lk*(dk + dv)`` MACs (``Q K^T`` and ``A V``; softmax,
  scaling and masks are free);
* elementwise products of two tensors (``aten.mul`` / ``mul_`` / ``addcmul`` where both factors
  have more than one element): ``numel(out)`` MACs. Local attention written as ``(q * K).sum()``
  and ``(A * V).sum()`` is counted this way. A product with a Python number or a one-element
  tensor (``q * scale``, a learnable mixing rate) is a rescale and is not counted;
* ``mv``/``dot``/``addmv``/``addbmm``, which a 1-D ``matmul`` can reach.

No double counting: an op with a formula is executed with the dispatch mode switched off, so the
kernels it calls internally are never seen; an op without one (``einsum``, ``matmul``, ``linear``)
is decomposed, and only its pieces (``bmm``, ``mm``, ``addmm``) are counted. Not counted, as in
the papers: additions, softmax, normalisation, activations, pooling, bias terms.

Latency is a median of timed forward passes after warm-up, in inference mode with the thread
count fixed and CUDA synchronised. ``LatencyTable`` caches the latency of each unit of an
architecture (stem, downsample, block at its resolution, head) on disk, and ``predict_latency``
sums those entries plus a calibrated per-model overhead, so a search can rank thousands of
architectures by latency without timing each one. Units are timed in place, inside a whole
forward pass of a network that contains them (``measure_in_context``): at batch 1 on a CPU a
small network is dominated by per-op overhead, and a unit timed alone in a hot loop runs 20-50 %
faster than it does between other units.

Even in place, a unit's time depends on its neighbours (the same block costs 9 % more behind a
wider stem; a stem costs 40 % more at the start of a network with attention in it: caches and
the allocator see different working sets). A table of in-context times alone predicts 60-85 %
of the quickstart's architectures within 10 %. ``calibrate_table`` therefore also times a
hundred or so whole architectures of the space end to end and refits the unit entries to them:
a ridge regression of the end-to-end times on unit counts, weighted by relative error, pulled
towards the in-context times (which stay in the table as ``measured_ms``). The refit entries
predict architectures outside the fit within 10 % for 90-99 % of them (`hybridnas bench latency`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hybridnas.search_space.errors import UserError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .machine import cpu_model

aten = torch.ops.aten


class MeasureError(UserError, ValueError):
    """A bad measuring request from the user: unknown device or dtype, CUDA asked for but absent."""


# --------------------------------------------------------------------------------------------------
# MACs and params
# --------------------------------------------------------------------------------------------------


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _sdpa_flops(
    q: torch.Size, k: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    # q: (..., Lq, dk), k: (..., Lk, dk), v: (..., Lk, dv); leading dims of q are batch x heads (with
    # grouped-query attention k/v have fewer heads and are broadcast, so q's count is the right one).
    lq, dk = q[-2], q[-1]
    lk, dv = k[-2], v[-1]
    return 2 * _numel(q[:-2]) * lq * lk * (dk + dv)


def _is_tensor_factor(x: Any) -> bool:
    """A tensor operand (the formula receives shapes) with more than one element."""
    return isinstance(x, torch.Size) and _numel(x) > 1


def _mul_flops(a: Any, b: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    if _is_tensor_factor(a) and _is_tensor_factor(b):
        return 2 * _numel(out_shape)
    return 0


def _addcmul_flops(s: Any, t1: Any, t2: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return _mul_flops(t1, t2, out_shape=out_shape)


def _mv_flops(m: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * m[0] * m[1]


def _addmv_flops(s: Any, m: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * m[0] * m[1]


def _dot_flops(a: torch.Size, b: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * a[0]


def _addbmm_flops(s: Any, a: torch.Size, b: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * a[0] * a[1] * a[2] * b[2]


_SDPA_OPS = (
    "scaled_dot_product_attention",  # reaches the mode undecomposed under inference_mode
    "_scaled_dot_product_flash_attention_for_cpu",  # torch 2.13 counts it as zero
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
_EXTRA_FORMULAS: dict[str, Callable[..., int]] = {
    **dict.fromkeys(_SDPA_OPS, _sdpa_flops),
    "mul": _mul_flops,
    "mul_": _mul_flops,
    "addcmul": _addcmul_flops,
    "addcmul_": _addcmul_flops,
    "mv": _mv_flops,
    "addmv": _addmv_flops,
    "dot": _dot_flops,
    "vdot": _dot_flops,
    "addbmm": _addbmm_flops,
}


def custom_flop_mapping() -> dict[Any, Callable[..., int]]:
    """The formulas added to FlopCounterMode's registry (keyed by aten overload packet)."""
    # getattr: an op missing from an older or newer torch is skipped rather than breaking import.
    return {getattr(aten, name): f for name, f in _EXTRA_FORMULAS.items() if hasattr(aten, name)}


def _as_input_shape(input_size: Sequence[int], batch_size: int = 1) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 3:
        shape = (batch_size, *shape)
    elif len(shape) == 4:
        if batch_size not in (1, shape[0]):
            raise ValueError(f"batch_size={batch_size} disagrees with input_size {shape}")
    else:
        raise ValueError(f"input_size must be (C, H, W) or (B, C, H, W), got {tuple(input_size)}")
    if any(s < 1 for s in shape):
        raise ValueError(f"input_size must be positive, got {shape}")
    return shape  # type: ignore[return-value]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _example_input(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32):
    # A private generator: measuring must not move the global RNG of the caller.
    g = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """eval() for the duration, then every submodule's training flag as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def count_params(model: nn.Module) -> int:
    """Parameters (shared ones once), frozen ones included, buffers (BN statistics, caches) not.

    Frozen parameters are part of the model a user deploys (Slide's fixed one-hot shift conv is
    a parameter with ``requires_grad=False`` until ``reparameterize()`` merges it), so they count.
    """
    return sum(p.numel() for p in model.parameters())


def _count(model: nn.Module, x: torch.Tensor) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=custom_flop_mapping())
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter


def profile(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """``{"macs", "flops", "params"}`` of one forward pass (eval mode, no grad).

    ``input_size`` is ``(C, H, W)`` (batch 1) or ``(B, C, H, W)``. ``flops == 2 * macs``.
    """
    shape = _as_input_shape(input_size)
    counter = _count(model, _example_input(shape, _model_device(model)))
    flops = int(counter.get_total_flops())
    return {"macs": flops // 2, "flops": flops, "params": count_params(model)}


def profile_spec(spec: Any) -> dict[str, Any]:
    """MACs, flops and params of ``build_model(spec)`` with a per-stage breakdown.

    Returns ``{"macs", "flops", "params", "stem": {...}, "head": {...}, "stages": [{stage,
    mixer, resolution, channels, depth, macs, params}, ...]}``; stage indices are 0-based as in
    spec paths, and a stage's numbers include its downsampler.
    """
    from hybridnas.search_space.build import build_model

    model = build_model(spec)
    inp = spec.input
    counter = _count(model, _example_input((1, inp.channels, inp.size, inp.size), _model_device(model)))
    per_module = counter.get_flop_counts()
    root = type(model).__name__

    def macs_of(name: str) -> int:
        return int(sum(per_module.get(f"{root}.{name}", {}).values())) // 2

    flops = int(counter.get_total_flops())
    resolutions = spec.resolutions()
    stages = [
        {
            "stage": i,
            "mixer": st.mixer,
            "resolution": resolutions[i],
            "channels": st.channels,
            "depth": st.depth,
            "macs": macs_of(f"stages.{i}"),
            "params": count_params(model.stages[i]),
        }
        for i, st in enumerate(spec.stages)
    ]
    return {
        "macs": flops // 2,
        "flops": flops,
        "params": count_params(model),
        "stem": {"macs": macs_of("stem"), "params": count_params(model.stem)},
        "head": {"macs": macs_of("head"), "params": count_params(model.head)},
        "stages": stages,
    }


# --------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise MeasureError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")


def _resolve_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MeasureError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MeasureError(f"device {device!r} asked for but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise MeasureError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count fixed for the duration (it is process-wide), then restored."""
    old = torch.get_num_threads()
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise MeasureError(f"threads must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _inference(device: torch.device, dtype: torch.dtype, threads: int | None) -> Iterator[None]:
    # Reduced precision runs under autocast, as training does: the weights stay fp32, matmuls and
    # convs run in bf16/fp16 (what a deployed mixed-precision model costs).
    amp = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    with _threads(threads), torch.inference_mode(), amp:
        yield


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model itself if it already lives on ``device``, else a moved copy (the caller's stays put)."""
    current = _model_device(model)
    if current.type == device.type and (device.type == "cpu" or current.index == device.index):
        return model
    return copy.deepcopy(model).to(device)


CLOCKS = ("wall", "cpu")


def _clock(clock: str, device: torch.device, threads: int | None) -> Callable[[], float]:
    """The timer for ``clock``: "wall" (perf_counter) or "cpu" (this thread's CPU time).

    "cpu" is the latency a quiet machine would show, measured on a busy one: time the thread
    waits for a core while other processes run is not counted. It needs one intra-op thread on
    the CPU (with one thread torch runs every kernel inline, on the calling thread).
    """
    if clock == "wall":
        return time.perf_counter
    if clock == "cpu":
        if device.type != "cpu" or threads != 1:
            raise MeasureError(
                f"clock='cpu' times the calling thread only: it needs device cpu and threads=1, "
                f"got device {str(device)!r}, threads={threads}"
            )
        return time.thread_time
    raise MeasureError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")


def _time_ms(
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


def _summary(times: Sequence[float]) -> dict[str, float | int]:
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return {
        "median_ms": statistics.median(times),
        "p10_ms": cuts[0],
        "p90_ms": cuts[-1],
        "runs": len(times),
    }


def latency(
    model: nn.Module,
    input_size: Sequence[int],
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 5,
    runs: int = 20,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
) -> dict[str, float | int]:
    """Forward latency: ``{"median_ms", "p10_ms", "p90_ms", "runs"}``.

    The median of ``runs`` (at least 20) timed forward passes after ``warmup`` untimed ones, in
    eval and inference mode, with torch's thread count fixed to ``threads`` (restored afterwards)
    and, on CUDA, the device synchronised around each pass. ``input_size`` is ``(C, H, W)`` (the
    batch is ``batch_size``) or ``(B, C, H, W)``. ``dtype`` None/float32, or bfloat16/float16
    under autocast. A model on another device is timed as a moved copy. ``clock="cpu"`` (CPU,
    one thread) times the thread's CPU time instead of wall time: robust when other processes
    compete for the cores.
    """
    if not isinstance(runs, int) or runs < 20:
        raise MeasureError(f"runs must be an integer >= 20 (a median of fewer is noise), got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise MeasureError(f"warmup must be a non-negative integer, got {warmup!r}")
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    shape = _as_input_shape(input_size, batch_size)
    timer = _clock(clock, dev, threads)
    net = _on_device(model, dev)
    x = _example_input(shape, dev)
    with _eval_mode(net), _inference(dev, dt, threads):
        times = _time_ms(lambda: net(x), warmup, runs, _sync_for(dev), timer)
    return _summary(times)


# --------------------------------------------------------------------------------------------------
# Latency lookup table
# --------------------------------------------------------------------------------------------------

TABLE_FORMAT = 1


def default_table_path() -> Path:
    """``$HYBRIDNAS_CACHE_DIR/latency.json``, else ``latency.json`` in ``$XDG_CACHE_HOME/hybridnas/``
    or ``~/.cache/hybridnas/``."""
    if os.environ.get("HYBRIDNAS_CACHE_DIR"):
        return Path(os.environ["HYBRIDNAS_CACHE_DIR"]).expanduser() / "latency.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hybridnas" / "latency.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` + ".lock" across processes (filelock ships with torch)."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock", timeout=120):
        yield


class LatencyTable:
    """Measured latencies (ms) of architecture units, cached in one JSON file.

    Keys are strings naming the unit and the measuring context (device model, threads, batch,
    dtype, clock, torch version and a hash of the block code, so an edited block is measured
    afresh). Entries
    are kept in memory; ``save()`` merges them into the file under a lock and replaces it
    atomically, so concurrent writers (Ray trials, two searches) never lose or corrupt entries.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_table_path()
        self._entries: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self._entries.update(self._read())

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A cache is never worth failing a search for: an unreadable one is measured afresh.
            return {}
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(list(self._entries.items()))

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        if "ms" not in entry or not math.isfinite(float(entry["ms"])):
            raise ValueError(f"a table entry needs a finite 'ms', got {dict(entry)!r}")
        self._entries[key] = self._new[key] = dict(entry)

    def save(self) -> None:
        """Merge this table's new entries into the file (others' entries are kept)."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path):
            merged = self._read()
            merged.update(self._new)
            fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": TABLE_FORMAT, "entries": merged}, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._entries.update(merged)
        self._new.clear()


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """Hash of the block and builder sources: a changed block invalidates its cached latencies.

    Computed once per process: the code that runs is the code that was imported.
    """
    from hybridnas.search_space import build

    from hybridnas import blocks

    h = hashlib.sha1()
    for path in sorted(Path(blocks.__file__).parent.glob("*.py")) + [Path(build.__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    """What the latency was measured on: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()}"


def _context_key(
    device: torch.device, batch_size: int, threads: int | None, dtype: torch.dtype, clock: str
) -> str:
    return (
        f"{_device_name(device)}|threads={threads}|batch={batch_size}|dtype={_dtype_name(dtype)}"
        f"|clock={clock}|torch={torch.__version__}|code={_code_version()}"
    )


@dataclass(frozen=True)
class Unit:
    """One timed piece of an architecture: where it sits in ``build_model(spec)`` and its input."""

    key: str  # what it is (config + input shape); the table key adds the measuring context
    stage: int | None  # None for the stem and the head
    module: str  # submodule path in HybridNet ("stem", "stages.1.blocks.0", "head")
    input_shape: tuple[int, int, int, int]


def _opts_key(name: str, opts: Mapping[str, Any]) -> str:
    from hybridnas.blocks import MIXERS

    # Defaults resolved, so "heads: 4" written out and left to default share one entry.
    full = {**MIXERS[name].options, **dict(opts)}
    return json.dumps(full, sort_keys=True, separators=(",", ":"))


def spec_units(spec: Any, batch_size: int = 1) -> list[Unit]:
    """The units whose latencies add up to the network's: stem, each downsample, each block, head.

    A stage's identity downsample is not a unit; a width-only change (1x1 projection) is.
    """
    from hybridnas.search_space.build import block_mixers

    def shape(c: int, side: int) -> tuple[int, int, int, int]:
        return (batch_size, c, side, side)

    def x(s: tuple[int, ...]) -> str:
        return "x".join(map(str, s))

    norm, inp = spec.norm, spec.input
    units = [
        Unit(
            f"stem|in={inp.channels}|out={spec.stem.channels}|norm={norm}"
            f"|x={x(shape(inp.channels, inp.size))}",
            None,
            "stem",
            shape(inp.channels, inp.size),
        )
    ]
    width, side = spec.stem.channels, inp.size
    for i, (stage, res) in enumerate(zip(spec.stages, spec.resolutions())):
        kind = (
            stage.downsample if stage.downsample != "none" else ("proj" if width != stage.channels else None)
        )
        if kind is not None:
            s = shape(width, side)
            units.append(
                Unit(
                    f"down|{kind}|in={width}|out={stage.channels}|norm={norm}|x={x(s)}",
                    i,
                    f"stages.{i}.downsample",
                    s,
                )
            )
        width, side = stage.channels, res
        for j, (name, opts) in enumerate(block_mixers(stage)):
            s = shape(width, side)
            key = (
                f"block|{name}|{_opts_key(name, opts)}|c={width}|addon={stage.addon}|mlp={stage.mlp_ratio}"
                f"|norm={norm}|x={x(s)}"
            )
            units.append(Unit(key, i, f"stages.{i}.blocks.{j}", s))
    s = shape(width, side)
    units.append(Unit(f"head|c={width}|classes={inp.classes}|x={x(s)}", None, "head", s))
    return units


class _Clock:
    """The time of the last mark in a forward pass, shared by the ``_Timed`` units of one network."""

    def __init__(self, timer: Callable[[], float], sync: Callable[[], None]) -> None:
        self.timer, self.sync, self.last = timer, sync, 0.0

    def mark(self) -> float:
        """Seconds since the previous mark (after a sync on CUDA); this call is the new mark."""
        self.sync()
        now = self.timer()
        elapsed, self.last = now - self.last, now
        return elapsed


class _Timed(nn.Module):
    """Stands in for one unit inside the network and records its share of each forward pass.

    A unit's time runs from the end of the previous unit to its own end, so everything the pass
    spends between units (the containers' Python, freeing the previous activation, allocating
    the next) is charged to the unit that follows, and the units add up to the whole pass.
    """

    def __init__(self, inner: nn.Module, clock: _Clock) -> None:
        super().__init__()
        self.inner, self.clock = inner, clock
        self.times: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.times.append(self.clock.mark() * 1e3)
        return y


def measure_in_context(
    spec: Any,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
    runs: int = 30,
    warmup: int = 5,
    budget_s: float = 0.3,
) -> dict[str, Any]:
    """Time every unit of ``build_model(spec)`` where it sits, during whole forward passes.

    At batch 1 on a CPU a small network is dominated by per-op framework cost, which depends on
    how warm the instruction cache, branch predictors and data caches are. A unit timed alone in
    a loop keeps all of them hot and runs 20-50 % faster than inside the network (the head, a
    pool + norm + linear, 3-4x faster), so units are timed in place: each is wrapped by a timer
    and the network runs whole. Passes of the plain network are interleaved with the wrapped
    ones, so both see the same machine load. A unit's time runs from the end of the unit before
    it to its own end (see ``_Timed``), so the units cover the whole pass; ``overhead_ms`` is
    what the plain network costs beyond their sum (the return from the network, the timers'
    own cost with the opposite sign; on CUDA, minus the per-unit syncs).

    At least ``runs`` pairs of passes are timed, more for fast networks (about ``budget_s`` in
    all, at most 300 pairs): more samples make the medians steadier on a busy machine.

    Returns ``{"units": {unit key: ms}, "samples": {unit key: [ms per pass]}, "total": latency
    summary of the plain network, "overhead_ms": float}``; a unit key that occurs more than once
    (depth > 1) gets the average of its occurrences and pools their samples.
    """
    from hybridnas.search_space.build import build_model

    if not isinstance(runs, int) or runs < 20:
        raise MeasureError(f"runs must be an integer >= 20, got {runs!r}")
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    timer, sync = _clock(clock, dev, threads), _sync_for(dev)
    units = spec_units(spec, batch_size)
    model = build_model(spec).to(dev)
    clock_ = _Clock(timer, sync)
    slots = []  # (parent, attribute, the unit, its timed stand-in)
    for u in units:
        parent_name, _, leaf = u.module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        slots.append((parent, leaf, parent._modules[leaf], _Timed(parent._modules[leaf], clock_)))

    def use(timed: bool) -> None:
        # One network whose units are swapped for their timed stand-ins and back (Sequential,
        # ModuleList and attributes all read _modules): plain and timed passes share every weight,
        # so neither pass evicts a copy the other needs from the caches.
        for parent, leaf, unit, stand_in in slots:
            parent._modules[leaf] = stand_in if timed else unit

    inp = spec.input
    x = _example_input((batch_size, inp.channels, inp.size, inp.size), dev)

    def timed_pass() -> None:
        use(True)
        clock_.mark()  # the pass starts here; the stem's time includes the call into the network
        model(x)
        use(False)

    plain_times: list[float] = []
    try:
        with _eval_mode(model), _inference(dev, dt, threads):
            warm = _time_ms(lambda: (model(x), timed_pass()), 0, max(1, warmup), sync, time.perf_counter)
            runs = max(runs, min(300, int(1e3 * budget_s / max(min(warm), 1e-3))))
            for *_, t in slots:
                t.times.clear()
            for _ in range(runs):
                plain_times += _time_ms(lambda: model(x), 0, 1, sync, timer)
                timed_pass()
    finally:
        use(False)
    # Each unit's latency is its mean time over the *typical* passes, those whose total lies in
    # the middle 40 % of all passes. Per-unit medians would not do: every unit's times are skewed
    # (rare slow calls), and the sum of the medians falls 10-20 % short of the median pass,
    # whereas means over the same central passes add up to a typical pass exactly.
    per_pass = list(zip(*(t.times for *_, t in slots)))  # one tuple of unit times per timed pass
    totals = sorted(sum(p) for p in per_pass)
    lo, hi = totals[int(0.3 * (len(totals) - 1))], totals[int(0.7 * (len(totals) - 1))]
    typical = [p for p in per_pass if lo <= sum(p) <= hi]
    estimates: dict[str, list[float]] = {}
    samples: dict[str, list[float]] = {}
    for i, u in enumerate(units):
        estimates.setdefault(u.key, []).append(statistics.fmean(p[i] for p in typical))
        samples.setdefault(u.key, []).extend(p[i] for p in per_pass)
    unit_ms = {key: statistics.fmean(v) for key, v in estimates.items()}  # a repeated unit: average
    total = _summary(plain_times)
    unit_sum = sum(unit_ms[u.key] for u in units)
    return {
        "units": unit_ms,
        "samples": samples,
        "total": total,
        "overhead_ms": total["median_ms"] - unit_sum,
    }


_OVERHEAD = "overhead"
_MAX_OVERHEAD_SAMPLES = 64
_ARCH = "arch|"  # end-to-end entries: f"{context}||arch|{arch_hash}"
# The refit's pull towards the in-context times, per unit, on the relative deviation
# ((t - measured) / measured)^2; the end-to-end residuals are relative too. Weak enough that a
# hundred architectures move the entries by their few-percent context effects, strong enough
# that a unit seen in only one or two of them stays near its measurement.
FIT_PRIOR = 0.03
MIN_FIT_ARCHS = 10  # fewer end-to-end measurements than this: the table keeps its in-context times


def missing_units(
    spec: Any,
    table: LatencyTable,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
) -> list[Unit]:
    """The units of ``spec`` that ``predict_latency`` would have to measure (not in ``table``)."""
    context = _context_key(_resolve_device(device), batch_size, threads, _resolve_dtype(dtype), clock)
    return [u for u in spec_units(spec, batch_size) if f"{context}||{u.key}" not in table]


def unit_latencies(
    spec: Any,
    table: LatencyTable | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
) -> list[dict[str, Any]]:
    """``[{"unit", "stage", "ms"}]`` for every unit of ``spec`` plus a final ``{"unit": "overhead"}``.

    Units missing from the table are measured in the context of this network
    (``measure_in_context``), stored and saved; units already there are not measured again.
    Each such measurement also adds a sample of the per-model overhead, whose median is used.
    """
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    _clock(clock, dev, threads)  # a bad clock fails before anything is measured
    table = LatencyTable() if table is None else table
    context = _context_key(dev, batch_size, threads, dt, clock)
    units = spec_units(spec, batch_size)
    overhead_key = f"{context}||{_OVERHEAD}"
    if any(f"{context}||{u.key}" not in table for u in units) or overhead_key not in table:
        measured = measure_in_context(spec, dev, batch_size, threads, dt, clock)
        for key, ms in measured["units"].items():
            if f"{context}||{key}" not in table:
                t = _summary(measured["samples"][key])
                table.put(
                    f"{context}||{key}",
                    {"ms": ms, "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "runs": t["runs"]},
                )
        old = table.get(overhead_key) or {}
        samples = [*old.get("samples", []), measured["overhead_ms"]][-_MAX_OVERHEAD_SAMPLES:]
        entry = {"ms": statistics.median(samples), "samples": samples}
        if old.get("fitted"):  # `fit_table` set it from end-to-end times: keep that until the next refit
            entry.update(ms=old["ms"], fitted=True)
        table.put(overhead_key, entry)
        table.save()
    out = [
        {"unit": u.key, "stage": u.stage, "ms": float(table.get(f"{context}||{u.key}")["ms"])} for u in units
    ]
    out.append({"unit": _OVERHEAD, "stage": None, "ms": float(table.get(overhead_key)["ms"])})
    return out


def _unit_prior(entry: Mapping[str, Any]) -> float:
    """The in-context measurement behind a (possibly refit) entry."""
    if "measured_ms" in entry:
        return float(entry["measured_ms"])
    if "samples" in entry:  # the overhead entry: the median of its per-network samples
        return float(statistics.median(entry["samples"]))
    return float(entry["ms"])


def measure_end_to_end(
    spec: Any,
    table: LatencyTable,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
    runs: int = 30,
) -> float:
    """Time ``build_model(spec)`` end to end (`latency`) and keep it in ``table`` with its units, for
    `fit_table`; an architecture already there is not timed again. Returns the median (ms)."""
    from hybridnas.search_space.build import build_model

    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    context = _context_key(dev, batch_size, threads, dt, clock)
    key = f"{context}||{_ARCH}{spec.arch_hash()}"
    if key not in table:
        inp = spec.input
        t = latency(
            build_model(spec),
            (inp.channels, inp.size, inp.size),
            device=dev,
            batch_size=batch_size,
            threads=threads,
            warmup=3,
            runs=runs,
            dtype=dt,
            clock=clock,
        )
        units = [u.key for u in spec_units(spec, batch_size)]
        table.put(key, {"ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "units": units})
    return float(table.get(key)["ms"])


def fit_table(
    table: LatencyTable,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
    prior: float = FIT_PRIOR,
) -> dict[str, Any]:
    """Refit this context's unit entries (and the overhead) to its end-to-end entries.

    Minimises ``sum_a ((sum_u n_au t_u + overhead - y_a) / y_a)^2 + prior * sum_u ((t_u - m_u) / m_u)^2``
    over the units that occur in the timed architectures, where ``m_u`` is the unit's in-context
    time (kept as ``measured_ms``). Entries of units no timed architecture contains are left as
    they are. Returns ``{"archs", "units", "within_10_before", "within_10_after"}`` (in-sample
    shares of the timed architectures predicted within 10 %), or ``{"archs": n}`` alone when
    there are fewer than ``MIN_FIT_ARCHS`` of them or a unit of theirs is not in the table.
    """
    import numpy as np

    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    context = _context_key(dev, batch_size, threads, dt, clock)
    prefix = f"{context}||"
    archs = [e for k, e in table.items() if k.startswith(prefix + _ARCH) and isinstance(e.get("units"), list)]
    overhead_key = prefix + _OVERHEAD
    names = sorted({u for e in archs for u in e["units"]})
    if len(archs) < MIN_FIT_ARCHS or overhead_key not in table or any(prefix + u not in table for u in names):
        return {"archs": len(archs)}
    col = {u: i for i, u in enumerate(names)}
    n = len(names) + 1  # the last column is the per-network overhead
    x = np.zeros((len(archs), n))
    for i, e in enumerate(archs):
        for u in e["units"]:
            x[i, col[u]] += 1.0
    x[:, -1] = 1.0
    y = np.array([float(e["ms"]) for e in archs])
    m = np.array([_unit_prior(table.get(prefix + u)) for u in names] + [_unit_prior(table.get(overhead_key))])
    xw, yw = x / y[:, None], np.ones_like(y)  # relative residuals
    # Relative to the in-context time; the overhead can be ~0 or negative, so its scale is floored
    # at a tenth of the smallest network's time.
    scale = np.maximum(np.abs(m), 0.1 * float(y.min()))
    d = prior / scale**2
    t = np.linalg.solve(xw.T @ xw + np.diag(d), xw.T @ yw + d * m)

    def share(pred: Any) -> float:
        return float(np.mean(np.abs(pred - y) <= 0.1 * y))

    before, after = share(x @ m), share(x @ t)
    for u, v in zip(names, t[:-1]):
        entry = dict(table.get(prefix + u))
        entry.setdefault("measured_ms", entry["ms"])
        entry["ms"] = float(v)
        table.put(prefix + u, entry)
    table.put(overhead_key, {**table.get(overhead_key), "ms": float(t[-1]), "fitted": True})
    return {"archs": len(archs), "units": len(names), "within_10_before": before, "within_10_after": after}


def calibrate_table(
    specs: Sequence[Any],
    table: LatencyTable | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
    end_to_end: int = 120,
    budget_s: float = 60.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Make ``table`` ready to predict the architectures ``specs`` stand for (a space's sample).

    1. Every unit they contain is measured in context (a few architectures that together contain
       them all), unless the table has it already.
    2. Up to ``end_to_end`` of them (a seeded random choice), not yet timed in this context, are
       timed whole (`measure_end_to_end`), within about ``budget_s`` seconds.
    3. The unit entries are refit to all end-to-end times of this context (`fit_table`).

    An architecture a block cannot build is skipped (it fails as a trial, with the error).
    Returns ``{"units", "measured", "timed", "fit", "broken", "seconds"}``.
    """
    import random

    t0 = time.perf_counter()
    table = LatencyTable() if table is None else table
    where = {"device": device, "batch_size": batch_size, "threads": threads, "dtype": dtype, "clock": clock}
    units: set[str] = set()
    covering = []
    for spec in specs:  # a few architectures that together contain every unit
        keys = {u.key for u in spec_units(spec, batch_size)}
        if not keys <= units:
            covering.append(spec)
            units |= keys
    missing: set[str] = set()
    broken: list[str] = []
    bad: set[str] = set()
    for spec in covering:
        try:
            missing |= {u.key for u in missing_units(spec, table, **where)}
            unit_latencies(spec, table, **where)
        except Exception as e:  # noqa: BLE001 - reported; such an architecture fails as a trial
            broken.append(f"{type(e).__name__}: {e}")
            bad.add(spec.arch_hash())
    table.save()
    pool = [s for s in specs if s.arch_hash() not in bad]
    random.Random(seed).shuffle(pool)
    timed, t1 = 0, time.perf_counter()
    for spec in pool[:end_to_end]:
        if time.perf_counter() - t1 > budget_s:
            break
        try:
            n = len(table)
            measure_end_to_end(spec, table, **where)
            timed += len(table) > n  # a new entry: it was timed now, not found cached
        except Exception as e:  # noqa: BLE001
            broken.append(f"{type(e).__name__}: {e}")
    fit = fit_table(table, **where)
    table.save()
    return {
        "units": len(units),
        "measured": len(missing),
        "timed": timed,
        "fit": fit,
        "broken": broken,
        "seconds": time.perf_counter() - t0,
    }


def predict_latency(
    spec: Any,
    table: LatencyTable | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    threads: int | None = 1,
    dtype: torch.dtype | str | None = None,
    clock: str = "wall",
) -> float:
    """Predicted forward latency (ms) of ``build_model(spec)``: its units' table entries + overhead.

    Units missing from the table (by default the file at ``default_table_path()``) are measured
    once and saved, so the first prediction in a new context costs a second or so and later
    ones, for architectures made of known units, a few milliseconds of bookkeeping.
    """
    return sum(u["ms"] for u in unit_latencies(spec, table, device, batch_size, threads, dtype, clock))


# --------------------------------------------------------------------------------------------------
# `hybridnas profile`
# --------------------------------------------------------------------------------------------------


def human(n: float) -> str:
    """12345678 -> '12.3M' (SI suffixes, 3 significant digits)."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def _latency_shares(spec: Any, device: str, batch_size: int, threads: int) -> dict[str, float]:
    """Share of the forward time per row ("stem", "0", "1", ..., "head"), from units timed in place."""
    measured = measure_in_context(spec, device, batch_size, threads)
    per_unit = measured["units"]
    rows: dict[str, float] = {}
    for u in spec_units(spec, batch_size):
        row = "stem" if u.module == "stem" else "head" if u.module == "head" else str(u.stage)
        rows[row] = rows.get(row, 0.0) + per_unit[u.key]
    total = sum(rows.values()) or 1.0
    return {row: ms / total for row, ms in rows.items()}


def main_profile(args: argparse.Namespace) -> int:
    """``hybridnas profile ARCH.yaml [--latency] [--json] [--device] [--batch-size] [--threads]``."""
    from hybridnas.search_space.build import build_model
    from hybridnas.search_space.spec import ArchSpec

    spec = ArchSpec.from_yaml(Path(args.arch))  # a path, always: a missing file is a SpecError
    prof = profile_spec(spec)
    out: dict[str, Any] = {"macs": prof["macs"], "flops": prof["flops"], "params": prof["params"]}
    shares: dict[str, float] = {}
    if args.latency:
        device, batch, threads = args.device, args.batch_size, args.threads
        if not isinstance(batch, int) or batch < 1:
            raise MeasureError(f"--batch-size must be a positive integer, got {batch!r}")
        inp = spec.input
        lat = latency(build_model(spec), (inp.channels, inp.size, inp.size), device, batch, threads)
        out.update(
            latency_ms=lat["median_ms"],
            latency_p10_ms=lat["p10_ms"],
            latency_p90_ms=lat["p90_ms"],
            latency_device=device,
            batch_size=batch,
            threads=threads,
        )
        shares = _latency_shares(spec, device, batch, threads)
    if args.json:
        out["stages"] = prof["stages"]
        print(json.dumps(out))
        return 0

    header = ["stage", "mixer", "res", "ch", "MACs", "params"] + (["latency"] if shares else [])
    rows = []
    first_res = spec.input.size

    def row(name: str, mixer: str, res: int, ch: int, macs: int, params: int) -> list[str]:
        cells = [name, mixer, f"{res}x{res}", str(ch), human(macs), human(params)]
        return cells + ([f"{100 * shares.get(name, 0.0):.1f}%"] if shares else [])

    rows.append(
        row("stem", "conv3x3", first_res, spec.stem.channels, prof["stem"]["macs"], prof["stem"]["params"])
    )
    for st in prof["stages"]:
        rows.append(
            row(str(st["stage"]), st["mixer"], st["resolution"], st["channels"], st["macs"], st["params"])
        )
    last = prof["stages"][-1]
    rows.append(
        row(
            "head",
            "pool+linear",
            last["resolution"],
            last["channels"],
            prof["head"]["macs"],
            prof["head"]["params"],
        )
    )
    total = ["total", "", "", "", human(prof["macs"]), human(prof["params"])]
    if shares:
        total.append(f"{out['latency_ms']:.3f} ms")
    rows.append(total)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        )
    print(
        f"MACs = multiply-accumulates (flops = 2 x MACs = {human(prof['flops'])}); "
        "attention products included."
    )
    if shares:
        print(
            f"latency: median of {lat['runs']} runs on {args.device}, batch {args.batch_size}, "
            f"{args.threads} thread(s) (p10 {lat['p10_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms); "
            "shares from units timed in place"
        )
    return 0
