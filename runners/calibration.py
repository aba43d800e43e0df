"""Calibrating the latency table for a search space, before any trial runs.

In place, a unit's time still depends on its neighbours (caches and the allocator see different
working sets), so a table of in-context unit times alone predicts whole networks only roughly.
``calibrate_table`` therefore also times many whole architectures of the space end to end and
refits the unit entries to them (``fit_table``): a ridge regression of the end-to-end times on
unit counts, weighted by relative error, pulled towards the in-context times (which stay in the
table as ``measured_ms``). ``calibrate_latency`` does this for a whole search space and remembers
that it did. How well the refit entries predict architectures outside the fit is what `hybridnas
bench latency` measures; README "Measuring" and "Benchmarks" give the numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

from hybridnas.runners.latency import LatencyContext, latency
from hybridnas.runners.latency_table import (
    ARCH,
    OVERHEAD,
    LatencyTable,
    missing_units,
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


def measure_end_to_end(
    spec: Any, table: LatencyTable, context: LatencyContext | None = None, runs: int = 30
) -> float:
    """Time ``build_model(spec)`` end to end (`latency`) and keep it in ``table`` with its units, for
    `fit_table`; an architecture already there is not timed again. Returns the median (ms)."""
    from hybridnas.search_space.build import build_model

    ctx = LatencyContext() if context is None else context
    key = f"{ctx.key()}||{ARCH}{spec.arch_hash()}"
    if key not in table:
        inp = spec.input
        t = latency(build_model(spec), (inp.channels, inp.size, inp.size), ctx, warmup=3, runs=runs)
        units = [u.key for u in spec_units(spec, ctx.batch_size)]
        table.put(key, {"ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "units": units})
    return float(table.get(key)["ms"])


def fit_table(
    table: LatencyTable, context: LatencyContext | None = None, prior: float = FIT_PRIOR
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

    ctx = LatencyContext() if context is None else context
    prefix = ctx.key() + "||"
    archs = [e for k, e in table.items() if k.startswith(prefix + ARCH) and isinstance(e.get("units"), list)]
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
    ctx = LatencyContext() if context is None else context
    table = LatencyTable() if table is None else table
    units: set[str] = set()
    covering = []
    for spec in specs:  # a few architectures that together contain every unit
        keys = {u.key for u in spec_units(spec, ctx.batch_size)}
        if not keys <= units:
            covering.append(spec)
            units |= keys
    missing: set[str] = set()
    broken: list[str] = []
    bad: set[str] = set()
    for spec in covering:
        try:
            missing |= {u.key for u in missing_units(spec, table, ctx)}
            unit_latencies(spec, table, ctx)
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
            measure_end_to_end(spec, table, ctx)
            timed += len(table) > n  # a new entry: it was timed now, not found cached
        except Exception as e:  # noqa: BLE001
            broken.append(f"{type(e).__name__}: {e}")
    fit = fit_table(table, ctx)
    table.save()
    return {
        "units": len(units),
        "measured": len(missing),
        "timed": timed,
        "fit": fit,
        "broken": broken,
        "seconds": time.perf_counter() - t0,
    }


def calibrate_latency(
    space: Any, input: Any, context: LatencyContext, table_path: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Calibrate the latency table for this space before any trial runs (`calibrate_table`).

    Small spaces are enumerated; bigger ones are covered by ``CALIBRATION_SAMPLES`` random draws
    (a unit the draws missed is measured when first met). Every unit is measured in context and
    about a hundred architectures end to end, to which the unit entries are refit. What the table
    has already (a previous search, same machine, same code) is not measured again.
    Returns ``{"units", "measured", "timed", "fit", "seconds", "path", "broken"}``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    table = LatencyTable(table_path)
    # A space calibrated before in this context (machine, threads, batch, torch, block code) is
    # marked in the table: a repeated search skips drawing and checking its 2,000 architectures.
    what = {"space": space.to_dict(), "input": input.to_dict(), "samples": CALIBRATION_SAMPLES, "seed": seed}
    marker = (
        f"{context.key()}||space|{hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]}"
    )
    done = table.get(marker)
    if done is not None:
        return {
            "units": done["units"],
            "measured": 0,
            "timed": 0,
            "fit": done["fit"],
            "broken": done["broken"],
            "seconds": time.perf_counter() - t0,
            "path": str(table.path),
        }
    if space.size(input) <= CALIBRATION_SAMPLES:
        specs = space.enumerate(input)
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        specs = [space.suggest(study.ask(), input=input, grid=False) for _ in range(CALIBRATION_SAMPLES)]
    res = calibrate_table(specs, table, context, seed=seed)
    if not res["broken"]:  # a broken architecture may be fixed by a code change: check again next time
        summary = {k: res[k] for k in ("units", "fit", "broken")}
        table.put(marker, {"ms": 0.0, **summary})
        table.save()
    return {**res, "seconds": time.perf_counter() - t0, "path": str(table.path)}
