"""`hybridnas bench blocks [--quick]`: every mixer's speed and memory next to an unfold local attention.

For every mixer in ``blocks.MIXERS`` at the reference shapes (batch 64, width 64, 4 heads, 28x28 and
14x14; ``--quick``: batch 2, width 16, 12x12 and 7x7) this times forward + backward and records the
peak memory, and prints them next to:

* the straightforward unfold (Im2Col) implementation of the same local attention, written here
  (``unfold_local_attention``): ``F.unfold`` gathers each pixel's k x k keys and values into k^2
  copies, then the logits, softmax and weighted sum are plain broadcasts. For ``slide`` and
  ``acmix`` the baseline is the very same module (same weights, same projections and conv path) with
  its attention kernel swapped for this one, so the ratio is the whole mixer's. For ``window`` and
  ``shifted_window`` it is an unfold local attention with the same window area (k = window) and the
  same 1x1 qkv/proj. The other mixers are reported without a baseline;
* this machine's matmul rate (GFLOP/s of a large fp32 matmul, same device and threads), and the
  share of it each mixer reaches, counting forward + backward as 3x the forward MACs.

Protocol: one intra-op thread on the CPU (a fixed count, and the same for every row); every timing
is a median over repeats after a warm-up. On the CPU two clocks are read: wall time, and the
calling thread's CPU time, which is what a quiet machine shows even when other processes compete
for the cores (with one thread every kernel runs on the calling thread); ratios use the CPU clock
there, wall time on GPUs. Peak memory is the highest total of bytes allocated by forward + backward
above what existed before (inputs and weights excluded): on the CPU from the allocation events of
``torch.profiler`` (``profile_memory=True``, a separate untimed run), on CUDA from
``torch.cuda.max_memory_allocated``. MACs are per image, from ``runners.macs.profile``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..machine import load_average, machine_line


@dataclass(frozen=True)
class Setting:
    batch: int
    width: int
    heads: int
    sizes: tuple[int, ...]
    warmup: int
    repeats: int
    matmul_n: int


REFERENCE = Setting(batch=64, width=64, heads=4, sizes=(28, 14), warmup=1, repeats=5, matmul_n=2048)
QUICK = Setting(batch=2, width=16, heads=4, sizes=(12, 7), warmup=1, repeats=2, matmul_n=256)
THREADS = 1

# Mixers compared with their own module running the unfold kernel, and mixers compared with an
# unfold local attention of the same window area.
SAME_MODULE = ("acmix", "slide")
SAME_AREA = ("window", "shifted_window")


# --------------------------------------------------------------------------------------------------
# The baseline: a straightforward unfold (Im2Col) local attention
# --------------------------------------------------------------------------------------------------


def unfold_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    *,
    pe: torch.Tensor | None = None,
    rpb: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Masked k x k local attention the textbook way; same signature and result as
    ``blocks.slide.local_attention``.

    q, k, v: (B, N, c, H, W). Keys and values of each pixel's k x k neighbourhood are gathered with
    ``F.unfold`` (zero padding) into (B, N, c, k^2, H, W) tensors; neighbours outside the image are
    masked. ``mix = (M, b)`` turns the columns into Slide's deformed keys ``sum_e M[:, d, e] k_e + b``
    (an Im2Col depthwise conv); ``pe`` adds ``q . (pe d)`` (ACmix), ``rpb`` a bias per head and
    offset (Slide). Biases and position terms join keys or logits as additions, so its MACs (the
    products it executes) are the papers' count, which ``runners.macs`` reports for the fast
    kernel too.
    """
    B, N, c, H, W = q.shape
    r, D = kernel // 2, kernel * kernel

    def columns(t: torch.Tensor) -> torch.Tensor:
        return F.unfold(t.reshape(B * N, c, H, W), kernel, padding=r).view(B, N, c, D, H, W)

    keys, values = columns(k), columns(v)
    if mix is not None:
        m, b = mix
        keys = torch.einsum("cde,bncehw->bncdhw", m, keys) + b[:, :, None, None]
        values = torch.einsum("cde,bncehw->bncdhw", m, values) + b[:, :, None, None]
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    if pe is not None:  # as ACmix's code does: the position term joins the keys before the product
        rel = torch.stack([pe[:, 0] * dy + pe[:, 1] * dx for dy, dx in shifts], 1)  # (c, D)
        logits = (q.unsqueeze(3) * (keys + rel[:, :, None, None])).sum(2)  # (B, N, D, H, W)
    else:
        logits = (q.unsqueeze(3) * keys).sum(2)
    if rpb is not None:
        logits = logits + rpb[:, :, None, None]
    ys = torch.arange(H, device=q.device).view(1, H, 1)
    xs = torch.arange(W, device=q.device).view(1, 1, W)
    offsets = torch.tensor(shifts, device=q.device)
    dy, dx = offsets[:, 0].view(D, 1, 1), offsets[:, 1].view(D, 1, 1)
    outside = (ys + dy < 0) | (ys + dy >= H) | (xs + dx < 0) | (xs + dx >= W)  # (D, H, W)
    attn = logits.masked_fill(outside, float("-inf")).softmax(2)
    return (attn.unsqueeze(2) * values).sum(3)


