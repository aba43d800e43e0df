"""The latency lookup table: per-unit latencies of architectures, cached on disk, and predictions.

``LatencyTable`` caches the latency of each unit of an architecture (stem, downsample, block at its
resolution, head) in one JSON file, keyed by the measuring context (`LatencyContext.key`).
``predict_latency`` sums a network's unit entries plus a per-network overhead, so a search can rank
thousands of architectures by latency without timing each one. Units are timed in place, inside
whole forward passes of a network that contains them (``measure_in_context``): at batch 1 on a CPU
a small network is dominated by per-op overhead, and a unit timed alone in a hot loop runs faster
than it does between other units. `runners.calibration` refits the entries to end-to-end times of
whole architectures; README "Measuring" and `hybridnas bench latency` give the numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridnas.runners.device import eval_mode, example_input
from hybridnas.runners.latency import LatencyContext, check_runs, summary, time_ms

TABLE_FORMAT = 2  # 2: entries carry their measurement's noise and time; a format-1 file is set aside


class CacheWarning(UserWarning):
    """The latency cache file could not be used as it was (it was set aside and is measured afresh)."""


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


def parse_table(text: str) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The entries of a table file's text, or ``({}, what is wrong)``: a file is used whole or not at all."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return {}, f"not a JSON file ({e})"
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}, "not a latency table (no 'entries' mapping)"
    if data.get("format") != TABLE_FORMAT:
        return {}, f"format {data.get('format')!r}, and this version of hybridnas reads format {TABLE_FORMAT}"
    for key, entry in data["entries"].items():
        ms = entry.get("ms") if isinstance(entry, dict) else None
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms):
            return {}, f"entry {key!r} has no finite 'ms'"
    return data["entries"], None


class LatencyTable:
    """Measured latencies (ms) of architecture units, cached in one JSON file.

    Keys are strings naming the unit and the measuring context (`LatencyContext.key`: machine,
    threads, batch, dtype, clock, torch version and a hash of the block code, so an edited block
    is measured afresh). Entries are kept in memory; ``save()`` merges them into the file under a
    lock and replaces it atomically, so concurrent writers (Ray trials, two searches) never lose or
    corrupt entries. A file that is not a table of this format (corrupt, or written by another
    version) is never half-read: it is renamed to ``latency.json.bad-<time>`` with one
    `CacheWarning`, and the table starts empty.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_table_path()
        self._entries: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self._entries.update(self._read())

    def _read(self, locked: bool = False) -> dict[str, dict[str, Any]]:
        """The file's entries; a bad file is set aside (under the lock, unless the caller holds it)."""
        try:
            entries, problem = parse_table(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            entries, problem = {}, f"unreadable ({e})"
        if problem is None:
            return entries
        if locked:
            return self._set_aside(problem)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path):
            return self._read(locked=True)

    def _set_aside(self, problem: str) -> dict[str, dict[str, Any]]:
        aside = self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return {}
        except OSError as e:
            problem += f"; it could not be moved aside ({e}) and is left as it is"
            aside = None
        where = f"set aside as {aside}" if aside else "not used"
        warnings.warn(
            f"latency table {self.path}: {problem}; {where}, and latencies are measured afresh",
            CacheWarning,
            stacklevel=4,
        )
        return {}

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

    def _write(self, entries: Mapping[str, Any]) -> None:
        """Replace the file by ``entries`` (the caller holds the lock)."""
        fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": TABLE_FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def save(self) -> None:
        """Merge this table's new entries into the file (others' entries are kept)."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path):
            merged = self._read(locked=True)
            merged.update(self._new)
            self._write(merged)
        self._entries.update(merged)
        self._new.clear()

    def clear(self) -> bool:
        """Delete the file (under the lock; the empty lock file stays) and every entry; True if it existed."""
        self._entries.clear()
        self._new.clear()
        if not self.path.exists():
            return False
        with _file_lock(self.path):
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
        return True

    def remove(self, keys: Collection[str]) -> int:
        """Delete ``keys`` from the file and from this table at once; returns how many were there."""
        keys = set(keys)
        if not self.path.exists():
            gone = keys & self._entries.keys()
        else:
            with _file_lock(self.path):
                merged = self._read(locked=True)
                gone = keys & (merged.keys() | self._entries.keys())
                self._write({k: v for k, v in merged.items() if k not in keys})
        for k in keys:
            self._entries.pop(k, None)
            self._new.pop(k, None)
        return len(gone)


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
    context: LatencyContext | None = None,
    runs: int = 30,
    warmup: int = 5,
    budget_s: float = 0.3,
) -> dict[str, Any]:
    """Time every unit of ``build_model(spec)`` where it sits, during whole forward passes.

    At batch 1 on a CPU a small network is dominated by per-op framework cost, which depends on
    how warm the instruction cache, branch predictors and data caches are. A unit timed alone in
    a loop keeps all of them hot and runs faster than inside the network (README "Measuring"),
    so units are timed in place: each is wrapped by a timer and the network runs whole. Passes of the plain network are interleaved with the wrapped
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

    ctx = LatencyContext() if context is None else context
    check_runs(runs, warmup)
    timer, sync = ctx.timer(), ctx.sync()
    units = spec_units(spec, ctx.batch_size)
    model = build_model(spec).to(ctx.device)
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
    x = example_input((ctx.batch_size, inp.channels, inp.size, inp.size), ctx.device)

    def timed_pass() -> None:
        use(True)
        clock_.mark()  # the pass starts here; the stem's time includes the call into the network
        model(x)
        use(False)

    plain_times: list[float] = []
    try:
        with eval_mode(model), ctx.running():
            warm = time_ms(lambda: (model(x), timed_pass()), 0, max(1, warmup), sync, time.perf_counter)
            runs = max(runs, min(300, int(1e3 * budget_s / max(min(warm), 1e-3))))
            for *_, t in slots:
                t.times.clear()
            for _ in range(runs):
                plain_times += time_ms(lambda: model(x), 0, 1, sync, timer)
                timed_pass()
    finally:
        use(False)
    # Each unit's latency is its mean time over the *typical* passes, those whose total lies in
    # the middle 40 % of all passes. Per-unit medians would not do: every unit's times are skewed
    # (rare slow calls), so the sum of the medians falls short of the median pass, whereas means
    # over the same central passes add up to a typical pass exactly.
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
    total = summary(plain_times)
    unit_sum = sum(unit_ms[u.key] for u in units)
    return {
        "units": unit_ms,
        "samples": samples,
        "total": total,
        "overhead_ms": total["median_ms"] - unit_sum,
    }


