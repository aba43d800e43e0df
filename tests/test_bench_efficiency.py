"""`hybridnas bench efficiency`: the replay logic on a small synthetic learning-curve table (no training),
and the table builder on synthetic data."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from optuna.trial import TrialState

from hybridnas.runners.bench.curves import CurveTable, build
from hybridnas.runners.bench.efficiency import (
    Replay,
    Trace,
    full_training_s,
    replay_all,
    report,
    schedule_report,
    trials_for,
)
from hybridnas.search_space import Experiment

EPOCHS = 9
CAP = 44_000
OBJECTIVES = [("val_acc", "max"), ("macs", "min")]
EXPERIMENT = {
    "name": "tiny",
    "data": {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 2, "samples": 64},
    "train": {"epochs": EPOCHS, "batch_size": 16},
    "space": {
        "stem": {"channels": [8, 16]},
        "stages": [{"mixer": "conv", "depth": [1, 2], "channels": [8, 16], "addon": ["none", "gc", "ca"]}],
    },
    "objectives": ["val_acc", "macs"],
    "constraints": {"macs": {"max": CAP}},
    "search": {"sampler": "nsga2", "trials": 12, "concurrency": 2, "scheduler": "moasha"},
}


def synthetic_table(exp) -> CurveTable:
    """Every architecture of the tiny space, with made-up but structured curves: bigger tends to be
    more accurate and costs more (some are dominated); the two seeds differ by a little noise; a
    few are over the MACs cap."""
    rng = np.random.default_rng(0)
    archs = []
    for spec in exp.space.enumerate(exp.input):
        f = spec.flat_params()
        size = f["stem.channels"] / 8 + f["stages.0.depth"] + f["stages.0.channels"] / 8
        bonus = {"none": 0.0, "gc": 0.02, "ca": 0.03}[f["stages.0.addon"]]
        macs = 8_000 * size + 5_000 * (bonus > 0)
        final = 0.6 + 0.04 * size + bonus + rng.uniform(-0.08, 0.08)
        curves = [
            list(np.clip(final * (1 - 0.6 ** np.arange(1, EPOCHS + 1)) + rng.normal(0, 0.01, EPOCHS), 0, 1))
            for _ in range(2)
        ]
        archs.append(
            {
                "arch": spec.to_dict(),
                "hash": spec.arch_hash(),
                "flat": f,
                "measures": {"macs": macs, "flops": 2 * macs, "params": 100 * size, "latency_ms": size},
                "feasible": macs <= CAP,
            }
        )
        if macs <= CAP:
            archs[-1]["acc"] = [[float(a) for a in c] for c in curves]
            archs[-1]["epoch_s"] = [[0.5 + 0.1 * size] * EPOCHS for _ in range(2)]
            # One schedule over the whole budget: less annealed early, the same at the end.
            archs[-1]["acc_plain"] = [
                float(a) for a in np.minimum(curves[0], final * (1 - 0.8 ** np.arange(1, EPOCHS + 1)))
            ]
    return CurveTable(OBJECTIVES, {"macs": {"max": CAP}}, EPOCHS, archs, {"plain": len(archs)})


@pytest.fixture(scope="module")
def exp():
    return Experiment.from_dict(EXPERIMENT)


@pytest.fixture(scope="module")
def table(exp):
    t = synthetic_table(exp)
    assert 0 < len(t.feasible) < len(t.archs)  # some over the cap: they cost nothing
    return t


def make_replay(exp, table, concurrency=2):
    return Replay(table, exp.space, exp.input, concurrency, rungs=(1, 3), eta=3, trials_hint=12)


def test_fifo_with_an_unlimited_budget_reaches_the_true_fronts_hypervolume(exp, table):
    # Random proposals cover the whole space (NSGA-II may settle on its front and stop proposing
    # new architectures, as a real search would).
    trace = make_replay(exp, table).run("random", "fifo", rep=0, budget=math.inf)
    assert trace.hv[-1] == pytest.approx(1.0)
    assert all(e == EPOCHS for _, e in trace.trained)
    assert sorted(i for i, _ in trace.trained) == table.feasible  # each architecture once, no infeasible one
    assert trace.distance == 0  # the table is the whole space: every proposal is in it


def test_hypervolume_never_decreases_as_compute_grows(exp, table):
    trace = make_replay(exp, table).run("nsga2", "moasha", rep=1, budget=math.inf)
    assert np.all(np.diff(trace.compute) > 0) and np.all(np.diff(trace.hv) >= -1e-12)
    assert 0 <= trace.hv[-1] <= 1 + 1e-9


@pytest.mark.parametrize("rep", [0, 1, 2])
def test_moasha_never_spends_more_than_fifo_on_the_same_proposals(exp, table, rep):
    # The random sampler proposes the same architectures in the same order whatever it is told.
    r = make_replay(exp, table)
    fifo = r.run("random", "fifo", rep=rep, budget=math.inf)
    moasha = r.run("random", "moasha", rep=rep, budget=math.inf)
    assert [i for i, _ in moasha.trained] == [i for i, _ in fifo.trained]
    assert all(e in (1, 3, EPOCHS) for _, e in moasha.trained)  # stopped at a rung or trained to the end
    assert moasha.epochs < fifo.epochs
    assert moasha.compute[-1] <= fifo.compute[-1]
    assert any(e < EPOCHS for _, e in moasha.trained)


def test_replays_are_deterministic_given_the_repetition(exp, table):
    r = make_replay(exp, table)
    a, b = r.run("nsga2", "moasha", rep=3, budget=50.0), r.run("nsga2", "moasha", rep=3, budget=50.0)
    assert (a.compute, a.hv, a.trained, a.proposals) == (b.compute, b.hv, b.trained, b.proposals)
    c = r.run("nsga2", "moasha", rep=4, budget=50.0)
    assert (c.trained, c.hv) != (a.trained, a.hv)


def test_stopped_trials_are_told_their_rung_values_and_nsga2_keeps_breeding(exp, table):
    trace = make_replay(exp, table).run("nsga2", "moasha", rep=0, budget=math.inf)
    study = trace.study
    stopped = [t for t in study.trials if "rung" in t.user_attrs]
    assert stopped and all(t.state == TrialState.COMPLETE for t in stopped)
    for t in stopped:
        assert t.user_attrs["rung"] in (1, 3) and 0 < t.values[0] < 1
    # Stopped trials count towards NSGA-II's generations, so it leaves its random first one.
    generations = [study.sampler.get_trial_generation(study, t) for t in study.trials]
    assert max(generations) >= 1


def test_a_budget_stops_the_replay_and_only_full_trainings_count(exp, table):
    r = make_replay(exp, table)
    unit = full_training_s(table)
    trace = r.run("random", "fifo", rep=0, budget=2 * unit)
    assert len(trace.compute) <= 3 and trace.compute[-1] < 4 * unit
    assert trace.hv_at(0.0) == 0.0 and trace.hv_at(trace.compute[0]) == trace.hv[0]


def test_trace_reports_when_a_target_is_first_reached():
    t = Trace("x", compute=[10.0, 20.0, 30.0], hv=[0.2, 0.5, 0.9])
    assert (t.compute_to(0.5), t.compute_to(0.95), t.hv_at(25.0), t.hv_at(5.0)) == (20.0, math.inf, 0.5, 0.0)


def test_report_names_every_strategy_and_the_compute_ratios(exp, table):
    r = make_replay(exp, table)
    unit = full_training_s(table)
    traces = replay_all(r, reps=3, budget=6 * unit)
    text, ratios = report(traces, 6 * unit, unit)
    for name in ("random+fifo", "nsga2+fifo", "random+moasha", "nsga2+moasha"):
        assert name in text
    assert set(ratios) == {"nsga2+fifo", "random+fifo"}
    assert all(r > 0 for r in ratios.values())


def test_table_json_round_trips_and_true_points_are_seed_means(table):
    again = CurveTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again == table
    pts = table.true_points()
    i = table.feasible[0]
    assert pts[i, 0] == pytest.approx(np.mean([c[-1] for c in table.archs[i]["acc"]]))
    assert np.isnan(pts[[j for j in range(len(table.archs)) if j not in table.feasible][0]]).all()


def test_build_trains_each_feasible_architecture_twice_and_continues_a_partial_table(tmp_path):
    small = Experiment.from_dict(
        {**EXPERIMENT, "train": {"epochs": 2, "batch_size": 16}, "constraints": {"macs": {"max": 1e9}}}
    )

    def measure(spec):  # what a search computes, minus the latency table
        from hybridnas.runners.macs import profile_spec

        p = profile_spec(spec)
        return {"macs": p["macs"], "flops": p["flops"], "params": p["params"], "latency_ms": 1.0}

    path = tmp_path / "table.json"
    table, where = build(small, 2, seed=0, workers=1, path=path, measure=measure, stream=io.StringIO())
    assert where == path and len(table.feasible) == 2
    for i in table.feasible:
        a = table.archs[i]
        assert len(a["acc"]) == 2 and all(len(c) == 2 for c in a["acc"]) and a["epoch_s"][0][0] > 0
    # Drop one seed: a second build trains that one only and keeps the rest.
    d = json.loads(path.read_text())
    first = d["archs"][table.feasible[0]]
    kept = first["acc"][0]
    first["acc"], first["epoch_s"] = first["acc"][:1], first["epoch_s"][:1]
    path.write_text(json.dumps(d))
    log = io.StringIO()
    again, _ = build(small, 2, seed=0, workers=1, path=path, measure=measure, stream=log)
    redone = again.archs[table.feasible[0]]["acc"]
    assert redone[0] == kept and len(redone) == 2
    assert "] 1/1 trainings" in log.getvalue()  # only the missing seed was trained


def test_the_sampler_is_set_up_for_the_trials_that_fit_the_budget(table):
    hints = trials_for(table, budget_trainings=10, rungs=(1, 3), eta=3)
    feasible = len(table.feasible) / len(table.archs)
    assert hints["fifo"] == round(10 / feasible)
    # moasha trains 1 + 2/3 + 6/9 epochs per trial on average, not 9: about 3.9x the trials.
    assert hints["moasha"] == round(hints["fifo"] * 9 / (1 + 2 / 3 + 6 / 9))


def test_schedule_report_compares_the_two_schedules_at_each_rung(table):
    lines = schedule_report(table, (1, 3))
    assert lines[0].startswith(f"learning rate at the rungs ({len(table.feasible)} architectures")
    assert lines[1].startswith("  epoch 1: annealed at each rung") and lines[2].startswith("  epoch 3:")
    assert "two seeds differ by" in lines[3]
    assert schedule_report(table, ()) == []
