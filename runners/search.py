"""`hybridnas search`: architectures sampled by Optuna, trained as Ray Tune trials, tracked in MLflow.

The pieces, in the order a search runs them (`_search` reads as this list; steps 1-2 live in
`runners.search_start`, 3-4 in `runners.search_trials`, 5 in `runners.repeats` and `runners.search_end`):

1. The tracking store is probed (a dead server fails here, not after an hour) and the MLflow
   parent run is created (or, with ``--resume``, found again through ``<out>/state.json``).
2. The latency lookup table is calibrated for the whole space while nothing else runs, before a
   local Ray is even started (`calibrate_latency`); its entries are cached on disk. Then Ray
   starts locally (``--address``: joins the cluster, before calibrating, to fail fast).
3. Ray Tune's `Tuner` runs `hybridnas_trial` once per architecture. The searcher is Optuna through
   Ray's `OptunaSearch` with a define-by-run function (`ArchSuggester`) that calls
   ``space.suggest(trial)``, then computes MACs/params and the predicted latency *in the driver*
   and gives Optuna the constraint values (``trial.set_constraint``; Optuna >= 5 reads
   constraints from the trial, its samplers' ``constraints_func`` is deprecated), so constrained
   NSGA-II/TPE learn where the infeasible region is. An infeasible architecture is reported
   without training. An architecture already trained in this search is not proposed again.
4. Trials report to Tune only; `runners.tracking.MlflowSearchCallback` writes MLflow in the driver.
5. At the end the Pareto members' latency is measured end to end (nothing else running), the
   fronts are plotted (`runners.pareto.write_fronts`) and exported as ArchSpec YAML
   (`runners.export`), and all of it is logged on the parent run.

A trial that raises or diverges is caught in the trainable and reported with ``status: failed``
and its error: Optuna is told the trial FAILED (`ArchOptunaSearch`; Ray's own OptunaSearch would
try to tell it as COMPLETE with missing values), MLflow marks the child run FAILED with the error
text, and the search goes on. Ray's ``max_failures`` retries are thus kept for what they are for:
a worker or node that died.

Resume (``--resume``): `Tuner.restore` keeps finished trials and the searcher's (Optuna's) state;
the parent run id comes from ``state.json``. Ray snapshots its state every couple of seconds, so
a driver killed right after a trial finished may come back with that trial marked as running, or
not knowing it at all: its result is then replayed from MLflow (`Replays`; lost trials are asked
of Optuna again by their parameters) instead of being trained again, and the count stays right.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridnas.runners import store as tr
from hybridnas.runners import tracking
from hybridnas.runners.calibration import SNAPSHOT_FILE
from hybridnas.runners.data import input_for
from hybridnas.runners.fidelity import fidelity_report
from hybridnas.runners.ray_runtime import init_ray, trial_actors_on_prestarted_workers
from hybridnas.runners.repeats import run_repeats
from hybridnas.runners.resume import (
    Interrupted,
    SearchError,
    Stop,
    check_can_start,
    check_state,
    fingerprint,
    nothing_trained,
    parent_guard,
    resolved_for_fingerprint,
    write_state,
)
from hybridnas.runners.search_end import finish_search
from hybridnas.runners.search_start import (
    announce,
    check_cluster,
    open_record,
    prepare_latency_table,
    warm_imports,
)
from hybridnas.runners.search_trials import Plan, count_trials, make_tuner, trial_rows
from hybridnas.runners.store import SearchRecord
from hybridnas.runners.trial import FAULTS_ENV
from hybridnas.search_space.errors import SpecError

__all__ = ["STORE_TIMEOUT_S", "SearchError", "SearchResult", "apply_overrides", "run_search"]

STORE_TIMEOUT_S = 600.0  # how long a search goes on without its tracking store (--store-timeout)


def apply_overrides(exp: Any, trials: int | None = None, epochs: int | None = None) -> Any:
    """The experiment with ``--trials`` / ``--epochs`` applied (validated like the file)."""
    if trials is not None:
        if trials < 1:
            raise SpecError("--trials", f"must be >= 1, got {trials}")
        exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, trials=trials))
    if epochs is not None:
        if epochs < 1:
            raise SpecError("--epochs", f"must be >= 1, got {epochs}")
        exp = dataclasses.replace(exp, train=exp.train.replace(epochs=epochs))
        from hybridnas.search_space.experiment import check_schedule

        check_schedule(exp.search, exp.train, exp.objectives)  # the rungs must still fit
    return exp


@dataclasses.dataclass
class SearchResult:
    """What `run_search` did. ``front`` holds the Pareto members (one row per trial, with
    ``latency_ms_measured``); ``trials`` one row per trial with its status and timings."""

    experiment: str
    parent_run_id: str
    tracking_uri: str
    out_dir: Path
    counts: dict[str, int]
    trials: list[dict]
    front: Any  # pandas.DataFrame
    objectives: list[tuple[str, str]]
    exported: list[Path]
    pareto_files: list[Path]
    interrupted: bool
    wall_s: float
    first_trial_s: float | None
    calibration: dict[str, Any]
    timings: dict[str, float]  # mlflow_s, latency_table_s, ray_init_s, tune_s, finish_s
    ui_command: str
    reached: dict[int, int] = dataclasses.field(default_factory=dict)  # epoch -> trials that trained it
    fidelity: list[str] = dataclasses.field(default_factory=list)  # the fidelity report, in words
    repeats: dict = dataclasses.field(default_factory=dict)  # run_repeats' summary (search.repeats)
    stopped_by: str | None = None  # SIGINT | SIGTERM | store, when interrupted
    experiment_id: str = ""
    runs_url: str = ""  # the MLflow UI's runs table of the experiment (`runners.store.runs_url`)
    parent_url: str = ""  # the MLflow UI's page of the search's parent run
    nothing_trained: str | None = None  # why no trial trained, in one line (then there is no front)


def run_search(
    exp: Any,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    store_timeout: float = STORE_TIMEOUT_S,
    connect_timeout: float | None = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) the search described by ``exp``; see the module docstring.

    Raises `SearchError` / `TrackingError` (UserErrors) for an output directory that already holds
    a search (without ``resume``), nothing to resume, an experiment changed since, an unusable
    tracking store or a cluster that does not answer within ``connect_timeout`` seconds (default
    30), missing data, an output folder that cannot be written, resources or devices this machine
    or cluster lacks - all before the tracking store is touched or any trial runs. When no trial
    trained, ``nothing_trained`` says why.

    SIGINT and SIGTERM stop it cleanly (`runners.resume.Stop`): during the trials it returns with
    ``interrupted`` and ``stopped_by`` set; before or after them it raises `Interrupted`. Either
    way the search is saved in its folder and no run is left RUNNING.

    A tracking store that goes away does not stop the trials: the driver's writes wait in
    ``<out>/mlflow_buffer.jsonl`` (`runners.store_buffer`) and are delivered when it answers again,
    or by ``--resume``; after ``store_timeout`` seconds without it the search stops like on SIGTERM
    (``stopped_by="store"``).
    """
    with Stop() as stop:
        return _search(
            exp, tracking_uri, address, resume, out_dir, progress, stop, store_timeout, connect_timeout
        )


