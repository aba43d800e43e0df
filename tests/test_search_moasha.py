"""`scheduler: moasha` and `repeats` end to end: Ray Tune + Optuna + MLflow on tiny synthetic data.

One moasha search with repeats is shared by most tests; a second one is killed mid-way and resumed.
Everything is read back through `MlflowClient`, as a user (or `hybridnas export`) sees it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from tiny_search import tiny_search_file

from hybridnas.runners.fidelity import MIN_PAIRS
from hybridnas.runners.pareto import non_dominated
from hybridnas.runners.scheduler import PromotionRule
from hybridnas.runners.search import apply_overrides, run_search
from hybridnas.runners.search_trials import SCHEDULER_STATE
from hybridnas.runners.store import child_runs
from hybridnas.search_space.errors import SpecError
from hybridnas.search_space.experiment import Experiment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS, RUNGS = 4, (1, 2)  # min_epochs 1, reduction factor 2


def _experiment(tmp: Path, name: str, **search) -> Experiment:
    moasha = {
        "sampler": "nsga2",
        "trials": 10,
        "concurrency": 2,
        "seed": 0,
        "scheduler": "moasha",
        "min_epochs": 1,
        "reduction_factor": 2,
    }
    path = tiny_search_file(
        tmp, name, search={**moasha, **search}, epochs=EPOCHS, objectives=["val_acc", "macs"]
    )
    return Experiment.from_yaml(path)


def _runs(client: MlflowClient, name: str, parent: str, kind: str = "trial") -> list:
    exp = client.get_experiment_by_name(name)
    return [r for r in child_runs(client, exp.experiment_id, parent) if r.data.tags["hybridnas.kind"] == kind]


def _history(client: MlflowClient, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))


@pytest.fixture(scope="module")
def moasha(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moasha")
    exp = _experiment(tmp, "moasha", repeats=1)
    res = run_search(exp, progress=None)
    return exp, res, MlflowClient(res.tracking_uri)


def test_trials_stop_at_rung_boundaries_and_mlflow_records_status_epochs_and_rung(moasha):
    exp, res, client = moasha
    trials = _runs(client, "moasha", res.parent_run_id)
    assert len(trials) == exp.search.trials == sum(res.counts.values())
    statuses = [t.data.tags["hybridnas.status"] for t in trials]
    assert set(statuses) <= {"ok", "stopped"} and "stopped" in statuses and "ok" in statuses
    for t in trials:
        epochs = int(t.data.metrics["epochs_trained"])
        if t.data.tags["hybridnas.status"] == "stopped":
            assert int(t.data.tags["hybridnas.rung"]) == epochs and epochs in RUNGS
            assert t.info.status == "KILLED"  # cut short: neither a success nor a crash
        else:
            assert epochs == EPOCHS and "hybridnas.rung" not in t.data.tags
        assert _history(client, t) == list(range(1, epochs + 1))  # one val_acc per trained epoch
    # The parent counts the trials that trained to each rung and to the end.
    parent = client.get_run(res.parent_run_id).data
    trained = [int(t.data.metrics["epochs_trained"]) for t in trials]
    for e in (*RUNGS, EPOCHS):
        assert parent.metrics[f"trials_at_epoch{e}"] == sum(x >= e for x in trained) == res.reached[e]
    assert parent.params["scheduler"] == "moasha" and parent.params["rungs"] == "1, 2"
    # The scheduler's records agree with MLflow: every trial reached rung 1, the stopped ones stayed.
    rule = PromotionRule.from_state(json.loads((res.out_dir / SCHEDULER_STATE).read_text()))
    assert rule.reached()[1] == len(trials)
    assert sum(rule.reached()[r] - rule.promoted()[r] for r in RUNGS) == statuses.count("stopped")


def test_repeats_are_logged_and_the_front_is_recomputed_on_seed_means(moasha):
    exp, res, client = moasha
    trials = {t.data.tags["hybridnas.trial"]: t for t in _runs(client, "moasha", res.parent_run_id)}
    repeats = _runs(client, "moasha", res.parent_run_id, kind="repeat")
    assert repeats and len(repeats) == res.repeats["members"] * exp.search.repeats
    for r in repeats:
        tags = r.data.tags
        assert tags["hybridnas.status"] == "ok" and tags["hybridnas.seed"] == str(exp.train.seed + 1)
        original = trials[tags["hybridnas.repeat_of"]]
        assert original.data.tags["hybridnas.status"] == "ok"
        assert tags["hybridnas.arch_hash"] == original.data.tags["hybridnas.arch_hash"]
        assert int(r.data.metrics["epochs_trained"]) == EPOCHS
        m = original.data.metrics
        seeds = [m["val_acc"], r.data.metrics["val_acc"]]
        assert m["seeds"] == 2 and m["val_acc_mean"] == pytest.approx(np.mean(seeds))
        assert m["val_acc_sd"] == pytest.approx(np.std(seeds, ddof=1))
    # pareto.csv: val_acc is the seed mean, and the front is the front of the means.
    csv = pd.read_csv(res.out_dir / "pareto" / "pareto.csv")
    for _, row in csv.iterrows():
        m = trials[str(row["trial"])].data.metrics
        assert row["val_acc"] == pytest.approx(m.get("val_acc_mean", m["val_acc"]))
        assert row["seeds"] == m.get("seeds", 1)
    front = non_dominated(csv[["val_acc", "macs"]].to_numpy(), ["max", "min"])
    assert (csv["pareto"].to_numpy() == front).all()
    assert {"val_acc_sd", "indistinct"} <= set(csv.columns)
    # Exported files carry the seed means.
    for f in res.exported:
        exported = yaml.safe_load(f.read_text())
        trial = exported["provenance"]["trial"]
        m = trials[str(trial)].data.metrics
        assert exported["metrics"]["val_acc"] == pytest.approx(m.get("val_acc_mean", m["val_acc"]))


def test_fidelity_metrics_exist_and_lie_between_minus_one_and_one(moasha):
    exp, res, client = moasha
    metrics = client.get_run(res.parent_run_id).data.metrics
    taus = {k: v for k, v in metrics.items() if k.startswith("fidelity_tau_")}
    assert all(-1.0 <= v <= 1.0 for v in taus.values())
    assert all(metrics[k.replace("_tau_", "_n_")] >= MIN_PAIRS for k in taus)
    # A tau, logged and printed, for each pair of successive fidelities that at least MIN_PAIRS
    # trials reached, and none for the others. How many go on from a rung depends on the order the
    # trials arrive in (moasha decides on arrival), so the counts are read, not assumed; the first
    # trial at a rung always goes on.
    assert res.reached[1] == exp.search.trials and res.reached[2] >= 1
    for a, b in ((1, 2), (2, EPOCHS)):
        key, enough = f"fidelity_tau_epoch{a}_epoch{b}", res.reached[b] >= MIN_PAIRS
        printed = [ln for ln in res.fidelity if ln.startswith(f"epoch {a} -> epoch {b}: tau")]
        assert (key in taus) == enough and len(printed) == int(enough)


def test_an_epochs_override_below_the_first_rung_is_refused(tmp_path):
    exp = _experiment(tmp_path, "override")
    with pytest.raises(SpecError, match="search.min_epochs"):
        apply_overrides(exp, epochs=1)


def test_resume_of_an_interrupted_moasha_search_trains_nothing_twice(ray_local, tmp_path, killed_search):
    exp = _experiment(tmp_path, "resumed", trials=6, seed=3)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    before = killed_search(ray_local, exp, tmp_path, 2, statuses=("ok", "stopped"))

    res = run_search(exp, resume=True, progress=None)
    assert not res.interrupted
    trials = _runs(client, "resumed", res.parent_run_id)
    assert len(trials) == 6 and all(t.data.tags["hybridnas.status"] in ("ok", "stopped") for t in trials)
    hashes = [t.data.tags["hybridnas.arch_hash"] for t in trials]
    assert len(set(hashes)) == 6  # no architecture trained twice
    after = {
        t.info.run_id: (t.data.tags["hybridnas.arch_hash"], t.data.tags["hybridnas.status"]) for t in trials
    }
    assert all(after[run_id] == kept for run_id, kept in before.items())  # finished runs kept as they were
    for t in trials:  # no run holds a second training's epochs
        assert _history(client, t) == list(range(1, int(t.data.metrics["epochs_trained"]) + 1))
    # The rungs were not forgotten: the scheduler's records count every trial that reached rung 1.
    rule = PromotionRule.from_state(json.loads((Path(exp.out_dir) / SCHEDULER_STATE).read_text()))
    assert rule.reached()[1] == 6


def test_bench_efficiency_runs_the_search_for_real_with_fifo_and_with_moasha(ray_local, tmp_path):
    from hybridnas.runners.bench.efficiency import real_searches

    exp = _experiment(tmp_path, "real", trials=4)
    lines = real_searches(exp)
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {"fifo", "moasha"}
    fifo_epochs, moasha_epochs = int(rows["fifo"][2]), int(rows["moasha"][2])
    assert fifo_epochs == 4 * EPOCHS and moasha_epochs <= fifo_epochs  # moasha never trains more
    assert lines[-1].startswith("  moasha / fifo: wall")
