"""`hybridnas bench search [--trials N] [--epochs N] [--quick]`: how much of a search is orchestration?

Runs real searches (`runners.search.run_search`: Ray Tune + Optuna + MLflow, a fresh Ray in this
process each, a temporary SQLite store) of the quickstart's space, data and training recipe (so its
trial length), concurrency 2, and splits each one's wall time:

    overhead = (wall - sum(train_time_s of all trials) / concurrency) / wall

``train_time_s`` is what each trial's own training loop measured (`runners.train.train_model`), so
everything else counts as overhead: Ray start-up, MLflow writes, the searcher, worker start-up and
imports, data loading in the workers, the end-of-search latency measurement, plots and export.
A perfectly orchestrated search would keep both cores training all the time (overhead 0). Also
reported: the time from the start of `run_search` to the first trial's training function starting,
and the same split for the Tune loop alone.

By default two searches run one after the other: the quickstart as it is (16 trials) and one of
three times as many trials of the same length (48). A search pays a fixed part once (Ray's start,
the trial workers' imports, the end) and a small part per trial; the two sizes show both, and the
target (overhead < 10 % at concurrency 2 with the quickstart's trial length; first trial within
15 s) is checked on each. ``--trials N`` runs one search of N trials; ``--epochs`` changes the trial
length; ``--quick`` uses a 1,000-image subset, 4 trials and one epoch (short trials: the fixed
costs weigh more).

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
from typing import Any

from hybridnas.runners.bench import quickstart_path
from hybridnas.runners.machine import machine_line

CONCURRENCY = 2
LONGER = 3  # the second default search: this many times the quickstart's trials
TARGET_OVERHEAD, TARGET_FIRST_S = 0.10, 15.0


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run_one(exp: Any, quick: bool) -> dict:
    """One timed search of ``exp`` (concurrency 2, temporary store); prints its split, returns it."""
    from hybridnas.runners.calibration import calibrate_latency
    from hybridnas.runners.latency import LatencyContext
    from hybridnas.runners.search import run_search
    from hybridnas.runners.store import make_client

    # No repeats: their trainings run in a second Tuner whose trials `res.trials` does not list, so
    # their training time would count as overhead.
    exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, concurrency=CONCURRENCY, repeats=0))
    with tempfile.TemporaryDirectory(prefix="hybridnas-bench-search-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        # Create the store first: a new SQLite store runs MLflow's schema migrations (seconds), a
        # one-time cost a user pays once per mlflow.db, not per search.
        t0 = time.perf_counter()
        make_client(uri).search_experiments()
        store_s = time.perf_counter() - t0
        cal = calibrate_latency(
            exp.space, exp.input, LatencyContext.from_config(exp.latency), seed=exp.search.seed
        )
        res = run_search(exp, tracking_uri=uri, out_dir=os.path.join(tmp, "out"), progress=False)
    rows = [t for t in res.trials if t.get("status")]
    train = sum(float(t.get("train_time_s") or 0.0) for t in rows)
    trained = [t for t in rows if t["status"] != "infeasible"]
    wall, tune_s = res.wall_s, res.timings.get("tune_s", float("nan"))
    ideal = train / CONCURRENCY
    overhead = (wall - ideal) / wall
    loop_overhead = (tune_s - ideal) / tune_s
    # Tune's own trial clock and the loop's clock start a hair apart: clamp at zero.
    in_trial = [
        max(0.0, float(t["time_total_s"]) - float(t.get("train_time_s") or 0.0))
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
            f"{sum(in_trial) / len(in_trial):.2f} s per trial on average"
        )
    print(
        f"orchestration overhead = (wall - sum(train_time_s)/{CONCURRENCY}) / wall = {100 * overhead:.1f}%   "
        f"[target < {100 * TARGET_OVERHEAD:.0f}%: {_mark(overhead < TARGET_OVERHEAD)}]"
    )
    print(f"  Tune loop alone: (tune - sum(train_time_s)/{CONCURRENCY}) / tune = {100 * loop_overhead:.1f}%")
    first = res.first_trial_s
    print(
        f"  fixed costs: start to first trial {first or 0.0:.1f} s + finish {t.get('finish_s', 0.0):.1f} s; the rest "
        "is the tail (one slot idle while the last trial runs) and per-trial gaps"
    )
    if first is not None:
        print(
            f"first trial started {first:.1f} s after the search started   "
            f"[target < {TARGET_FIRST_S:.0f} s: {_mark(first < TARGET_FIRST_S)}]"
        )
    return {
        "trials": len(rows),
        "trained": len(trained),
        "per_trial_s": per,
        "wall_s": wall,
        "overhead": overhead,
        "loop_overhead": loop_overhead,
        "first_trial_s": first,
        "finish_s": t.get("finish_s", 0.0),
    }


def main(args: argparse.Namespace) -> int:
    from hybridnas.runners.search import apply_overrides
    from hybridnas.search_space.experiment import Experiment

    quick = bool(getattr(args, "quick", False))
    given = getattr(args, "experiment", None)
    exp = Experiment.from_yaml(
        Path(given) if given else quickstart_path("run from the repository root or pass --experiment FILE")
    )
    trials = getattr(args, "trials", None)
    epochs = getattr(args, "epochs", None) or (1 if quick else None)
    if quick:
        sizes = [trials or 4]
        exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, samples=1000))
    else:
        sizes = [trials] if trials else [exp.search.trials, LONGER * exp.search.trials]
    exp = apply_overrides(exp, epochs=epochs)  # validates --epochs before anything runs
    for n in sizes:
        apply_overrides(exp, trials=n)
    print(machine_line(), flush=True)
    results = []
    for i, n in enumerate(sizes):
        if i:
            print()
        results.append(run_one(apply_overrides(exp, trials=n), quick))
    if len(results) > 1:
        print(
            f"\nside by side: the same trials (the quickstart's: {exp.train.epochs} epochs, batch "
            f"{exp.train.batch_size}), concurrency {CONCURRENCY}"
        )
        print(
            f"  {'trials':>6}  {'trained':>7}  {'s/trial':>7}  {'wall s':>7}  {'overhead':>8}  {'first trial s':>13}"
        )
        for r in results:
            first = "-" if r["first_trial_s"] is None else f"{r['first_trial_s']:.1f}"
            print(
                f"  {r['trials']:>6}  {r['trained']:>7}  {r['per_trial_s']:>7.1f}  {r['wall_s']:>7.1f}  "
                f"{100 * r['overhead']:>7.1f}%  {first:>13}"
            )
        a, b = results[0], results[-1]
        # Fixed and per-trial parts from the two sizes: overhead seconds = fixed + per_trial * trials.
        oa, ob = a["overhead"] * a["wall_s"], b["overhead"] * b["wall_s"]
        if b["trials"] != a["trials"]:
            slope = (ob - oa) / (b["trials"] - a["trials"])
            fixed = oa - slope * a["trials"]
            print(
                f"  overhead seconds = {fixed:.1f} s once per search + {slope:.2f} s per trial "
                "(fitted through the two searches)"
            )
    return 0
