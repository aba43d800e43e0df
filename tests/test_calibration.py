"""runners.calibration: refitting the table to end-to-end times, and calibrating for a space."""

from __future__ import annotations

import math
import os

import pytest

from hybridnas.runners.bench.load import busy_load
from hybridnas.runners.calibration import (
    MIN_FIT_ARCHS,
    NoiseLimits,
    calibrate_latency,
    calibrate_table,
    calibration_warning,
    fit_table,
    space_marker,
)
from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.latency_table import (
    LatencyTable,
    missing_units,
    predict_latency,
    spec_units,
    unit_latencies,
)

# Limits no machine fails: what a test that is not about noise calibrates with, so that it does
# not depend on how busy the machine running it is.
ANY_MACHINE = NoiseLimits(noise=math.inf, tail=math.inf, refit=0.0)


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
    cal = calibrate_table(specs, table, end_to_end=12, limits=ANY_MACHINE)
    assert cal["units"] == len({u.key for s in specs for u in spec_units(s)}) == cal["measured"]
    assert cal["timed"] == 12 and cal["fit"]["archs"] == 12 and not cal["broken"]
    assert not any(missing_units(s, table) for s in specs)
    assert any("measured_ms" in e for _, e in table.items())
    predicted = [predict_latency(s, table) for s in specs]
    assert all(math.isfinite(p) and p > 0 for p in predicted)
    again = calibrate_table(specs, LatencyTable(tmp_path / "latency.json"), end_to_end=12, limits=ANY_MACHINE)
    assert again["measured"] == 0 and again["timed"] == 0  # all cached: nothing timed twice


def test_a_later_measurement_keeps_the_refit_overhead(tiny_spec, tmp_path):
    table, ctx, *_ = _synthetic_context_table(tmp_path, 30)
    fit_table(table)
    fitted = table.get(f"{ctx}||overhead")["ms"]
    unit_latencies(tiny_spec, table)  # new units: measured in context, adds an overhead sample
    entry = table.get(f"{ctx}||overhead")
    assert entry["ms"] == fitted and len(entry["samples"]) == 2


# ---- a calibration that measures its own noise ---------------------------------------------------

# A small space whose networks take about a millisecond per pass at 28x28: long enough that a busy
# machine preempts many of its timed runs.
BUSY_SPACE = """
name: noisy_space
data: {dataset: mnist5k}
space:
  stem: {channels: [16, 24]}
  stages:
    - {mixer: conv, depth: [1, 2], channels: 16, downsample: none}
    - {mixer: [conv, window], depth: 1, channels: [24, 32], downsample: conv}
  mixer_options:
    window: {window: [7], heads: [2]}
latency: {device: cpu, batch_size: 1, threads: 1, clock: wall}
"""


@pytest.fixture
def busy_space(tmp_path):
    from hybridnas.search_space import Experiment

    path = tmp_path / "noisy_space.yaml"
    path.write_text(BUSY_SPACE)
    exp = Experiment.from_yaml(path)
    return exp, LatencyContext.from_config(exp.latency), str(tmp_path / "cache" / "latency.json")


def test_a_calibration_under_real_load_is_not_marked_calibrated_and_says_so(busy_space):
    # Four busy processes on this machine's cores (two on CI), bounded in time and ended here; the
    # wall clock, which waits for a core whenever they hold it.
    exp, ctx, path = busy_space
    with busy_load(2 * (os.cpu_count() or 2), 300):
        cal = calibrate_latency(exp.space, exp.input, ctx, path, name=exp.name)
    assert cal["quality"]["calibrated"] is False and cal["quality"]["noisy"] > 0
    record = LatencyTable(path).get(space_marker(exp.space, exp.input, ctx))
    assert record["name"] == "noisy_space" and record["quality"]["calibrated"] is False
    line = calibration_warning(cal["quality"], ctx)
    assert line.startswith("latency table NOT calibrated") and "load average" in line
    assert "clock: cpu" in line and "measured again" in line and "\n" not in line


def test_a_good_calibration_is_marked_calibrated_and_not_repeated(busy_space):
    exp, ctx, path = busy_space
    cal = calibrate_latency(exp.space, exp.input, ctx, path, name=exp.name, limits=ANY_MACHINE)
    assert cal["quality"]["calibrated"] is True and cal["quality"]["noisy"] == 0
    assert cal["quality"]["noise"] is not None and cal["quality"]["timings"] >= 2  # it measured its noise
    assert calibration_warning(cal["quality"], ctx) is None
    assert LatencyTable(path).get(space_marker(exp.space, exp.input, ctx))["quality"]["calibrated"] is True
    again = calibrate_latency(exp.space, exp.input, ctx, path, name=exp.name, limits=ANY_MACHINE)
    assert again["measured"] == 0 and again["timed"] == 0 and again["quality"]["calibrated"] is True