class UnfoldLocalAttention(nn.Module):
    """Baseline mixer: 1x1 qkv, unfold local attention (k x k, a bias per head and offset), 1x1 proj."""

    def __init__(self, dim: int, heads: int, kernel: int) -> None:
        super().__init__()
        self.heads, self.kernel, self.scale = heads, kernel, (dim // heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.rpb = nn.Parameter(torch.zeros(heads, kernel * kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.heads, C // self.heads, H, W).unbind(1)
        out = unfold_local_attention(q * self.scale, k, v, self.kernel, rpb=self.rpb)
        return self.proj(out.reshape(B, C, H, W))


def unfold_baseline(name: str, mixer: nn.Module, width: int, heads: int) -> nn.Module | None:
    """The unfold version of ``mixer`` (None when it has none)."""
    if name in SAME_MODULE:
        base = copy.deepcopy(mixer)
        base.attention = unfold_local_attention
        return base
    if name in SAME_AREA:
        return UnfoldLocalAttention(width, heads, getattr(mixer, "window", 7))
    return None


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module(x).backward(grad)


def _reset(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median forward + backward time in ms: {"wall", "cpu"} ("cpu" only on the CPU with one thread)."""
    grad = torch.randn_like(x)
    cpu_clock = x.device.type == "cpu" and torch.get_num_threads() == 1
    walls, cpus = [], []
    for i in range(warmup + repeats):
        _reset(module, x)
        _sync(x.device)
        w0, c0 = time.perf_counter(), time.thread_time()
        _step(module, x, grad)
        _sync(x.device)
        w1, c1 = time.perf_counter(), time.thread_time()
        if i >= warmup:
            walls.append(1e3 * (w1 - w0))
            cpus.append(1e3 * (c1 - c0))
    out = {"wall": statistics.median(walls)}
    if cpu_clock:
        out["cpu"] = statistics.median(cpus)
    return out


def _peak_from_events(events: list[tuple[int, int]]) -> int:
    """Highest running total of (time, +/-bytes) allocation events."""
    total = peak = 0
    for _, nbytes in sorted(events):
        total += nbytes
        peak = max(peak, total)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs a line at every start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated by one forward + backward above what was allocated before it."""
    grad = torch.randn_like(x)
    _reset(module, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        _step(module, x, grad)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(module, x, grad)
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    return _peak_from_events(events)


def matmul_gflops(n: int, device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s (2 n^3 per product) of an n x n fp32 matmul: the machine's dense compute rate.

    Best of ``repeats``, by the same clock as the mixers (the thread's CPU time on the CPU with one
    thread, else wall time), so that "% matmul" compares like with like on a busy machine.
    """
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = clock()
        a @ b
        _sync(device)
        if i:
            times.append(clock() - t0)
    return 2 * n**3 / min(times) / 1e9


def macs_per_image(module: nn.Module, width: int, size: int) -> int | None:
    """Forward MACs of one image, by runners.macs (imported lazily; None if unavailable)."""
    try:
        from hybridnas.runners.macs import profile
    except ImportError:
        return None
    return int(profile(module, (width, size, size))["macs"])


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    size: int
    ms: float = math.nan
    cpu_ms: float = math.nan
    peak_mib: float = math.nan
    macs: int | None = None
    error: str | None = None

    def wall_or_cpu(self) -> float:
        return self.cpu_ms if not math.isnan(self.cpu_ms) else self.ms


def measure_row(
    name: str, build: Callable[[], nn.Module], s: Setting, size: int, device: torch.device
) -> Row:
    row = Row(name, size)
    try:
        module = build().to(device)
        x = torch.randn(s.batch, s.width, size, size, device=device, requires_grad=True)
        t = time_fwd_bwd(module, x, s.warmup, s.repeats)
        row.ms, row.cpu_ms = t["wall"], t.get("cpu", math.nan)
        row.peak_mib = peak_bytes(module, x) / 2**20
        row.macs = macs_per_image(module, s.width, size)
    except Exception as e:  # a broken mixer is reported in its row, the others still run
        row.error = f"{type(e).__name__}: {e}".splitlines()[0][:100]
    return row


def _fmt(value: float, spec: str, unit: str = "") -> str:
    """``value`` formatted with a unit, or a right-aligned "-" of the same width when it is missing."""
    if value is None or math.isnan(value):
        return "-".rjust(len(format(0.0, spec)) + len(unit))
    return format(value, spec) + unit


HEADER = (
    f"{'mixer':16s} {'size':>5s} {'ms':>9s} {'cpu ms':>9s} {'peak MiB':>9s} {'MACs/img':>10s} "
    f"{'% matmul':>8s} {'speedup':>8s} {'mem':>6s}"
)


def format_row(row: Row, s: Setting, matmul: float, base: Row | None, indent: bool = False) -> str:
    name = ("  " + row.name) if indent else row.name
    if row.error:
        return f"{name:16s} {row.size:>3d}^2  error: {row.error}"
    clock = row.wall_or_cpu()
    share = math.nan
    if row.macs is not None and clock > 0:
        share = 100 * (3 * 2 * row.macs * s.batch / (clock / 1e3)) / (matmul * 1e9)
    speed = mem = math.nan
    if base is not None and not base.error:
        speed = base.wall_or_cpu() / clock
        mem = row.peak_mib / base.peak_mib if base.peak_mib > 0 else math.nan
    macs = "-" if row.macs is None else f"{row.macs / 1e6:.1f}M"
    return (
        f"{name:16s} {row.size:>3d}^2 {_fmt(row.ms, '9.1f')} {_fmt(row.cpu_ms, '9.1f')} "
        f"{_fmt(row.peak_mib, '9.2f')} {macs:>10s} {_fmt(share, '7.1f', '%')} "
        f"{_fmt(speed, '7.2f', 'x')} {_fmt(mem, '5.2f', 'x')}"
    )


def run(s: Setting, names: list[str] | None = None, device: torch.device | None = None) -> list[str]:
    """Measure every mixer (or ``names``) and return the printed lines."""
    from hybridnas import blocks

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(THREADS)
    names = list(blocks.MIXERS) if names is None else names
    matmul = matmul_gflops(s.matmul_n, device)
    lines = [
        machine_line(),
        f"bench blocks: forward+backward, batch {s.batch}, width {s.width}, {s.heads} heads, fp32, {device}, "
        f"{torch.get_num_threads()} thread(s), median of {s.repeats} after {s.warmup} warm-up",
        f"matmul rate: {matmul:.1f} GFLOP/s ({s.matmul_n}x{s.matmul_n} fp32); {load_average()}",
        "speedup = unfold time / mixer time, mem = mixer peak / unfold peak (both from the cpu clock on the CPU);"
        " % matmul = 3 x forward MACs / time vs the matmul rate",
        "",
        HEADER,
    ]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    for size in s.sizes:
        for name in names:
            opts = {"heads": s.heads} if name in blocks.ATTENTION_MIXERS else {}

            def build(name: str = name, opts: dict = opts) -> nn.Module:
                return blocks.build_mixer(name, s.width, **opts)

            torch.manual_seed(0)
            row = measure_row(name, build, s, size, device)
            base = None
            if not row.error and (name in SAME_MODULE or name in SAME_AREA):
                torch.manual_seed(0)
                mixer = build()
                base = measure_row(
                    "unfold", lambda m=mixer, n=name: unfold_baseline(n, m, s.width, s.heads), s, size, device
                )
            emit(format_row(row, s, matmul, base))
            if base is not None:
                emit(format_row(base, s, matmul, None, indent=True))
    return lines


def main(args: argparse.Namespace) -> int:
    """``hybridnas bench blocks [--quick]``; ``args.mixers`` (not on the command line) picks a subset."""
    quick = bool(getattr(args, "quick", False))
    run(QUICK if quick else REFERENCE, names=getattr(args, "mixers", None))
    return 0