def _search(
    exp: Any,
    tracking_uri: str | None,
    address: str | None,
    resume: bool,
    out_dir: str | os.PathLike | None,
    progress: Callable[[str], None] | None,
    stop: Stop,
    store_timeout: float = STORE_TIMEOUT_S,
    connect_timeout: float | None = None,
) -> SearchResult:
    """The search, step by step (the module docstring's list): check, open the record, calibrate the
    latency table, start Ray, run the trials, then the end (repeats, the front, the record closed)."""
    say = progress if callable(progress) else (lambda line: None)
    t_start, started = time.time(), time.monotonic()  # progress lines count from `started`
    warm_imports()
    timings: dict[str, float] = {}
    out = Path(out_dir or exp.out_dir).expanduser().resolve()
    faults = os.environ.get(FAULTS_ENV, "")
    fp = fingerprint({**resolved_for_fingerprint(exp), "faults": faults})
    state = check_state(out, fp, resume, "search")

    # Everything a user can get wrong, before MLflow is touched.
    input_spec = input_for(exp.data)  # checks (or loads) the data here: a data error stops us before MLflow
    t = time.time()
    out_what = "--out" if out_dir else "out_dir"
    check_can_start(out, out_what, exp.resources, exp.train, exp.latency, address, connect_timeout)
    if address:  # joined: costs this machine nothing, and a cluster that is not there fails before MLflow
        stop.rearm()  # ray.init put in its own SIGTERM handler
        timings["ray_init_s"] = time.time() - t

    # 1. The record: the MLflow parent run and <out>/state.json.
    rec, state = open_record(exp, out, tracking_uri, state, fp, store_timeout, say, stop)
    client, uri, exp_id, parent = rec.client, rec.uri, rec.exp_id, rec.parent

    with parent_guard(client, parent, stop, "search", out):
        plan = Plan.of(exp, input_spec)
        announce(exp, plan, parent, uri, say)
        timings["mlflow_s"] = time.time() - t_start - timings.get("ray_init_s", 0.0)

        # 2. The latency table, while nothing else runs on this machine (a local Ray is not started yet).
        t = time.perf_counter()
        snapshot = out / SNAPSHOT_FILE
        cal = prepare_latency_table(exp, input_spec, snapshot, resume, say)
        timings["latency_table_s"] = time.perf_counter() - t
        import torch

        # The driver only profiles small models from now on; the cores are the trials'.
        torch.set_num_threads(1)

        # 2. Ray: started here, or the cluster joined above.
        started_ray = False
        if not address:
            t = time.time()
            started_ray = init_ray(address, workers=exp.search.concurrency)
            stop.rearm()
            timings["ray_init_s"] = time.time() - t
        check_cluster(exp, address, say)

        # 3-4. The trials.
        tuner, replays = make_tuner(
            exp,
            plan,
            input_spec,
            rec,
            snapshot,
            faults,
            resume,
            progress,
            started,
            say,
        )
        state.pop("provisional", None)
        write_state(out, state)
        import ray

        t = time.time()
        try:
            with (
                trial_actors_on_prestarted_workers(),
                stop.tune(),
                tracking.driver(parent, client, progress if callable(progress) else None),
            ):
                grid_result = tuner.fit()
            timings["tune_s"] = time.time() - t
        finally:
            if replays is not None:
                ray.kill(replays)

    # 5. The end: repeats, the front measured and exported, the parent run closed.
    with parent_guard(client, parent, stop, "search", out):  # a signal while the front is measured
        if not client.flush(max(0.0, store_timeout - (client.unreachable_s or 0.0))):
            raise Interrupted(
                "store",
                f"the tracking store at {tr.redact(uri)} stayed unreachable for {store_timeout:.0f}s; "
                f"{client.pending} writes are kept in {client.path} and delivered by --resume",
            )
        trials = trial_rows(grid_result)
        counts = count_trials(rec, plan.stopping)
        interrupted = sum(counts.values()) < plan.n_trials
        stopped_by = (stop.reason or "SIGINT") if interrupted else None
        starts = [t["started_at"] for t in trials if t.get("started_at") and not t.get("replayed")]
        first_trial_s = (min(starts) - t_start) if starts and not resume else None

        front, exported, files, fidelity_lines, reached = None, [], [], [], {}
        rep_summary: dict = {}
        why = None if interrupted else nothing_trained(client, exp_id, parent)
        if not interrupted and not why and exp.search.repeats:
            with stop.tune(), tracking.driver(parent, client, progress if callable(progress) else None):
                rep_summary = run_repeats(exp, rec, plan.objectives, plan.rungs, say, progress, started)
            if rep_summary["interrupted"]:
                interrupted, stopped_by = True, stop.reason or "SIGINT"
        if why:  # every trial failed, or none trained: no front, and not a success
            tr.set_tags(client, parent, {"hybridnas.error": why})
            client.set_terminated(parent, "FAILED")
            state["finished"] = True
            write_state(out, state)
            if started_ray:
                ray.shutdown()
        elif interrupted:
            tr.close_unfinished(client, exp_id, parent)  # the callback closed its own; this is the net
            client.set_terminated(parent, "KILLED")
            repeats_done = (
                f" and {rep_summary['finished']}/{rep_summary['members'] * exp.search.repeats} repeats"
                if rep_summary
                else ""
            )
            say(
                f"interrupted ({stopped_by}): {sum(counts.values())}/{plan.n_trials} trials{repeats_done} "
                f"finished; the search is saved in {out}"
            )
        else:
            t = time.time()
            front, exported, files = _finish(exp, rec, plan.objectives, input_spec, say, started_ray)
            reached, fidelity_lines = fidelity_report(
                client, exp_id, parent, exp.search, exp.train.epochs, front
            )
            timings["finish_s"] = time.time() - t
            state["finished"] = True
            write_state(out, state)
            client.set_terminated(parent, "FINISHED")
    return SearchResult(
        experiment=exp.tracking.experiment,
        parent_run_id=parent,
        tracking_uri=uri,
        out_dir=out,
        counts=counts,
        trials=trials,
        front=front,
        objectives=plan.objectives,
        exported=exported,
        pareto_files=files,
        interrupted=interrupted,
        stopped_by=stopped_by,
        wall_s=time.time() - t_start,
        first_trial_s=first_trial_s,
        calibration=cal,
        timings=timings,
        ui_command=tr.ui_command(uri),
        experiment_id=exp_id,
        runs_url=tr.runs_url(uri, exp_id),
        parent_url=tr.run_url(uri, exp_id, parent),
        nothing_trained=why,
        reached=reached,
        fidelity=fidelity_lines,
        repeats=rep_summary,
    )


def _finish(
    exp: Any,
    rec: SearchRecord,
    objectives: list[tuple[str, str]],
    input_spec: Any,
    say: Callable[[str], None],
    started_ray: bool,
) -> tuple[Any, list, list]:
    """`finish_search` (the front measured, plotted, exported, logged) with a Ray started by this
    search shut down first. The front's latency is measured in this process: with the search's Ray
    still up the medians came out 30-70 % high (measured), so a Ray started here is shut down in the
    background (it takes ~1.4 s, while the runs are read back from MLflow) and the measuring waits
    for it; a Ray that was running before the search (or a cluster) is left alone."""
    import threading

    import ray

    shutdown = None
    if started_ray:
        shutdown = threading.Thread(target=ray.shutdown, name="hybridnas-ray-shutdown")
        shutdown.start()
    try:
        return finish_search(
            exp,
            rec,
            objectives,
            input_spec,
            say,
            quiet=shutdown.join if shutdown is not None else None,
        )
    finally:
        if shutdown is not None:
            shutdown.join()
