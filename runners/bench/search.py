"""`hybridnas bench search [--trials N] [--epochs N] [--quick]`: how much of a search is orchestration?

Runs a real search (`runners.search.run_search`: Ray Tune + Optuna + MLflow, fresh Ray in this
process, a temporary SQLite store) of the quickstart as it is (space, data, epochs, batch size,
trials; ``--trials``/``--epochs`` change them), concurrency 2, and splits its wall time:

    overhead = (wall - sum(train_time_s of all trials) / concurrency) / wall

``train_time_s`` is what each trial's own training loop measured (`runners.train.train_model`), so
everything else counts as overhead: Ray start-up, MLflow writes, the searcher, worker start-up and
imports, data loading in the workers, the end-of-search latency measurement, plots and export.
A perfectly orchestrated search would keep both cores training all the time (overhead 0). Also
reported: the time from the start of `run_search` to the first trial's training function starting,
and the same split for the Tune loop alone. ``--quick`` uses a 1,000-image subset, 4 trials and
one epoch (short trials: the fixed costs weigh more). Targets: overhead < 10 % at concurrency 2
with the quickstart's trial length, first trial within 15 s.

Two one-time costs are paid before the clock starts, as a user pays them once per machine and
not once per search, and are printed apart: creating a new SQLite store (MLflow's schema
migrations) and calibrating the latency table for the space (cached on disk; the first search
after installing, or after a block's code changed, pays it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from runners.bench import quickstart_path

CONCURRENCY = 2


def main(args: argparse.Namespace) -> int:
    from runners.search import apply_overrides, calibrate_latency, run_search
    from search_space.experiment import Experiment

    quick = bool(getattr(args, "quick", False))
    given = getattr(args, "experiment", None)
    exp = Experiment.from_yaml(
        Path(given) if given else quickstart_path("run from the repository root or pass --experiment FILE")
    )
    trials = getattr(args, "trials", None) or (4 if quick else exp.search.trials)
    epochs = getattr(args, "epochs", None) or (1 if quick else None)
    exp = apply_overrides(exp, trials=trials, epochs=epochs)
    exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, concurrency=CONCURRENCY))
    if quick:
        exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, samples=1000))
    with tempfile.TemporaryDirectory(prefix="hybridnas-bench-search-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        # Create the store first: a new SQLite store runs MLflow's schema migrations (seconds), a
        # one-time cost a user pays once per mlflow.db, not per search.
        from runners.tracking import make_client

        t0 = time.perf_counter()
        make_client(uri).search_experiments()
        store_s = time.perf_counter() - t0
        cal = calibrate_latency(exp.space, exp.input, exp.latency, seed=exp.search.seed)
        res = run_search(exp, tracking_uri=uri, out_dir=os.path.join(tmp, "out"), progress=False)
    rows = [t for t in res.trials if t.get("status")]
    train = sum(float(t.get("train_time_s") or 0.0) for t in rows)
    trained = [t for t in rows if t["status"] != "infeasible"]
    wall, tune_s = res.wall_s, res.timings.get("tune_s", float("nan"))
    ideal = train / CONCURRENCY
    overhead = (wall - ideal) / wall
    loop_overhead = (tune_s - ideal) / tune_s
    in_trial = [
        float(t["time_total_s"]) - float(t.get("train_time_s") or 0.0)
        for t in trained
        if t.get("time_total_s")
    ]
    epochs = exp.train.epochs
    print(
        f"bench search: {exp.name} on {exp.data.dataset}"
        f"{' (1,000 images)' if quick else ''}, {len(rows)} trials x {epochs} epoch{'s' * (epochs > 1)}, "
        f"batch {exp.train.batch_size}, sampler {exp.search.sampler}, concurrency {CONCURRENCY}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"one-time, before the clock: new SQLite store {store_s:.1f} s; latency table for the space "
        f"{cal['seconds']:.1f} s ({cal['measured']} of {cal['units']} units measured, {cal['timed']} "
        "architectures timed end to end; 0 = cached from an earlier run)"
    )
    print(f"{'phase':<34}{'seconds':>9}")
    t = res.timings
    for label, key in (
        ("MLflow setup (parent run)", "mlflow_s"),
        ("latency table", "latency_table_s"),
        ("ray.init", "ray_init_s"),
        ("Tune loop (all trials)", "tune_s"),
        ("finish (front latency, plots, export)", "finish_s"),
    ):
        print(f"  {label:<32}{t.get(key, float('nan')):>9.1f}")
    print(f"  {'wall':<32}{wall:>9.1f}")
    counts = ", ".join(f"{n} {s}" for s, n in res.counts.items() if n)
    per = train / max(1, len(trained))
    print(
        f"trials: {len(rows)} ({counts}); training time {train:.1f} s in all, {per:.1f} s per trained trial"
    )
    if in_trial:
        print(
            f"inside trials, outside training (data, model build, reporting): "
            f"{sum(in_trial) / len(in_trial):.2f} s per trial on average (first ones include worker imports)"
        )
    print(
        f"orchestration overhead = (wall - sum(train_time_s)/{CONCURRENCY}) / wall = {100 * overhead:.1f}%   [target < 10%]"
    )
    print(f"  Tune loop alone: (tune - sum(train_time_s)/{CONCURRENCY}) / tune = {100 * loop_overhead:.1f}%")
    fixed = res.first_trial_s or 0.0
    print(
        f"  fixed costs: start to first trial {fixed:.1f} s + finish {t.get('finish_s', 0.0):.1f} s; the rest is "
        "the tail (one slot idle while the last trial runs) and per-trial gaps"
    )
    if res.first_trial_s is not None:
        print(f"first trial started {res.first_trial_s:.1f} s after the search started   [target < 15 s]")
    return 0
