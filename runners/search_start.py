"""The start of a search: its MLflow record opened, its latency table made ready, its Ray checked.

`runners.search` runs these in order before any trial starts (its module docstring has the whole
flow); each raises a UserError naming what is wrong, so a search that cannot run stops here, with
nothing half-written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridnas.runners import store as tr
from hybridnas.runners.calibration import (
    calibrate_latency,
    calibration_summary,
    calibration_warning,
    snapshot_calibration,
    snapshot_drift,
    snapshot_table,
)
from hybridnas.runners.files import shown
from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.resume import SearchError, Stop, close_orphans, write_state
from hybridnas.runners.search_trials import Plan
from hybridnas.runners.store import SearchRecord
from hybridnas.runners.store_buffer import BUFFER_FILE, BufferedClient

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


def open_record(
    exp: Any,
    out: Path,
    tracking_uri: str | None,
    state: dict | None,
    fp: str,
    store_timeout: float,
    say: Callable[[str], None],
    stop: Stop,
) -> tuple[SearchRecord, dict]:
    """The search's MLflow parent run, new or (``state`` from ``--resume``) found again, and its
    state.json; returns the `SearchRecord` and the state. The client buffers
    its writes (`runners.store_buffer`); writes an earlier driver could not deliver go first."""
    from mlflow.exceptions import MlflowException

    uri = tr.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    if state:
        if tracking_uri and uri != state["tracking_uri"]:
            raise SearchError(
                f"the search in {out} logs to {tr.redact(state['tracking_uri'])}, not {tr.redact(uri)}; "
                "resume without --tracking-uri"
            )
        uri = state["tracking_uri"]
    tr.check_tracking_uri(uri)
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
    return SearchRecord(client, uri, exp_id, parent, out), state


def announce(exp: Any, plan: Plan, parent: str, uri: str, say: Callable[[str], None]) -> None:
    """The search's first lines: trials, sampler, objectives, constraints, scheduler, repeats, MLflow."""
    say(
        f"search {exp.name}: {plan.n_trials} trials with {exp.search.sampler} (seed {exp.search.seed}), "
        f"{exp.search.concurrency} at a time; objectives "
        + ", ".join(f"{m} ({mode})" for m, mode in plan.objectives)
        + (
            ("; constraints " + ", ".join(b.describe(k) for k, b in exp.constraints.items()))
            if plan.constraints
            else ""
        )
    )
    if plan.stopping:
        say(
            f"{exp.search.scheduler}: trials compared at epoch(s) {', '.join(map(str, plan.rungs))} of "
            f"{exp.train.epochs}, about 1 in {exp.search.reduction_factor} goes on at each; the learning "
            "rate anneals at each of them"
        )
    if exp.search.repeats:
        say(f"repeats: the front's members get {exp.search.repeats} more seed(s) at the end")
    say(f"mlflow: experiment {exp.tracking.experiment!r}, search run {parent} at {tr.redact(uri)}")


def prepare_latency_table(
    exp: Any, input_spec: Any, snapshot: Path, resume: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """The latency table this search predicts from: calibrated for the space now (`calibrate_latency`)
    and copied into ``snapshot``, or, on ``--resume``, the snapshot it started with (issue 18: a
    resume predicts as the search began, whatever was calibrated on this machine since)."""
    latency_context = LatencyContext.from_config(exp.latency)
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
        return cal
    cal = calibrate_latency(exp.space, input_spec, latency_context, seed=exp.search.seed, name=exp.name)
    say(calibration_summary(cal))
    warning = calibration_warning(cal["quality"], latency_context)
    if warning:
        say(warning)
    snapshot_table(cal["path"], snapshot, latency_context)
    return cal


def check_cluster(exp: Any, address: str | None, say: Callable[[str], None]) -> None:
    """Says what Ray has; a trial asking for more CPUs or GPUs than the cluster has is an error
    (Tune would wait forever for a slot that cannot exist)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    say(
        f"ray: {'joined ' + address if address else 'local'}, {cpus:g} CPUs, "
        f"{gpus:g} GPUs; per trial {exp.resources.cpu:g} CPU, {exp.resources.gpu:g} GPU"
    )
    for what, need, have in (("cpu", exp.resources.cpu, cpus), ("gpu", exp.resources.gpu, gpus)):
        if need > have:
            raise SearchError(f"resources.{what}: a trial asks for {need:g}, the cluster has {have:g}")


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


def warm_imports() -> None:
    import importlib
    import threading

    def run() -> None:
        for name in _WARM_MODULES:
            with contextlib.suppress(Exception):  # only a head start: a failure shows where it is used
                importlib.import_module(name)

    threading.Thread(target=run, name="hybridnas-warm-imports", daemon=True).start()
