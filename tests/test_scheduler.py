"""moasha's promotion rule on its own (properties over generated arrivals), and the Ray Tune
schedulers that drive it and Ray's ASHA, with their state kept across a pickle (a restored Tuner)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from hybridnas.runners.scheduler import (
    CONTINUE,
    PROMOTE,
    STOP,
    MOASHAScheduler,
    PersistentASHAScheduler,
    PromotionRule,
    crowding_distance,
    make_scheduler,
    rungs_for,
)

OBJ2 = [("val_acc", "max"), ("macs", "min")]
OBJ3 = [("val_acc", "max"), ("macs", "min"), ("latency_ms", "min")]


def dominates(a, b, modes) -> bool:
    s = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    x, y = np.asarray(a) * s, np.asarray(b) * s
    return bool((x <= y).all() and (x < y).any())


def arrive(rule: PromotionRule, vectors, rung: int = 1, prefix: str = "t") -> list[str]:
    names = [m for m, _ in rule.objectives]
    return [rule.decide(f"{prefix}{i}", rung, dict(zip(names, v))) for i, v in enumerate(vectors)]


# Small integer grids: many exact ties and many dominance relations.
vectors3 = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(vectors3, st.integers(2, 4))
def test_a_trial_dominated_at_a_rung_by_a_stopped_trial_is_never_promoted(vectors, eta):
    # Decisions are taken on arrival and final: "stopped" means stopped before the trial arrived.
    rule = PromotionRule(OBJ3, [1], eta)
    decisions = arrive(rule, vectors)
    modes = [m for _, m in OBJ3]
    for j, dj in enumerate(decisions):
        for i in range(j):
            if decisions[i] == STOP and dj == PROMOTE:
                assert not dominates(vectors[i], vectors[j], modes), (i, j, vectors[i], vectors[j])


@settings(max_examples=60, deadline=None)
@given(vectors3, st.integers(2, 4))
def test_a_trial_promoted_on_arrival_was_in_the_best_ceil_n_over_eta(vectors, eta):
    rule = PromotionRule(OBJ3, [1], eta)
    names = [m for m, _ in OBJ3]
    for i, v in enumerate(vectors):
        d = rule.decide(f"t{i}", 1, dict(zip(names, v)))
        order = rule.ranking(1)
        if d == PROMOTE:
            assert order.index(f"t{i}") < math.ceil(len(order) / eta)
    assert arrive(PromotionRule(OBJ3, [1], eta), vectors[:1]) == [PROMOTE]  # the first always goes on


@pytest.mark.parametrize("eta", [2, 3, 4])
@pytest.mark.parametrize("objectives", [OBJ2, OBJ3], ids=["2obj", "3obj"])
def test_about_one_in_eta_goes_on_when_trials_arrive_in_random_order(eta, objectives):
    fractions = []
    for seed in range(6):
        points = np.random.default_rng(seed).random((150, len(objectives)))
        decisions = arrive(PromotionRule(objectives, [1], eta), points)
        fractions.append(decisions.count(PROMOTE) / len(decisions))
    # Deciding on arrival favours early trials a little, and a trial dominated by a stopped one is
    # stopped: measured 0.46 for eta 2, 0.255 for eta 4 over such runs.
    assert 1 / eta - 0.08 <= np.mean(fractions) <= 1 / eta + 0.05, fractions


@pytest.mark.parametrize("eta", [2, 3])
def test_exact_ties_still_let_about_one_in_eta_go_on(eta):
    decisions = arrive(PromotionRule(OBJ2, [1], eta), [(0.9, 1e6)] * 240)
    assert 1 / eta - 0.08 <= decisions.count(PROMOTE) / len(decisions) <= 1 / eta + 0.08


@settings(max_examples=40, deadline=None)
@given(vectors3, st.integers(2, 4), st.data())
def test_trials_without_finite_values_are_stopped_and_change_no_other_decision(vectors, eta, data):
    plain = arrive(PromotionRule(OBJ3, [1], eta), vectors)
    rule = PromotionRule(OBJ3, [1], eta)
    bad_at = set(data.draw(st.lists(st.integers(0, len(vectors)), max_size=5)))
    mixed = []
    for i, v in enumerate(vectors):
        if i in bad_at:
            assert rule.decide(f"bad{i}", 1, {"val_acc": math.nan, "macs": 1, "latency_ms": 1}) == STOP
            assert rule.decide(f"gone{i}", 1, {"macs": 1}) == STOP  # a missing metric
        mixed.append(rule.decide(f"t{i}", 1, dict(zip(["val_acc", "macs", "latency_ms"], v))))
    assert mixed == plain
    assert len(rule.ranking(1)) == len(vectors)  # the non-finite ones take no place


@settings(max_examples=40, deadline=None)
@given(vectors3, st.integers(2, 4), st.integers(0, 40))
def test_decisions_are_deterministic_and_survive_a_json_round_trip_of_the_state(vectors, eta, cut):
    once = arrive(PromotionRule(OBJ3, [1, 3], eta), vectors)
    assert arrive(PromotionRule(OBJ3, [1, 3], eta), vectors) == once
    rule = PromotionRule(OBJ3, [1, 3], eta)
    first = arrive(rule, vectors[:cut])
    rule = PromotionRule.from_state(json.loads(json.dumps(rule.to_state())))
    names = ["val_acc", "macs", "latency_ms"]
    rest = [rule.decide(f"t{i}", 1, dict(zip(names, v))) for i, v in enumerate(vectors) if i >= cut]
    assert first + rest == once
    # A result for a rung already decided gets the same answer, whatever it says now.
    for i, d in enumerate(once):
        assert rule.decide(f"t{i}", 1, {"val_acc": 1.0, "macs": 0, "latency_ms": 0}) == d


def test_a_stopped_trial_stays_stopped_and_a_promoted_one_continues_between_rungs():
    rule = PromotionRule.for_budget(OBJ2, min_epochs=1, max_epochs=9, eta=3)
    assert rule.rungs == (1, 3)
    assert rule.decide("a", 1, {"val_acc": 0.8, "macs": 1.0}) == PROMOTE
    assert rule.decide("b", 1, {"val_acc": 0.7, "macs": 2.0}) == STOP
    assert rule.decide("b", 2, {"val_acc": 0.99, "macs": 0.0}) == STOP
    assert rule.decide("a", 2, {"val_acc": 0.85, "macs": 1.0}) == CONTINUE
    assert rule.decide("a", 3, {"val_acc": 0.9, "macs": 1.0}) == PROMOTE  # first at rung 3
    assert rule.decide("a", 9, {"val_acc": 0.95, "macs": 1.0}) == CONTINUE  # the full budget is no rung
    assert rule.reached() == {1: 2, 3: 1} and rule.promoted() == {1: 1, 3: 1}
    assert (rule.highest_rung("a"), rule.highest_rung("b"), rule.highest_rung("c")) == (3, 1, None)
    assert (rule.stopped_at("a"), rule.stopped_at("b")) == (None, 1)


def test_a_skipped_report_is_decided_at_the_highest_rung_reached():
    rule = PromotionRule(OBJ2, [1, 3], 3)
    assert rule.decide("a", 4, {"val_acc": 0.9, "macs": 1.0}) == PROMOTE  # no report at 1 or 3
    assert rule.highest_rung("a") == 3 and "a" not in rule.records[1]


def test_the_rung_ranking_is_fronts_first_then_the_more_isolated_point():
    rule = PromotionRule(OBJ2, [1], 2)
    # Front 0: a, b, c (c in the middle, least isolated); front 1: d (dominated by b).
    for name, acc, macs in (("a", 0.9, 3.0), ("c", 0.8, 2.0), ("b", 0.7, 1.0), ("d", 0.6, 1.5)):
        rule.decide(name, 1, {"val_acc": acc, "macs": macs})
    order = rule.ranking(1)
    assert order[-1] == "d" and order[2] == "c" and set(order[:2]) == {"a", "b"}


def test_rungs_grow_geometrically_below_the_full_budget():
    assert rungs_for(1, 9, 3) == (1, 3)
    assert rungs_for(1, 10, 3) == (1, 3, 9)
    assert rungs_for(2, 16, 2) == (2, 4, 8)
    with pytest.raises(ValueError):
        rungs_for(1, 9, 1)


def test_crowding_distance_gives_the_ends_infinity_and_ties_equal_values():
    d = crowding_distance([[0, 4], [1, 2], [1, 2], [3, 1], [4, 0]], ["min", "min"])
    assert np.isinf(d[0]) and np.isinf(d[4])
    # Gaps over the range 4 of each objective: [1, 2]: 3/4 + 3/4; [3, 1]: 3/4 + 2/4.
    assert d[1] == d[2] == 1.5 and d[3] == 1.25
    assert np.isnan(crowding_distance([[np.nan, 1.0], [1.0, 2.0]], ["min", "min"])[0])


# ---- Ray Tune schedulers ----------------------------------------------------------------------------


def trials(n: int) -> list[Trial]:
    return [Trial("__fake", stub=True, trial_id=f"trial{i}") for i in range(n)]


def result(epoch: int, acc: float, macs: float, status: str = "running") -> dict:
    return {"epoch": epoch, "val_acc": acc, "macs": macs, "latency_ms": 1.0, "status": status}


def test_moasha_scheduler_stops_rejected_trials_and_keeps_its_state_across_a_restored_tuner(tmp_path):
    state = tmp_path / "scheduler.json"
    sched = make_scheduler("moasha", OBJ2, epochs=9, min_epochs=1, eta=3, state_path=state)
    assert isinstance(sched, MOASHAScheduler) and sched.rule.rungs == (1, 3)
    pickled = pickle.dumps(sched)  # what Tuner keeps: the scheduler as it was at the start
    t = trials(4)
    for tr in t:
        sched.on_trial_add(None, tr)
    assert sched.on_trial_result(None, t[0], result(1, 0.8, 1e6)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, t[1], result(1, 0.7, 2e6)) == TrialScheduler.STOP
    assert sched.on_trial_result(None, t[0], result(2, 0.85, 1e6)) == TrialScheduler.CONTINUE
    # Final, infeasible and replayed results pass through untouched.
    assert sched.on_trial_result(None, t[2], {"status": "infeasible", "macs": 9e9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, t[2], result(1, 0.1, 9e9, status="ok")) == TrialScheduler.CONTINUE
    assert sched.rule.reached() == {1: 2, 3: 0}
    assert "epoch 1: 1/2 on" in sched.debug_string()

    restored = pickle.loads(pickled)
    for tr in t:
        restored.on_trial_add(None, tr)
    assert restored.rule.reached() == {1: 2, 3: 0}  # read back from the state file
    # A trial that was stopped is stopped again when its rerun reaches the rung (no second decision).
    assert restored.on_trial_result(None, t[1], result(1, 0.99, 1.0)) == TrialScheduler.STOP
    assert restored.on_trial_result(None, t[3], result(1, 0.6, 3e6)) == TrialScheduler.STOP
    assert restored.rule.reached() == {1: 3, 3: 0}


def test_a_broken_state_file_starts_the_rungs_empty(tmp_path):
    state = tmp_path / "scheduler.json"
    state.write_text("{not json")
    sched = make_scheduler("moasha", OBJ2, epochs=4, state_path=state)
    sched.on_trial_add(None, trials(1)[0])
    assert sched.rule.reached() == {1: 0, 3: 0}


def test_asha_is_rays_on_the_first_objective_and_keeps_its_state_too(tmp_path):
    state = tmp_path / "asha.pkl"
    sched = make_scheduler("asha", OBJ2, epochs=9, min_epochs=1, eta=3, state_path=state)
    assert isinstance(sched, PersistentASHAScheduler) and sched.metric == "val_acc"
    pickled = pickle.dumps(sched)
    t = trials(3)
    for tr in t:
        sched.on_trial_add(None, tr)
    assert sched.on_trial_result(None, t[0], result(1, 0.9, 9e9)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, t[1], result(1, 0.5, 1.0)) == TrialScheduler.STOP  # macs ignored
    # The full budget: the trial finishes itself (its final report carries the final metrics).
    assert sched.on_trial_result(None, t[0], result(9, 0.1, 9e9)) == TrialScheduler.CONTINUE
    restored = pickle.loads(pickled)
    for tr in t:
        restored.on_trial_add(None, tr)
    # The cutoff at epoch 1 remembers both earlier trials: 0.6 is below it.
    assert restored.on_trial_result(None, t[2], result(1, 0.6, 1.0)) == TrialScheduler.STOP


def test_fifo_is_rays_fifo():
    assert type(make_scheduler("fifo", OBJ2, epochs=4)) is FIFOScheduler


def test_a_lost_trial_asked_again_under_a_new_id_meets_its_architectures_decisions(tmp_path):
    # A driver killed between Ray's snapshots loses a running trial; the resumed search asks for
    # the same architecture again as a new Tune trial. The rung keeps one record per architecture.
    sched = make_scheduler("moasha", OBJ2, epochs=9, min_epochs=1, eta=3, state_path=tmp_path / "s.json")
    first, other, again = (
        Trial("__fake", stub=True, trial_id=tid, config={"arch_hash": h})
        for tid, h in (("t0", "arch-a"), ("t1", "arch-b"), ("t9", "arch-b"))
    )
    for tr in (first, other, again):
        sched.on_trial_add(None, tr)
    assert sched.on_trial_result(None, first, result(1, 0.9, 1e6)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, other, result(1, 0.5, 2e6)) == TrialScheduler.STOP
    # its rerun reaches the rung with a better value: the decision stands, no second record
    assert sched.on_trial_result(None, again, result(1, 0.99, 1.0)) == TrialScheduler.STOP
    assert sched.rule.reached() == {1: 2, 3: 0}
