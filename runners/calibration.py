"""Calibrating the latency table for a search space, before any trial runs, and judging the result.

In place, a unit's time still depends on its neighbours (caches and the allocator see different
working sets), so a table of in-context unit times alone predicts whole networks only roughly.
``calibrate_table`` therefore also times many whole architectures of the space end to end and
refits the unit entries to them (``fit_table``): a ridge regression of the end-to-end times on
unit counts, weighted by relative error, pulled towards the in-context times (which stay in the
table as ``measured_ms``).

A calibration measures its own noise: a small reference network of the space is timed again and
again between the other measurements. When its timings disagree, or the refit cannot explain the
end-to-end times (`NoiseLimits`), the calibration is not trusted: ``calibrate_latency`` does not
mark the space calibrated, and every entry measured while the machine was noisy is stored as such
and measured again by the next calibration. README "Measuring" says what the limits are and why;
`hybridnas bench latency [--load N]` measures how well the table predicts, quiet and loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hybridnas.runners.latency import LatencyContext, latency
from hybridnas.runners.latency_table import (
    ARCH,
    OVERHEAD,
    LatencyTable,
    spec_units,
    unit_latencies,
    unit_prior,
)

# The refit's pull towards the in-context times, per unit, on the relative deviation
# ((t - measured) / measured)^2; the end-to-end residuals are relative too. Weak enough that a
# hundred architectures move the entries by their few-percent context effects, strong enough
# that a unit seen in only one or two of them stays near its measurement.
FIT_PRIOR = 0.03
MIN_FIT_ARCHS = 10  # fewer end-to-end measurements than this: the table keeps its in-context times
CALIBRATION_SAMPLES = 2000  # architectures drawn to cover the latency table of a space too big to enumerate
PROBE_EVERY = 5  # end-to-end timings between two timings of the reference network
PROBE_RUNS = 20
SPACE = "space|"  # a space's calibration record: f"{context}||space|{hash of the space}"


@dataclass(frozen=True)
class NoiseLimits:
    """When a calibration, and each entry it measured, is trusted (README "Measuring").

    The reference network is timed between the other measurements. ``noise``: each of its timings
    (a median of its runs) must agree with the median of all of them within this fraction; the
    calibration's noise floor is the 90th percentile of those drifts. ``tail``: the slow tail of a
    timing (the 90th percentile of its runs) must stay within this fraction of its own median; the
    calibration's tail is the 90th percentile over its timings. A tail of 15-25 % is ordinary
    jitter for a sub-millisecond network on a quiet machine (measured: `hybridnas bench latency`);
    a busy one shows 50 % to many times. An entry is noisy when one of the two timings around its
    measurement breaks either limit. ``refit``: the refit entries must predict at least this share
    of the timed architectures within 10 %.
    """

    noise: float = 0.10
    tail: float = 0.35
    refit: float = 0.80


def trusted(entry: Any) -> bool:
    """A table entry a calibration may keep: measured by a calibration that found the machine quiet.

    Entries measured outside a calibration (a unit first met during a search, while trials train)
    and entries measured while the machine was noisy are measured again by the next calibration.
    """
    return isinstance(entry, dict) and entry.get("noisy") is False


class _Reference:
    """A small network of the space, timed between a calibration's other measurements.

    ``mark(keys)`` says which table entries were measured since the previous timing and times the
    network again; ``assign`` then gives each entry the worse deviation of the two timings around it.
    """

    def __init__(self, spec: Any, ctx: LatencyContext) -> None:
        from hybridnas.search_space.build import build_model

        inp = spec.input
        self.model, self.shape, self.ctx = build_model(spec), (inp.channels, inp.size, inp.size), ctx
        self.timings: list[dict[str, float]] = []
        self.windows: list[tuple[int, list[str]]] = []
        # Untimed once: a network's first timing runs 10-15 % slow (allocator, kernel selection),
        # which would read as drift.
        latency(self.model, self.shape, self.ctx, warmup=2, runs=PROBE_RUNS)
        self.time()

    def time(self) -> None:
        self.timings.append(latency(self.model, self.shape, self.ctx, warmup=2, runs=PROBE_RUNS))

    def mark(self, keys: Collection[str]) -> None:
        if keys:
            self.windows.append((len(self.timings) - 1, list(keys)))
            self.time()

    def drifts(self) -> list[float]:
        """Per timing: the distance of its median to the median of all timings."""
        mid = statistics.median(t["median_ms"] for t in self.timings)
        return [abs(t["median_ms"] / mid - 1) for t in self.timings]

    def tails(self) -> list[float]:
        """Per timing: how far its 90th percentile lies above its median."""
        return [t["p90_ms"] / t["median_ms"] - 1 for t in self.timings]

    def assign(self, table: LatencyTable, limits: NoiseLimits) -> None:
        drift, tail = self.drifts(), self.tails()
        for i, keys in self.windows:
            noise, slow = max(drift[i], drift[i + 1]), max(tail[i], tail[i + 1])
            noisy = noise > limits.noise or slow > limits.tail
            for key in keys:
                entry = table.get(key)
                if entry is not None:
                    table.put(
                        key, {**entry, "noise": round(noise, 4), "tail": round(slow, 4), "noisy": noisy}
                    )


def measure_end_to_end(
    spec: Any,
    table: LatencyTable,
    context: LatencyContext | None = None,
    runs: int = 30,
    refresh: bool = False,
) -> float:
    """Time ``build_model(spec)`` end to end (`latency`) and keep it in ``table`` with its units, for
    `fit_table`; an architecture already there is not timed again unless ``refresh``. Returns the
    median (ms)."""
    from hybridnas.search_space.build import build_model

    ctx = LatencyContext() if context is None else context
    key = f"{ctx.key()}||{ARCH}{spec.arch_hash()}"
    if refresh or key not in table:
        inp = spec.input
        t = latency(build_model(spec), (inp.channels, inp.size, inp.size), ctx, warmup=3, runs=runs)
        units = [u.key for u in spec_units(spec, ctx.batch_size)]
        table.put(
            key,
            {
                "ms": t["median_ms"],
                "p10_ms": t["p10_ms"],
                "p90_ms": t["p90_ms"],
                "units": units,
                "at": time.time(),
            },
        )
    return float(table.get(key)["ms"])


def fit_table(
    table: LatencyTable, context: LatencyContext | None = None, prior: float = FIT_PRIOR
) -> dict[str, Any]:
    """Refit this context's unit entries (and the overhead) to its end-to-end entries.

    Minimises ``sum_a ((sum_u n_au t_u + overhead - y_a) / y_a)^2 + prior * sum_u ((t_u - m_u) / m_u)^2``
    over the units that occur in the timed architectures, where ``m_u`` is the unit's in-context
    time (kept as ``measured_ms``). Architectures timed while the machine was noisy are left out;
    entries of units no timed architecture contains are left as they are. Returns ``{"archs", "units", "within_10_before", "within_10_after"}`` (in-sample
    shares of the timed architectures predicted within 10 %), or ``{"archs": n}`` alone when
    there are fewer than ``MIN_FIT_ARCHS`` of them or a unit of theirs is not in the table.
    """
    import numpy as np

    ctx = LatencyContext() if context is None else context
    prefix = ctx.key() + "||"
    archs = [
        e
        for k, e in table.items()
        if k.startswith(prefix + ARCH) and isinstance(e.get("units"), list) and not e.get("noisy")
    ]
    overhead_key = prefix + OVERHEAD
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
    m = np.array([unit_prior(table.get(prefix + u)) for u in names] + [unit_prior(table.get(overhead_key))])
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
    context: LatencyContext | None = None,
    end_to_end: int = 120,
    budget_s: float = 60.0,
    seed: int = 0,
    limits: NoiseLimits = NoiseLimits(),
) -> dict[str, Any]:
    """Make ``table`` ready to predict the architectures ``specs`` stand for (a space's sample).

    1. Every unit they contain is measured in context (a few architectures that together contain
       them all), unless the table has a `trusted` entry for it already.
    2. Up to ``end_to_end`` of them (a seeded random choice) are timed whole (`measure_end_to_end`),
       within about ``budget_s`` seconds, unless already timed (and trusted) in this context.
    3. The unit entries are refit to the trusted end-to-end times of this context (`fit_table`).

    Between these measurements the smallest of the architectures is timed again and again; each
    entry measured is stored with the noise seen around it (`NoiseLimits`). An architecture a
    block cannot build is skipped (it fails as a trial, with the error). Returns ``{"units",
    "measured", "timed", "fit", "broken", "seconds", "quality"}``; ``quality`` is what
    `calibration_quality` says.
    """
    t0 = time.perf_counter()
    ctx = LatencyContext() if context is None else context
    table = LatencyTable() if table is None else table
    prefix = ctx.key() + "||"
    load = [_load()]
    units: set[str] = set()
    covering = []
    for spec in specs:  # a few architectures that together contain every unit
        keys = {u.key for u in spec_units(spec, ctx.batch_size)}
        if not keys <= units:
            covering.append(spec)
            units |= keys
    reference: _Reference | None = None
    missing: set[str] = set()
    broken: list[str] = []
    bad: set[str] = set()

    def probe() -> _Reference | None:
        nonlocal reference
        if reference is None:
            for spec in sorted(covering or specs, key=lambda s: len(spec_units(s, ctx.batch_size))):
                try:
                    reference = _Reference(spec, ctx)
                    break
                except Exception:  # noqa: BLE001 - an architecture a block cannot build: try another
                    continue
        return reference

    for spec in covering:
        stale = {u.key for u in spec_units(spec, ctx.batch_size) if not trusted(table.get(prefix + u.key))}
        if not stale and prefix + OVERHEAD in table:
            continue
        try:
            ref = probe()
            unit_latencies(spec, table, ctx, refresh=stale)
        except Exception as e:  # noqa: BLE001 - reported; such an architecture fails as a trial
            broken.append(f"{type(e).__name__}: {e}")
            bad.add(spec.arch_hash())
            continue
        missing |= stale
        if ref is not None:
            ref.mark([prefix + k for k in stale])
    table.save()
    pool = [s for s in specs if s.arch_hash() not in bad]
    random.Random(seed).shuffle(pool)
    timed, pending, t1 = 0, [], time.perf_counter()
    for spec in pool[:end_to_end]:
        if time.perf_counter() - t1 > budget_s:
            break
        key = f"{prefix}{ARCH}{spec.arch_hash()}"
        if trusted(table.get(key)):
            continue
        try:
            ref = probe()
            measure_end_to_end(spec, table, ctx, refresh=True)
        except Exception as e:  # noqa: BLE001
            broken.append(f"{type(e).__name__}: {e}")
            continue
        timed += 1
        pending.append(key)
        if ref is not None and len(pending) >= PROBE_EVERY:
            ref.mark(pending)
            pending = []
    if reference is not None:
        reference.mark(pending)
        reference.assign(table, limits)
    fit = fit_table(table, ctx)
    table.save()
    load.append(_load())
    scope = [prefix + u for u in units] + [f"{prefix}{ARCH}{s.arch_hash()}" for s in pool[:end_to_end]]
    noisy = sum(1 for k in scope if k in table and not trusted(table.get(k)))
    quality = calibration_quality(reference, fit, noisy, max(load), ctx, limits)
    return {
        "units": len(units),
        "measured": len(missing),
        "timed": timed,
        "fit": fit,
        "broken": broken,
        "seconds": time.perf_counter() - t0,
        "quality": quality,
    }


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def calibration_quality(
    reference: _Reference | None,
    fit: dict[str, Any],
    noisy: int,
    load: float,
    ctx: LatencyContext,
    limits: NoiseLimits,
) -> dict[str, Any]:
    """``{"calibrated", "noise", "tail", "timings", "refit", "archs", "noisy", "load", "cores", "clock",
    "limits"}``: ``noise`` is the noise floor and ``tail`` the slow tail of the reference timings
    (`NoiseLimits`; None when nothing needed measuring), ``refit`` the
    in-sample share of timed architectures the refit predicts within 10 % (None below
    ``MIN_FIT_ARCHS``), ``noisy`` how many of the calibration's entries are to be measured again."""
    noise = tail = None
    if reference is not None and len(reference.timings) > 1:
        noise, tail = _p90(reference.drifts()), _p90(reference.tails())
    refit = fit.get("within_10_after")
    ok = (
        (noise is None or noise <= limits.noise)
        and (tail is None or tail <= limits.tail)
        and (refit is None or refit >= limits.refit)
    )
    return {
        "calibrated": bool(ok),
        "noise": noise,
        "tail": tail,
        "timings": 0 if reference is None else len(reference.timings),
        "refit": refit,
        "archs": fit.get("archs", 0),
        "noisy": noisy,
        "load": load,
        "cores": os.cpu_count(),
        "clock": ctx.clock,
        "limits": asdict(limits),
    }


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def deviation_text(deviation: float) -> str:
    """0.07 -> '7%', 3.2 -> '4.2x': a relative deviation as a user reads it."""
    return f"{100 * deviation:.0f}%" if deviation < 1 else f"{1 + deviation:.1f}x"


def calibration_warning(quality: dict[str, Any], context: LatencyContext) -> str | None:
    """One line for a calibration that is not trusted: what was wrong, the load, and what to do."""
    if quality["calibrated"]:
        return None
    limits = NoiseLimits(**quality.get("limits", {}))
    seen = []
    if quality.get("noise") is not None and quality["noise"] > limits.noise:
        seen.append(
            f"timings of a reference network varied by {deviation_text(quality['noise'])} "
            f"(limit {100 * limits.noise:.0f}%)"
        )
    if quality.get("tail") is not None and quality["tail"] > limits.tail:
        seen.append(
            f"its slowest runs took {deviation_text(quality['tail'])} longer than its median "
            f"(limit {100 * limits.tail:.0f}%)"
        )
    if quality.get("refit") is not None and quality["refit"] < limits.refit:
        seen.append(
            f"the refit predicts only {100 * quality['refit']:.0f}% of {quality['archs']} timed "
            f"architectures within 10% (limit {100 * limits.refit:.0f}%)"
        )
    seen.append(f"load average {quality['load']:.1f} on {quality['cores']} cores")
    can_cpu = context.clock == "wall" and context.device.type == "cpu" and context.threads == 1
    todo = "set `latency: {clock: cpu}` (or auto), or rerun" if can_cpu else "rerun"
    return (
        f"latency table NOT calibrated, the machine was too busy to time reliably ({'; '.join(seen)}); "
        f"predicted latencies may be off. {todo[0].upper() + todo[1:]} when the machine is quiet: the "
        f"{quality['noisy']} noisy entries are measured again then."
    )


def calibration_summary(cal: dict[str, Any]) -> str:
    """One line on what `calibrate_latency` did: units, timings, refit, noise floor, time, where."""
    q, fit = cal.get("quality", {}), cal["fit"]
    parts = [f"latency table: {cal['units']} units, {cal['measured']} measured now"]
    if cal["timed"]:
        parts.append(f"{cal['timed']} architectures timed end to end")
    if "within_10_after" in fit:
        parts.append(f"refit: {100 * fit['within_10_after']:.0f}% of {fit['archs']} within 10%")
    if q.get("noise") is not None:
        parts.append(
            f"noise floor {deviation_text(q['noise'])}"
            + (f" (slow tail {deviation_text(q['tail'])})" if q.get("tail") is not None else "")
            + f" on the {q['clock']} clock"
        )
    line = ", ".join(parts) + f" ({cal['seconds']:.1f}s), cached in {cal['path']}"
    if cal["broken"]:
        line += f"; {len(cal['broken'])} architectures could not be built ({cal['broken'][0]})"
    return line


def space_marker(space: Any, input: Any, context: LatencyContext, seed: int = 0) -> str:
    """The table key of a space's calibration record in ``context``."""
    what = {"space": space.to_dict(), "input": input.to_dict(), "samples": CALIBRATION_SAMPLES, "seed": seed}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return f"{context.key()}||{SPACE}{digest}"


def calibrate_latency(
    space: Any,
    input: Any,
    context: LatencyContext,
    table_path: str | None = None,
    seed: int = 0,
    name: str = "",
    limits: NoiseLimits = NoiseLimits(),
) -> dict[str, Any]:
    """Calibrate the latency table for this space before any trial runs (`calibrate_table`).

    Small spaces are enumerated; bigger ones are covered by ``CALIBRATION_SAMPLES`` random draws
    (a unit the draws missed is measured when first met). Every unit is measured in context and
    about a hundred architectures end to end, to which the unit entries are refit. The space's
    record in the table (``name``, when, the quality, the entries it uses) says whether it is
    calibrated: a space calibrated before in this context with no noisy entry left (a previous
    search, same machine, same code) is not measured again; one whose calibration was noisy is
    calibrated again, and only its noisy entries are measured again. Returns ``{"units",
    "measured", "timed", "fit", "seconds", "path", "broken", "quality"}``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    table = LatencyTable(table_path)
    marker = space_marker(space, input, context, seed)
    done = table.get(marker)
    if done is not None and done.get("quality", {}).get("calibrated") and not done["quality"].get("noisy"):
        return {
            "units": done["units"],
            "measured": 0,
            "timed": 0,
            "fit": done["fit"],
            "broken": done["broken"],
            "seconds": time.perf_counter() - t0,
            "path": str(table.path),
            "quality": done["quality"],
        }
    if space.size(input) <= CALIBRATION_SAMPLES:
        specs = space.enumerate(input)
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        specs = [space.suggest(study.ask(), input=input, grid=False) for _ in range(CALIBRATION_SAMPLES)]
    res = calibrate_table(specs, table, context, seed=seed, limits=limits)
    quality = dict(res["quality"])
    if res["broken"]:  # a broken architecture may be fixed by a code change: check again next time
        quality["calibrated"] = False
    keys = sorted({u.key for s in specs for u in spec_units(s, context.batch_size)})
    record = {
        "ms": 0.0,
        "name": name,
        "at": time.time(),
        **{k: res[k] for k in ("units", "fit", "broken")},
        "quality": quality,
        "keys": keys,
        "archs": sorted({s.arch_hash() for s in specs}),
    }
    table.put(marker, record)
    table.save()
    return {**res, "quality": quality, "seconds": time.perf_counter() - t0, "path": str(table.path)}


SNAPSHOT_FILE = "latency_table.json"


def snapshot_table(table_path: str | os.PathLike, dest: str | os.PathLike, context: LatencyContext) -> int:
    """Copy this context's entries of the shared table into ``dest`` (a search's own table).

    A search predicts from its snapshot for its whole life, so a calibration of another space on
    this machine (which refits shared entries) cannot move the predictions of a paused search.
    Returns the number of entries copied.
    """
    prefix = context.key() + "||"
    src = LatencyTable(table_path)
    dest = Path(dest)
    if dest.exists():
        dest.unlink()  # a snapshot is taken once per search; an earlier partial one is replaced
    snap = LatencyTable(dest)
    n = 0
    for key, entry in src.items():
        if key.startswith(prefix):
            snap.put(key, entry)
            n += 1
    if n:
        snap.save()
    return n


def snapshot_drift(
    snapshot: str | os.PathLike, table_path: str | os.PathLike | None, context: LatencyContext
) -> int:
    """How many of the snapshot's unit entries the machine's shared table now holds differently."""
    prefix = context.key() + "||"
    snap, shared = LatencyTable(snapshot), LatencyTable(table_path)
    changed = 0
    for key, entry in snap.items():
        if not key.startswith(prefix) or SPACE in key or ARCH in key:
            continue
        now = shared.get(key)
        if now is None or float(now.get("ms", math.nan)) != float(entry["ms"]):
            changed += 1
    return changed


def snapshot_calibration(
    snapshot: str | os.PathLike, space: Any, input: Any, context: LatencyContext, seed: int = 0
) -> dict[str, Any]:
    """The calibration a search recorded in its snapshot (what `calibrate_latency` returned then),
    without measuring anything: a resumed search reports and predicts from it unchanged."""
    done = LatencyTable(snapshot).get(space_marker(space, input, context, seed)) or {}
    quality = done.get("quality") or {"calibrated": False, "clock": context.clock}
    return {
        "units": done.get("units", 0),
        "measured": 0,
        "timed": 0,
        "fit": done.get("fit", 0),
        "broken": done.get("broken", []),
        "seconds": 0.0,
        "path": str(snapshot),
        "quality": quality,
    }
