"""Error bars for the front (``search.repeats: N``): every front member trained again with N more seeds.

After the search's trials, the members of its front are trained again at the full budget, with the
search's recipe and seeds ``train.seed + 1 ... train.seed + N``, as Ray trials in parallel (one
grid over complete trial configs, like an ablation). Each repeat is a child run of the search,
``hybridnas.kind=repeat``, tagged ``hybridnas.repeat_of`` (the trial number) and ``hybridnas.seed``.
Then each member's run gets ``val_acc_mean``, ``val_acc_sd`` (over all its seeds, the search's
included) and ``seeds``; `runners.export.load_runs` reads the mean as the member's ``val_acc``, so
the front, ``pareto.csv``, the plots and ``hybridnas export`` all work on seed means.

A repeat that already finished (a resumed search) is not trained again: repeats are keyed by
architecture and seed (``hybridnas.run_key``) and found in MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hybridnas.runners.store import SearchRecord

REPEAT_KIND = "repeat"
TUNE_DIR = "repeats"


def repeat_key(arch_hash: str, seed: int) -> str:
    return json.dumps([REPEAT_KIND, arch_hash, int(seed)])


def repeat_seeds(base_seed: int, n: int) -> list[int]:
    """The seeds of the repeats: the ones after the search's own."""
    return [base_seed + k for k in range(1, n + 1)]


def _repeat_runs(client: Any, exp_id: str, parent: str) -> list:
    from hybridnas.runners.store import child_runs

    return [r for r in child_runs(client, exp_id, parent) if r.data.tags.get("hybridnas.kind") == REPEAT_KIND]


def plan(front: Any, exp: Any, done: set[str], restarts: Sequence[int]) -> list[dict]:
    """Trial configs (`TrialConfig` dicts) of the repeats of ``front`` (rows of `load_runs`) that
    have no finished run yet (``done``: their run keys)."""
    from hybridnas.runners.trial import TrialConfig

    configs = []
    for r in front.to_dict("records"):
        spec = r["arch"]
        for seed in repeat_seeds(exp.train.seed, exp.search.repeats):
            key = repeat_key(r["arch_hash"], seed)
            if key in done:
                continue
            configs.append(
                TrialConfig(
                    arch=spec.to_dict(),
                    arch_hash=r["arch_hash"],
                    trial_number=f"{r['trial']}/seed{seed}",
                    data=dataclasses.asdict(exp.data),
                    train=exp.train.replace(seed=seed).to_dict(),
                    predicted={m: r[m] for m in ("macs", "flops", "params", "latency_ms") if m in r},
                    cpus=exp.resources.cpu,
                    faults=os.environ.get("HYBRIDNAS_FAULTS", ""),
                    run_key=key,
                    tags={
                        "hybridnas.kind": REPEAT_KIND,
                        "hybridnas.repeat_of": str(r["trial"]),
                        "hybridnas.seed": str(seed),
                    },
                    restarts=list(restarts),
                ).to_dict()
            )
    return configs


def run_repeats(
    exp: Any,
    rec: SearchRecord,
    objectives: Sequence[tuple[str, str]],
    restarts: Sequence[int],
    say: Callable[[str], None],
    progress: Callable[[str], None] | None = None,
    started: float | None = None,
) -> dict:
    """Train the front's repeats that are not in MLflow yet, then log each member's seed statistics.

    ``started``: the ``time.monotonic()`` of the search's start, for the progress lines.
    Returns ``{"members", "trained", "finished", "interrupted"}``.
    """
    from ray import tune

    from hybridnas.runners import tracking
    from hybridnas.runners.export import ExportError, load_runs
    from hybridnas.runners.pareto import feasible_table
    from hybridnas.runners.ray_runtime import trial_actors_on_prestarted_workers
    from hybridnas.runners.store import FINISHED
    from hybridnas.runners.trial import hybridnas_trial

    client, uri, exp_id, parent, out = rec.client, rec.uri, rec.exp_id, rec.parent, rec.out
    try:
        df = load_runs(exp.tracking.experiment, uri, parent_run_id=parent)
    except ExportError:
        return {"members": 0, "trained": 0, "finished": 0, "interrupted": False}
    # The front the search found, on its single seeds (a resumed search may have means already).
    single = df.assign(val_acc=df["val_acc_single"].fillna(df["val_acc"]))
    t = feasible_table(single, objectives)
    front = t[t["pareto"]]
    done = {
        r.data.tags.get("hybridnas.run_key")
        for r in _repeat_runs(client, exp_id, parent)
        if r.data.tags.get("hybridnas.status") in FINISHED
    }
    configs = plan(front, exp, done, restarts)
    total = len(front) * exp.search.repeats
    say(
        f"repeats: the {len(front)} front members with {exp.search.repeats} more seed(s) each "
        f"({total} trainings, {total - len(configs)} finished before)"
    )
    if configs:
        callback = tracking.MlflowSearchCallback(
            uri,
            exp_id,
            parent,
            list(objectives),
            {},
            total_trials=total,
            say=progress,
            repeats=True,
            started=started,
        )
        tuner = tune.Tuner(
            tune.with_resources(hybridnas_trial, {"cpu": exp.resources.cpu, "gpu": exp.resources.gpu}),
            param_space={"trial": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                num_samples=1, max_concurrent_trials=exp.search.concurrency, reuse_actors=True
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(out),
                callbacks=[callback],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=exp.search.max_failures),
            ),
        )
        with trial_actors_on_prestarted_workers():
            tuner.fit()
    finished = log_seed_stats(client, exp_id, parent, front, exp.train.seed)
    return {
        "members": len(front),
        "trained": len(configs),
        "finished": finished,
        "interrupted": finished < total,
    }


def log_seed_stats(client: Any, exp_id: str, parent: str, front: Any, base_seed: int) -> int:
    """``val_acc_mean``, ``val_acc_sd`` and ``seeds`` on each front member's run, from its own
    accuracy and its finished repeats; returns how many repeats finished."""
    from hybridnas.runners.store import log_metrics, set_tags

    accs: dict[str, list[float]] = {}
    for run in _repeat_runs(client, exp_id, parent):
        if run.data.tags.get("hybridnas.status") == "ok" and "val_acc" in run.data.metrics:
            accs.setdefault(run.data.tags.get("hybridnas.repeat_of", ""), []).append(
                run.data.metrics["val_acc"]
            )
    finished = 0
    for r in front.to_dict("records"):
        single = r["val_acc"]  # the front's rows carry the single-seed accuracy (see run_repeats)
        extra = accs.get(str(r["trial"]), [])
        finished += len(extra)
        values = np.array([float(single), *extra])
        sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        log_metrics(
            client,
            r["run_id"],
            {"val_acc_mean": float(values.mean()), "val_acc_sd": sd, "seeds": len(values)},
        )
        set_tags(client, r["run_id"], {"hybridnas.seed": str(base_seed)})
    return finished