OVERHEAD = "overhead"  # the per-network overhead entry: f"{context}||overhead"
MAX_OVERHEAD_SAMPLES = 64
ARCH = "arch|"  # end-to-end entries: f"{context}||arch|{arch_hash}"


def missing_units(spec: Any, table: LatencyTable, context: LatencyContext | None = None) -> list[Unit]:
    """The units of ``spec`` that ``predict_latency`` would have to measure (not in ``table``)."""
    ctx = LatencyContext() if context is None else context
    key = ctx.key()
    return [u for u in spec_units(spec, ctx.batch_size) if f"{key}||{u.key}" not in table]


def unit_latencies(
    spec: Any,
    table: LatencyTable | None = None,
    context: LatencyContext | None = None,
    refresh: Collection[str] = (),
) -> list[dict[str, Any]]:
    """``[{"unit", "stage", "ms"}]`` for every unit of ``spec`` plus a final ``{"unit": "overhead"}``.

    Units missing from the table, and those named in ``refresh`` (unit keys, as `spec_units` gives
    them), are measured in the context of this network (``measure_in_context``), stored with the
    time they were measured, and saved; other units already there are not measured again. Each such
    measurement also adds a sample of the per-model overhead, whose median is used.
    """
    ctx = LatencyContext() if context is None else context
    table = LatencyTable() if table is None else table
    prefix = ctx.key() + "||"
    units = spec_units(spec, ctx.batch_size)
    overhead_key = prefix + OVERHEAD
    stale = {u.key for u in units if prefix + u.key not in table or u.key in refresh}
    if stale or overhead_key not in table:
        measured = measure_in_context(spec, ctx)
        now = time.time()
        for key, ms in measured["units"].items():
            if key in stale:
                t = summary(measured["samples"][key])
                table.put(
                    prefix + key,
                    {"ms": ms, "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "runs": t["runs"], "at": now},
                )
        old = table.get(overhead_key) or {}
        samples = [*old.get("samples", []), measured["overhead_ms"]][-MAX_OVERHEAD_SAMPLES:]
        entry = {"ms": statistics.median(samples), "samples": samples, "at": now}
        if old.get("fitted"):  # `fit_table` set it from end-to-end times: keep that until the next refit
            entry.update(ms=old["ms"], fitted=True)
        table.put(overhead_key, entry)
        table.save()
    out = [{"unit": u.key, "stage": u.stage, "ms": float(table.get(prefix + u.key)["ms"])} for u in units]
    out.append({"unit": OVERHEAD, "stage": None, "ms": float(table.get(overhead_key)["ms"])})
    return out


def unit_prior(entry: Mapping[str, Any]) -> float:
    """The in-context measurement behind a (possibly refit) entry."""
    if "measured_ms" in entry:
        return float(entry["measured_ms"])
    if "samples" in entry:  # the overhead entry: the median of its per-network samples
        return float(statistics.median(entry["samples"]))
    return float(entry["ms"])


def predict_latency(
    spec: Any, table: LatencyTable | None = None, context: LatencyContext | None = None
) -> float:
    """Predicted forward latency (ms) of ``build_model(spec)``: its units' table entries + overhead.

    Units missing from the table (by default the file at ``default_table_path()``) are measured
    once and saved, so the first prediction in a new context costs a second or so and later
    ones, for architectures made of known units, a few milliseconds of bookkeeping.
    """
    return sum(u["ms"] for u in unit_latencies(spec, table, context))