def test_a_rerun_after_a_noisy_calibration_measures_the_noisy_entries_again(busy_space):
    exp, ctx, path = busy_space
    # Limits no machine meets: every entry is stored as noisy, and the space is not calibrated.
    noisy = calibrate_latency(exp.space, exp.input, ctx, path, limits=NoiseLimits(noise=-1.0, refit=0.0))
    assert noisy["quality"]["calibrated"] is False
    table = LatencyTable(path)
    prefix = ctx.key() + "||"
    assert all(table.get(k)["noisy"] is True for k, _ in table.items() if k.startswith(prefix + "block|"))
    rerun = calibrate_latency(exp.space, exp.input, ctx, path, limits=ANY_MACHINE)
    assert rerun["measured"] == noisy["measured"] == rerun["units"]  # every noisy unit measured again
    assert rerun["timed"] == noisy["timed"] > 0  # and every noisy end-to-end time
    assert rerun["quality"]["calibrated"] is True and rerun["quality"]["noisy"] == 0


def test_only_the_noisy_entries_are_measured_again(tiny_spec, tmp_path):
    specs = [tiny_spec.replace_path("stem.channels", c) for c in (4, 8, 12)]
    table = LatencyTable(tmp_path / "latency.json")
    calibrate_table(specs, table, end_to_end=3, limits=ANY_MACHINE)
    ctx = LatencyContext()
    stem8 = next(u.key for u in spec_units(specs[1]) if u.module == "stem")
    table.put(f"{ctx.key()}||{stem8}", {**table.get(f"{ctx.key()}||{stem8}"), "noisy": True})
    before = {k: dict(e) for k, e in table.items()}
    again = calibrate_table(specs, table, end_to_end=3, limits=ANY_MACHINE)
    assert again["measured"] == 1 and again["timed"] == 0
    changed = {k for k, e in table.items() if e.get("at") != before[k].get("at")}
    assert f"{ctx.key()}||{stem8}" in changed and table.get(f"{ctx.key()}||{stem8}")["noisy"] is False
    assert not {k for k in changed if "||block|" in k or "||arch|" in k}  # the rest was trusted


def test_refit_leaves_out_end_to_end_times_taken_while_the_machine_was_noisy(tmp_path):
    table, ctx, *_ = _synthetic_context_table(tmp_path, MIN_FIT_ARCHS + 2)
    for i in range(3):
        key = f"{ctx}||arch|a{i}"
        table.put(key, {**table.get(key), "noisy": True})
    assert fit_table(table) == {"archs": MIN_FIT_ARCHS - 1}  # 3 of 12 left out: too few to refit


def _reference_with(timings):
    from hybridnas.runners.calibration import _Reference

    ref = object.__new__(_Reference)  # the timings only: no network is built or timed
    ref.timings = [{"median_ms": m, "p90_ms": p} for m, p in timings]
    ref.windows = []
    return ref


@pytest.mark.parametrize(
    ("timings", "calibrated", "says"),
    [
        # a quiet machine: medians within a few percent, tails of 15-30 % (ordinary jitter)
        ([(1.00, 1.20), (1.02, 1.25), (0.99, 1.30), (1.01, 1.18)], True, None),
        # the medians drift: preemption moved whole timings
        ([(1.00, 1.10), (1.40, 1.50), (1.02, 1.10), (1.50, 1.60)], False, "varied by"),
        # steady medians, but the slow runs take twice the median: the tail gives the load away
        ([(1.00, 2.00), (1.00, 2.10), (1.01, 1.95), (1.00, 2.20)], False, "slowest runs"),
    ],
)
def test_drift_and_slow_tail_each_decide_against_their_own_limit(timings, calibrated, says):
    from hybridnas.runners.calibration import calibration_quality

    ctx = LatencyContext(clock="wall")
    q = calibration_quality(_reference_with(timings), {}, 0, 0.5, ctx, NoiseLimits())
    assert q["calibrated"] is calibrated
    assert 0 <= q["noise"] and 0 <= q["tail"]
    line = calibration_warning(q, ctx)
    assert (line is None) if says is None else (says in line and "\n" not in line)
