"""runners.calibration: refitting the table to end-to-end times, and calibrating for a space."""

from __future__ import annotations

import math

import pytest

from hybridnas.runners.calibration import MIN_FIT_ARCHS, calibrate_table, fit_table
from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.latency_table import (
    LatencyTable,
    missing_units,
    predict_latency,
    spec_units,
    unit_latencies,
)


def _synthetic_context_table(tmp_path, n_archs, seed=0):
    """A table whose in-context unit times are off by up to +-25 % (as context effects make them),
    plus ``n_archs`` end-to-end entries that are exact sums of the true times."""
    import random

    rng = random.Random(seed)
    ctx = LatencyContext().key()
    true = {f"u{i}": rng.uniform(0.05, 0.5) for i in range(8)}
    true_overhead = 0.03
    table = LatencyTable(tmp_path / "t.json")
    for u, t in true.items():
        table.put(f"{ctx}||{u}", {"ms": t * rng.uniform(0.75, 1.25)})
    table.put(f"{ctx}||overhead", {"ms": 0.0, "samples": [0.0]})
    table.put(f"{ctx}||lonely", {"ms": 7.0})  # in no timed architecture: the refit leaves it alone

    def arch():
        return [rng.choice(list(true)) for _ in range(rng.randint(2, 6))]

    for i in range(n_archs):
        units = arch()
        table.put(f"{ctx}||arch|a{i}", {"ms": sum(true[u] for u in units) + true_overhead, "units": units})
    return table, ctx, true, true_overhead, arch


def test_refit_makes_the_table_predict_end_to_end_times_it_never_saw(tmp_path):
    table, ctx, true, true_overhead, arch = _synthetic_context_table(tmp_path, 60)
    before = {u: table.get(f"{ctx}||{u}")["ms"] for u in true}
    fit = fit_table(table)
    assert (
        fit["archs"] == 60 and fit["units"] == len(true) and fit["within_10_after"] >= fit["within_10_before"]
    )
    for _ in range(50):  # new combinations: the refit entries add up to the truth
        units = arch()
        predicted = sum(table.get(f"{ctx}||{u}")["ms"] for u in units) + table.get(f"{ctx}||overhead")["ms"]
        assert predicted == pytest.approx(sum(true[u] for u in units) + true_overhead, rel=0.03)
    for u in true:  # the in-context measurements stay in the table
        assert table.get(f"{ctx}||{u}")["measured_ms"] == before[u]
    assert table.get(f"{ctx}||lonely") == {"ms": 7.0}
    assert table.get(f"{ctx}||overhead")["fitted"] is True


def test_refit_needs_enough_architectures_and_changes_nothing_without_them(tmp_path):
    table, ctx, true, *_ = _synthetic_context_table(tmp_path, MIN_FIT_ARCHS - 1)
    before = {k: dict(v) for k, v in table.items()}
    assert fit_table(table) == {"archs": MIN_FIT_ARCHS - 1}
    assert dict(table.items()) == before


def test_calibrate_table_measures_units_times_archs_refits_and_caches(tiny_spec, tmp_path):
    specs = [
        tiny_spec.replace_path("stem.channels", stem).replace_path("stages.1.channels", c)
        for stem in (4, 8, 12)
        for c in (8, 16, 24, 32)
    ]
    table = LatencyTable(tmp_path / "latency.json")
    cal = calibrate_table(specs, table, end_to_end=12)
    assert cal["units"] == len({u.key for s in specs for u in spec_units(s)}) == cal["measured"]
    assert cal["timed"] == 12 and cal["fit"]["archs"] == 12 and not cal["broken"]
    assert not any(missing_units(s, table) for s in specs)
    assert any("measured_ms" in e for _, e in table.items())
    predicted = [predict_latency(s, table) for s in specs]
    assert all(math.isfinite(p) and p > 0 for p in predicted)
    again = calibrate_table(specs, LatencyTable(tmp_path / "latency.json"), end_to_end=12)
    assert again["measured"] == 0 and again["timed"] == 0  # all cached: nothing timed twice


def test_a_later_measurement_keeps_the_refit_overhead(tiny_spec, tmp_path):
    table, ctx, *_ = _synthetic_context_table(tmp_path, 30)
    fit_table(table)
    fitted = table.get(f"{ctx}||overhead")["ms"]
    unit_latencies(tiny_spec, table)  # new units: measured in context, adds an overhead sample
    entry = table.get(f"{ctx}||overhead")
    assert entry["ms"] == fitted and len(entry["samples"]) == 2
