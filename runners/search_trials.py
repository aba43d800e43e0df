"""The trials of a search: Optuna's sampler behind Ray Tune, the scheduler, and what came back.

`make_tuner` builds (or restores from ``<out>/tune``) the Tuner `runners.search` runs;
`trial_rows` and `count_trials` read what the trials did, from Ray and from MLflow.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridnas.runners import store as tr
from hybridnas.runners import tracking
from hybridnas.runners.internals import concurrency_limiter
from hybridnas.runners.repeats import REPEAT_KIND
from hybridnas.runners.resume import Replays, replays_from_mlflow
from hybridnas.runners.scheduler import make_scheduler
from hybridnas.runners.searcher import ArchSearcher, ArchSuggester, make_sampler
from hybridnas.runners.store import SearchRecord
from hybridnas.runners.trial import (
    STATUS_FAILED,
    STATUS_INFEASIBLE,
    STATUS_OK,
    STATUS_STOPPED,
    hybridnas_trial,
    recipe,
)

TUNE_DIR = "tune"
SCHEDULER_STATE = "scheduler.json"  # the rungs' records of asha/moasha (Ray's Tuner does not keep them)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the experiment asks of this search, resolved once: objectives, constraints, how many
    trials, and the rungs at which a scheduler may stop a trial."""

    objectives: list[tuple[str, str]]
    constraints: dict[str, Any]
    grid: bool
    n_trials: int
    rungs: tuple[int, ...]

    @property
    def stopping(self) -> bool:
        return bool(self.rungs)

    @classmethod
    def of(cls, exp: Any, input_spec: Any) -> Plan:
        grid = exp.search.sampler == "grid"
        return cls(
            objectives=[(o.metric, o.mode) for o in exp.objectives],
            constraints={k: b.to_dict() for k, b in exp.constraints.items()},
            grid=grid,
            n_trials=min(exp.search.trials, exp.space.size(input_spec)) if grid else exp.search.trials,
            rungs=tuple(exp.search.rungs(exp.train.epochs)),
        )


def make_tuner(
    exp: Any,
    plan: Plan,
    input_spec: Any,
    rec: SearchRecord,
    snapshot: Path,
    faults: str,
    resume: bool,
    progress: Callable[[str], None] | None,
    started: float,
    say: Callable[[str], None],
) -> tuple[Any, Any]:
    """Ray Tune's Tuner for this search, new or restored from ``<out>/tune``: Optuna's sampler
    behind `ArchSearcher` and Ray's concurrency limiter, the scheduler, the trainable and the
    MLflow callback. Returns ``(tuner, replays)``; ``replays`` is the actor that hands a restored
    search the results Ray lost (None when there are none), to be killed when the trials end."""
    import optuna
    import ray
    from ray import tune

    client, uri, exp_id, parent, out = rec.client, rec.uri, rec.exp_id, rec.parent, rec.out

    suggester = ArchSuggester(
        exp.space.to_dict(),
        input_spec.to_dict(),
        plan.constraints,
        dataclasses.asdict(exp.latency),
        str(snapshot),
        grid=plan.grid,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument")
    sampler = make_sampler(
        exp.search.sampler,
        exp.search.seed,
        plan.n_trials,
        exp.space.grid_search_space(input_spec) if plan.grid else None,
    )
    replay_name = f"hybridnas-replay-{parent}"
    searcher = ArchSearcher(
        suggester,
        sampler=sampler,
        objectives=plan.objectives,
        replay_name=replay_name,
        stopping=plan.stopping,
    )
    param_space = recipe(
        data=dataclasses.asdict(exp.data),
        train=exp.train.to_dict(),
        cpus=exp.resources.cpu,
        faults=faults,
        replay=replay_name,
        restarts=list(plan.rungs),
    )
    trainable = tune.with_resources(hybridnas_trial, {"cpu": exp.resources.cpu, "gpu": exp.resources.gpu})
    callback = tracking.MlflowSearchCallback(
        uri,
        exp_id,
        parent,
        plan.objectives,
        plan.constraints,
        total_trials=plan.n_trials,
        say=progress if callable(progress) else None,
        varied=[p.name for p in exp.space.params()],
        stopping=plan.stopping,
        started=started,
    )
    tune_path = out / TUNE_DIR
    if resume and tune.Tuner.can_restore(str(tune_path)):
        results, params = replays_from_mlflow(client, exp_id, parent)
        replays = None
        if results:
            replays = ray.remote(num_cpus=0)(Replays).options(name=replay_name).remote(results, params)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, param_space=param_space)
        say(f"resuming {tune_path}: {len(results)} trials finished before")
        return tuner, replays
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            # Ray's limiter, safe to restore (`internals.concurrency_limiter`).
            search_alg=concurrency_limiter(searcher, exp.search.concurrency),
            scheduler=make_scheduler(
                exp.search.scheduler,
                plan.objectives,
                exp.train.epochs,
                exp.search.min_epochs,
                exp.search.reduction_factor,
                state_path=out / SCHEDULER_STATE,
            ),
            num_samples=plan.n_trials,
            # Function trainables support reset_config: one worker process per slot for the
            # whole search, so imports and the data cache survive from trial to trial.
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(out),
            verbose=0,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=exp.search.max_failures),
        ),
    )
    return tuner, None


def trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trial_rows(grid_result: Any) -> list[dict]:
    rows = []
    for r in grid_result:
        m = dict(r.metrics or {})
        rows.append(
            {
                k: m.get(k)
                for k in (
                    "trial_number",
                    "status",
                    "arch_hash",
                    "val_acc",
                    "train_time_s",
                    "time_total_s",
                    "started_at",
                    "node_id",
                    "hostname",
                    "pid",
                    "warm_start",
                    "replayed",
                    "error",
                )
            }
        )
    return rows


def count_trials(rec: SearchRecord, stopping: bool) -> dict[str, int]:
    """How many of the search's trials (repeats not counted) MLflow holds with each status."""
    named = (STATUS_OK, STATUS_STOPPED) if stopping else (STATUS_OK,)
    counts = {s: 0 for s in (*named, STATUS_FAILED, STATUS_INFEASIBLE)}
    for run in tr.child_runs(rec.client, rec.exp_id, rec.parent):
        if run.data.tags.get("hybridnas.kind") == REPEAT_KIND:
            continue
        s = run.data.tags.get("hybridnas.status")
        if s in counts:
            counts[s] += 1
    return counts
