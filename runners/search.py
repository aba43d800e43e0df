"""`hybridnas search`: architectures sampled by Optuna, trained as Ray Tune trials, tracked in MLflow.

The pieces, in the order a search runs them:

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

import contextlib
import dataclasses
import datetime as dt
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridnas.runners.calibration import (
    SNAPSHOT_FILE,
    calibrate_latency,
    calibration_summary,
    calibration_warning,
    snapshot_calibration,
    snapshot_drift,
    snapshot_table,
)
from hybridnas.runners.data import input_for
from hybridnas.runners.fidelity import fidelity_report
from hybridnas.runners.files import shown
from hybridnas.runners.internals import concurrency_limiter
from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.ray_runtime import init_ray, trial_actors_on_prestarted_workers
from hybridnas.runners.repeats import REPEAT_KIND, run_repeats
from hybridnas.runners.resume import (
    Interrupted,
    Replays,
    SearchError,
    Stop,
    check_can_start,
    check_state,
    close_orphans,
    fingerprint,
    nothing_trained,
    parent_guard,
    replays_from_mlflow,
    resolved_for_fingerprint,
    write_state,
)
from hybridnas.runners.scheduler import make_scheduler
from hybridnas.runners.search_end import finish_search
from hybridnas.runners.searcher import ArchSearcher, ArchSuggester, make_sampler
from hybridnas.runners.trial import (
    FAULTS_ENV,
    STATUS_FAILED,
    STATUS_INFEASIBLE,
    STATUS_OK,
    STATUS_STOPPED,
    hybridnas_trial,
    recipe,
)
from hybridnas.search_space.errors import SpecError

TUNE_DIR = "tune"
SCHEDULER_STATE = "scheduler.json"  # the rungs' records of asha/moasha (Ray's Tuner does not keep them)
STORE_TIMEOUT_S = 600.0  # how long a search goes on without its tracking store (--store-timeout)


# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker, possibly on another node)


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# The searcher (driver)


# ---------------------------------------------------------------------------------------------
# Latency table


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


# ---------------------------------------------------------------------------------------------
# Ray


# ---------------------------------------------------------------------------------------------
# The search


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


EXPERIMENT_NOTE = (
    "Searches of hybrid conv/attention backbones by hybridnas: one parent run per search "
    "(tag hybridnas.kind = search) holding its summary, the front (front.md, fronts.html) and the "
    "exported architectures, and one child run per trial, named after what the search varied. "
    "Filter one search with tags.hybridnas.search_id; the runs' status column says which trials "
    "trained (Finished), failed (Failed) or never trained (Killed: infeasible)."
)


def _start_parent(client: Any, exp_id: str, exp: Any, out: Path, uri: str) -> str:
    from hybridnas.runners.store import describe_experiment, log_params, provenance_tags, search_id, set_tags

    describe_experiment(client, exp_id, EXPERIMENT_NOTE)
    objectives = [[o.metric, o.mode] for o in exp.objectives]
    run = client.create_run(
        exp_id,
        run_name=exp.name,
        tags={
            "hybridnas.kind": "search",
            "hybridnas.objectives": json.dumps(objectives),
            "hybridnas.out_dir": str(out),
            "mlflow.note.content": f"hybridnas search of {exp.path or exp.name}: {exp.search.trials} trials",
        },
    )
    pid = run.info.run_id
    set_tags(client, pid, provenance_tags(exp.path, search_id(exp.name, pid)))
    params = {
        "sampler": exp.search.sampler,
        "seed": exp.search.seed,
        "trials": exp.search.trials,
        "concurrency": exp.search.concurrency,
        "max_failures": exp.search.max_failures,
        "scheduler": exp.search.scheduler,
        "rungs": ", ".join(map(str, exp.search.rungs(exp.train.epochs))) or "none",
        "reduction_factor": exp.search.reduction_factor,
        "repeats": exp.search.repeats,
        "objectives": ", ".join(f"{m} {mode}" for m, mode in objectives),
        "constraints": ", ".join(b.describe(k) for k, b in exp.constraints.items()) or "none",
        "dataset": exp.data.dataset,
        "epochs": exp.train.epochs,
        "batch_size": exp.train.batch_size,
        "lr": exp.train.lr,
        "space_size": exp.space.size(),
        "resources.cpu": exp.resources.cpu,
        "resources.gpu": exp.resources.gpu,
        "latency.device": exp.latency.device,
        "latency.batch_size": exp.latency.batch_size,
        "latency.threads": exp.latency.threads,
    }
    log_params(client, pid, params)
    if exp.source_text:
        client.log_text(pid, exp.source_text, "experiment.yaml")
    resolved = {**exp.to_resolved_dict(), "tracking_uri": uri, "out_dir": str(out)}
    client.log_text(pid, json.dumps(resolved, indent=2, default=str), "resolved_config.json")
    return pid


# Imported in the background while the driver mostly waits (on MLflow, on Ray's processes starting, on
# trials): torch._dynamo is what FlopCounterMode pulls in on its first use (2 s on the path to the first
# trial otherwise: the first suggestion profiles an architecture); the plotting libraries are what the
# end of the search needs (1-2 s there otherwise).
_WARM_MODULES = (
    "torch._dynamo",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "plotly.graph_objects",
)


def _warm_imports() -> None:
    import importlib
    import threading

    def run() -> None:
        for name in _WARM_MODULES:
            with contextlib.suppress(Exception):  # only a head start: a failure shows where it is used
                importlib.import_module(name)

    threading.Thread(target=run, name="hybridnas-warm-imports", daemon=True).start()


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
    from hybridnas.runners import store as tr
    from hybridnas.runners import tracking
    from hybridnas.runners.store_buffer import BUFFER_FILE, BufferedClient

    say = progress if callable(progress) else (lambda line: None)
    t_start, started = time.time(), time.monotonic()  # progress lines count from `started`
    _warm_imports()
    timings: dict[str, float] = {}
    out = Path(out_dir or exp.out_dir).expanduser().resolve()
    faults = os.environ.get(FAULTS_ENV, "")
    fp = fingerprint({**resolved_for_fingerprint(exp), "faults": faults})
    state = check_state(out, fp, resume, "search")

    input_spec = input_for(exp.data)  # checks (or loads) the data here: a data error stops us before MLflow
    t = time.time()
    out_what = "--out" if out_dir else "out_dir"
    check_can_start(out, out_what, exp.resources, exp.train, exp.latency, address, connect_timeout)
    if address:  # joined: costs this machine nothing, and a cluster that is not there fails before MLflow
        stop.rearm()  # ray.init put in its own SIGTERM handler
        timings["ray_init_s"] = time.time() - t
    uri = tr.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    if state:
        if tracking_uri and uri != state["tracking_uri"]:
            raise SearchError(
                f"the search in {out} logs to {tr.redact(state['tracking_uri'])}, not {tr.redact(uri)}; "
                "resume without --tracking-uri"
            )
        uri = state["tracking_uri"]
    tr.check_tracking_uri(uri)
    from mlflow.exceptions import MlflowException

    try:
        client = tr.make_client(uri)
        exp_id = tr.experiment_id(client, exp.tracking.experiment)
        if state:
            parent = state["parent_run_id"]
            client.get_run(parent)
            client.update_run(parent, status="RUNNING")
        else:
            out.mkdir(parents=True, exist_ok=True)
            parent = _start_parent(client, exp_id, exp, out, uri)
            state = {
                "format": 1,
                "experiment": exp.name,
                "mlflow_experiment": exp.tracking.experiment,
                "experiment_id": exp_id,
                "parent_run_id": parent,
                "tracking_uri": uri,
                "fingerprint": fp,
                "trials": exp.search.trials,
                "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
                "finished": False,
                # Until Tune starts: a rerun of the same search (or --resume) continues this parent
                # run; a kill during the latency calibration leaves nothing behind unclosed.
                "provisional": True,
            }
            write_state(out, state)
        close_orphans(client, exp_id, "search", out, keep=parent)
        client = BufferedClient(
            client, uri, out / BUFFER_FILE, store_timeout, say, on_expired=lambda: stop.request("store")
        )
        if client.pending and not client.flush():  # writes an earlier driver could not deliver
            raise tr.TrackingError(
                f"{client.pending} writes buffered in {client.path} could not be delivered"
            )
    except MlflowException as e:
        raise tr.TrackingError(f"MLflow at {tr.redact(uri)}: {e.message}") from None

    with parent_guard(client, parent, stop, "search", out):
        objectives = [(o.metric, o.mode) for o in exp.objectives]
        constraints = {k: b.to_dict() for k, b in exp.constraints.items()}
        grid = exp.search.sampler == "grid"
        n_trials = min(exp.search.trials, exp.space.size(input_spec)) if grid else exp.search.trials
        say(
            f"search {exp.name}: {n_trials} trials with {exp.search.sampler} (seed {exp.search.seed}), "
            f"{exp.search.concurrency} at a time; objectives "
            + ", ".join(f"{m} ({mode})" for m, mode in objectives)
            + (
                ("; constraints " + ", ".join(b.describe(k) for k, b in exp.constraints.items()))
                if constraints
                else ""
            )
        )
        rungs = exp.search.rungs(exp.train.epochs)
        stopping = bool(rungs)
        if stopping:
            say(
                f"{exp.search.scheduler}: trials compared at epoch(s) {', '.join(map(str, rungs))} of "
                f"{exp.train.epochs}, about 1 in {exp.search.reduction_factor} goes on at each; the learning "
                "rate anneals at each of them"
            )
        if exp.search.repeats:
            say(f"repeats: the front's members get {exp.search.repeats} more seed(s) at the end")
        say(f"mlflow: experiment {exp.tracking.experiment!r}, search run {parent} at {tr.redact(uri)}")

        timings["mlflow_s"] = time.time() - t_start - timings.get("ray_init_s", 0.0)
        # The latency table, while nothing else runs on this machine (a local Ray is not started yet).
        latency_context = LatencyContext.from_config(exp.latency)
        # The search predicts from its own copy of the table for its whole life (issue 18): a resume
        # uses the snapshot it started with, whatever was calibrated on this machine since.
        snapshot = out / SNAPSHOT_FILE
        t = time.perf_counter()
        if resume and snapshot.exists():
            cal = snapshot_calibration(snapshot, exp.space, input_spec, latency_context, seed=exp.search.seed)
            drift = snapshot_drift(snapshot, None, latency_context)
            say(
                f"latency: predictions from this search's own table {shown(snapshot)}, as when it started"
                + (
                    f" (the machine's table has changed {drift} of its entries since; a new search would use those)"
                    if drift
                    else ""
                )
            )
        else:
            cal = calibrate_latency(
                exp.space, input_spec, latency_context, seed=exp.search.seed, name=exp.name
            )
            say(calibration_summary(cal))
            if calibration_warning(cal["quality"], latency_context):
                say(calibration_warning(cal["quality"], latency_context))
            snapshot_table(cal["path"], snapshot, latency_context)
        timings["latency_table_s"] = time.perf_counter() - t
        import torch

        torch.set_num_threads(
            1
        )  # the driver only profiles small models from now on; the cores are the trials'

        started_ray = False
        if not address:
            t = time.time()
            started_ray = init_ray(address, workers=exp.search.concurrency)
            stop.rearm()
            timings["ray_init_s"] = time.time() - t
        import ray
        from ray import tune

        cpus = ray.cluster_resources().get("CPU", 0)
        say(
            f"ray: {'joined ' + address if address else 'local'}, {cpus:g} CPUs, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs; per trial {exp.resources.cpu:g} CPU, {exp.resources.gpu:g} GPU"
        )
        gpus = ray.cluster_resources().get("GPU", 0)
        for what, need, have in (("cpu", exp.resources.cpu, cpus), ("gpu", exp.resources.gpu, gpus)):
            if need > have:  # Tune would wait forever for a slot that cannot exist
                raise SearchError(f"resources.{what}: a trial asks for {need:g}, the cluster has {have:g}")

        suggester = ArchSuggester(
            exp.space.to_dict(),
            input_spec.to_dict(),
            constraints,
            dataclasses.asdict(exp.latency),
            str(snapshot),
            grid=grid,
        )
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument")
        sampler = make_sampler(
            exp.search.sampler,
            exp.search.seed,
            n_trials,
            exp.space.grid_search_space(input_spec) if grid else None,
        )
        replay_name = f"hybridnas-replay-{parent}"
        searcher = ArchSearcher(
            suggester,
            sampler=sampler,
            objectives=objectives,
            replay_name=replay_name,
            stopping=stopping,
        )
        param_space = recipe(
            data=dataclasses.asdict(exp.data),
            train=exp.train.to_dict(),
            cpus=exp.resources.cpu,
            faults=faults,
            replay=replay_name,
            restarts=list(rungs),
        )
        trainable = tune.with_resources(hybridnas_trial, {"cpu": exp.resources.cpu, "gpu": exp.resources.gpu})
        callback = tracking.MlflowSearchCallback(
            uri,
            exp_id,
            parent,
            objectives,
            constraints,
            total_trials=n_trials,
            say=progress if callable(progress) else None,
            varied=[p.name for p in exp.space.params()],
            stopping=stopping,
            started=started,
        )
        tune_path = out / TUNE_DIR
        replays = None
        if resume and tune.Tuner.can_restore(str(tune_path)):
            results, params = replays_from_mlflow(client, exp_id, parent)
            if results:
                replays = ray.remote(num_cpus=0)(Replays).options(name=replay_name).remote(results, params)
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, param_space=param_space)
            say(f"resuming {tune_path}: {len(results)} trials finished before")
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    # Ray's limiter, safe to restore (`internals.concurrency_limiter`).
                    search_alg=concurrency_limiter(searcher, exp.search.concurrency),
                    scheduler=make_scheduler(
                        exp.search.scheduler,
                        objectives,
                        exp.train.epochs,
                        exp.search.min_epochs,
                        exp.search.reduction_factor,
                        state_path=out / SCHEDULER_STATE,
                    ),
                    num_samples=n_trials,
                    # Function trainables support reset_config: one worker process per slot for the
                    # whole search, so imports and the data cache survive from trial to trial.
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=str(out),
                    verbose=0,
                    callbacks=[callback],
                    failure_config=tune.FailureConfig(max_failures=exp.search.max_failures),
                ),
            )
        state.pop("provisional", None)
        write_state(out, state)
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

    with parent_guard(client, parent, stop, "search", out):  # a signal while the front is measured
        if not client.flush(max(0.0, store_timeout - (client.unreachable_s or 0.0))):
            raise Interrupted(
                "store",
                f"the tracking store at {tr.redact(uri)} stayed unreachable for {store_timeout:.0f}s; "
                f"{client.pending} writes are kept in {client.path} and delivered by --resume",
            )
        trials = _trial_rows(grid_result)
        finished = tr.child_runs(client, exp_id, parent)
        named = (STATUS_OK, STATUS_STOPPED) if stopping else (STATUS_OK,)
        counts = {s: 0 for s in (*named, STATUS_FAILED, STATUS_INFEASIBLE)}
        for run in finished:
            if run.data.tags.get("hybridnas.kind") == REPEAT_KIND:
                continue
            s = run.data.tags.get("hybridnas.status")
            if s in counts:
                counts[s] += 1
        interrupted = sum(counts.values()) < n_trials
        stopped_by = (stop.reason or "SIGINT") if interrupted else None
        starts = [t["started_at"] for t in trials if t.get("started_at") and not t.get("replayed")]
        first_trial_s = (min(starts) - t_start) if starts and not resume else None

        front, exported, files, fidelity_lines, reached = None, [], [], [], {}
        rep_summary: dict = {}
        why = None if interrupted else nothing_trained(client, exp_id, parent)
        if not interrupted and not why and exp.search.repeats:
            with stop.tune(), tracking.driver(parent, client, progress if callable(progress) else None):
                rep_summary = run_repeats(
                    exp, client, uri, exp_id, parent, out, objectives, rungs, say, progress, started
                )
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
                f"interrupted ({stopped_by}): {sum(counts.values())}/{n_trials} trials{repeats_done} finished; "
                f"the search is saved in {out}"
            )
        else:
            t = time.time()
            shutdown = None
            if started_ray:
                # The front's latency is measured in this process. With the search's Ray still up the
                # medians came out 30-70 % high (measured), so a Ray started here is shut down first
                # (in the background: it takes ~1.4 s, while the runs are read back from MLflow); a Ray
                # that was running before the search (or a cluster) is left alone.
                import threading

                shutdown = threading.Thread(target=ray.shutdown, name="hybridnas-ray-shutdown")
                shutdown.start()
            try:
                front, exported, files = finish_search(
                    exp,
                    client,
                    uri,
                    exp_id,
                    parent,
                    out,
                    objectives,
                    input_spec,
                    say,
                    quiet=shutdown.join if shutdown is not None else None,
                )
            finally:
                if shutdown is not None:
                    shutdown.join()
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
        objectives=objectives,
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


def _trial_rows(grid_result: Any) -> list[dict]:
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
