"""The fidelity report: Kendall's tau between rungs and between one seed and the seed mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from hybridnas.runners.fidelity import (
    Fidelity,
    describe,
    kendall_tau,
    metrics,
    rung_fidelities,
    seed_fidelity,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=30))
def test_tau_is_scipys_tau_b_and_stays_in_minus_one_to_one(pairs):
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    tau = kendall_tau(x, y)
    expected = stats.kendalltau(x, y).statistic
    assert (math.isnan(tau) and math.isnan(expected)) or tau == pytest.approx(expected)
    assert math.isnan(tau) or -1 - 1e-12 <= tau <= 1 + 1e-12


def test_rung_fidelities_pair_successive_rungs_over_the_trials_that_reached_both():
    curves = {
        "a": {1: 0.5, 3: 0.8, 9: 0.95},
        "b": {1: 0.4, 3: 0.7, 9: 0.93},
        "c": {1: 0.3, 3: 0.75, 9: 0.94},
        "d": {1: 0.2, 3: 0.6},  # stopped at rung 2
        "e": {1: 0.1},  # stopped at rung 1
    }
    f = rung_fidelities(curves, rungs=[1, 3], epochs=9)
    assert [(x.name, x.n) for x in f] == [
        ("fidelity_tau_epoch1_epoch3", 4),
        ("fidelity_tau_epoch3_epoch9", 3),
    ]
    assert f[0].tau == pytest.approx(stats.kendalltau([0.5, 0.4, 0.3, 0.2], [0.8, 0.7, 0.75, 0.6]).statistic)
    assert f[1].tau == pytest.approx(1.0)
    # Fewer than three trials at both ends: no number, rather than a meaningless one.
    assert rung_fidelities({"a": {1: 0.1, 3: 0.2}, "b": {1: 0.3, 3: 0.1}}, [1], 3) == []


def test_seed_fidelity_and_metrics_stay_in_range_and_count_the_trials():
    rng = np.random.default_rng(0)
    means = rng.random(6)
    single = means + rng.normal(0, 0.3, 6)
    f = seed_fidelity(list(single), list(means))
    assert f is not None and -1 <= f.tau <= 1 and f.n == 6
    m = metrics([f])
    assert m == {"fidelity_tau_seed_mean": f.tau, "fidelity_n_seed_mean": 6.0}
    assert seed_fidelity([0.9, 0.8], [0.9, 0.8]) is None  # two members: too few


def test_the_printout_says_how_many_pairs_are_wrong_and_warns_with_a_suggestion_when_noisy():
    good = Fidelity("fidelity_tau_epoch3_epoch9", "epoch 3", "epoch 9", 0.8, 10)
    bad = Fidelity("fidelity_tau_epoch1_epoch3", "epoch 1", "epoch 3", 0.2, 20)
    seeds = Fidelity("fidelity_tau_seed_mean", "one seed", "the seed mean", 0.1, 5)
    lines = describe([bad, good, seeds], min_epochs=1, repeats=2)
    assert (
        lines[0]
        == "epoch 1 -> epoch 3: tau 0.20 over 20 trials; the epoch 1 orders about 1 pair in 2 wrongly"
    )
    assert "warning" in lines[1] and "raise search.min_epochs (now 1)" in lines[1]
    assert lines[2].startswith("epoch 3 -> epoch 9: tau 0.80") and "1 pair in 10" in lines[2]
    assert "warning" not in lines[2] and "warning" not in lines[3]
    assert lines[3].startswith("one seed vs the seed mean: tau 0.10 over 5 trials")
    assert "raise search.repeats (now 2)" in lines[4]
    assert Fidelity("x", "epoch 1", "epoch 3", 0.45, 9).wrong_share == pytest.approx(0.275)
    assert "1 pair in 4" in describe([Fidelity("x", "epoch 1", "epoch 3", 0.45, 9)])[0]
