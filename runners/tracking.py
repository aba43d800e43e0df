"""MLflow tracking of a search: one writer, the Ray Tune driver, through a Tune `Callback`.

Trials never talk to MLflow: they report to Tune (`tune.report`), and `MlflowSearchCallback`, which
runs in the driver's event loop, turns trial events into MLflow calls through one `MlflowClient`.
So a SQLite store has exactly one writer (no "database is locked" between trial processes), a
trial on another node needs no route to the tracking server, and a nested child run really is
nested: it is created with the ``mlflow.parentRunId`` tag instead of relying on the active-run stack
of whichever process happens to log.

Layout (read back by `runners.export` and `runners.pareto`):

- parent run (one per search): tags ``hybridnas.kind=search``, ``hybridnas.objectives`` (JSON
  ``[[metric, mode], ...]``) and the `SHARED_TAGS` (``hybridnas.search_id``, version, source);
  params sampler, seed, trials, ...; after each finished trial (step = trials finished) the metrics
  ``n_ok``, ``n_failed``, ``n_infeasible``, ``n_done``, ``best_<objective>`` and, with several
  objectives, ``hypervolume`` and ``hypervolume_norm`` (0-1, the share of its reference box);
  the dataset inputs; artifacts experiment.yaml, resolved_config.json and, at the end (see
  `runners.search`), the front's table and plots and exported/*.yaml.
- child run (one per trial), named by `runners.run_names` (``t07 s1:window+ca c32``, outcome
  marks such as ``[infeasible]``): tags ``mlflow.parentRunId``, ``hybridnas.kind=trial``,
  ``hybridnas.trial`` (the Optuna trial number), ``hybridnas.status`` (running | ok | failed |
  infeasible | stopped), ``hybridnas.arch`` (the architecture on one line), ``hybridnas.arch_hash``,
  ``hybridnas.error`` (failed), ``hybridnas.rung`` (stopped: the epoch of the rung the scheduler
  stopped it at), ``pareto=true`` (front members), the `SHARED_TAGS`; MLflow status
  `RUN_STATUS` (FINISHED, FAILED, KILLED for never trained or stopped); params = the flattened
  architecture; metrics of the architecture (macs, flops, params, latency_ms) at step 0 from its
  start, of its training (train_time_s, imgs_per_s, epochs_trained) at step 0 when it trained,
  train_loss and val_acc per epoch (step = epoch; the final val_acc is the last epoch's point,
  never a second series); the dataset inputs it trained on; artifact arch.yaml.
- repeat run (one per extra seed of a front member, ``search.repeats``): like a trial's, with
  ``hybridnas.kind=repeat``, ``hybridnas.repeat_of`` (the trial number) and ``hybridnas.seed``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ray.tune import Callback

from hybridnas.runners import run_names
from hybridnas.runners.fmt import human
from hybridnas.runners.store import (
    EPOCH_METRICS,
    FINISHED,
    RUN_STATUS,
    SHARED_TAGS,
    _clip,
    _finite,
    child_runs,
    close_unfinished_run,
    headline,
    log_dataset,
    log_metrics,
    log_params,
    make_client,
    rename,
    set_tags,
)
from hybridnas.runners.trial import STATUS_STOPPED, TrialConfig

ARCH_METRICS = ("macs", "flops", "params", "latency_ms")  # known before training: step 0 from the start
TRAINING_METRICS = ("train_time_s", "imgs_per_s")  # one value per trained run: step 0 at its end


# ---------------------------------------------------------------------------------------------
# The driver's side of the callback


# Parent run id -> (client, say) of the driver running that search now. Tune pickles its callbacks
# with the experiment and a resumed search runs the unpickled one, so what belongs to the running
# driver (its buffered MLflow client, where progress lines go) is looked up here, never pickled.
_DRIVERS: dict[str, tuple[Any, Callable[[str], None] | None]] = {}


@contextlib.contextmanager
def driver(parent_run_id: str, client: Any, say: Callable[[str], None] | None) -> Iterator[None]:
    """While open, the callback of search ``parent_run_id`` writes through ``client`` (a
    `runners.store_buffer.BufferedClient`) and hands its progress lines to ``say``."""
    _DRIVERS[parent_run_id] = (client, say)
    try:
        yield
    finally:
        _DRIVERS.pop(parent_run_id, None)


# ---------------------------------------------------------------------------------------------
# The callback


def trial_config(trial: Any) -> dict:
    """A trial's hybridnas config: the whole Tune config in a search, ``config["trial"]`` in an
    ablation (whose trials are a grid over complete configs)."""
    return TrialConfig.from_config(trial.config).to_dict()


class MlflowSearchCallback(Callback):
    """Every MLflow write of a search, done in the Tune driver.

    Child runs are found again by their Ray trial id (tag ``hybridnas.ray_trial_id``) when a search
    is resumed, so a trial that finished before the interruption keeps its run, and a trial that was
    cut short gets a fresh run (its old, unfinished one is deleted, so no half curve stays behind).
    The hypervolume reference is fixed at the first finished trial and stored on the parent run
    (tag ``hybridnas.hv_reference``) so that a resumed search continues the same curve.

    It also hands the progress line of each finished trial to ``say`` (the CLI prints it).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        objectives: Sequence[tuple[str, str]],
        constraints: Mapping[str, Any] | None = None,
        total_trials: int = 0,
        say: Callable[[str], None] | None = None,
        varied: Sequence[str] | None = None,
        *,
        stopping: bool = False,
        repeats: bool = False,
        started: float | None = None,
    ) -> None:
        """``stopping``: a scheduler (asha, moasha) may stop trials at a rung, so a trial that ends
        on a per-epoch result was stopped there (without one it would be a failure). ``repeats``:
        this callback logs the repeats of front members (child runs of kind ``repeat``), not trials.
        ``started``: the ``time.monotonic()`` the progress lines count from (default: Tune's start)."""
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.objectives = [(str(m), str(mode)) for m, mode in objectives]
        self.constraints = {
            k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in (constraints or {}).items()
        }
        self.total_trials = total_trials
        # The search space's parameter names: what child run names show (`run_names.varied_summary`).
        self.varied = list(varied or ())
        self.stopping = stopping
        self.repeats = repeats
        self.started = started
        self._say = say
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self._runs: dict[str, str] = {}  # Ray trial id -> child run id
        # run key -> finished child run id (resume). The key is the arch hash in a search (one trial
        # per architecture) and "[variant, seed]" in an ablation (one architecture, several seeds).
        self._by_hash: dict[str, str] = {}
        self._done: set[str] = set()  # Ray trial ids whose child run is finished
        self._epochs_logged: dict[str, int] = {}
        self._counts = dict.fromkeys(FINISHED, 0)
        self._shared: dict[str, str] = {}  # the parent's SHARED_TAGS, copied onto each child
        self._dataset_logged = False  # on the parent
        self._hv = None
        self._best: tuple[float, str] | None = None
        self._t0 = time.monotonic()

    # The client and bookkeeping are rebuilt from MLflow in setup(): never pickled with the Tuner.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in (
            "_client",
            "_runs",
            "_by_hash",
            "_done",
            "_epochs_logged",
            "_counts",
            "_hv",
            "_best",
            "_say",
            "_shared",
            "_dataset_logged",
            "started",  # this process's clock: meaningless in a resumed driver
        ):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()
        self._say = None
        self.started = None
        self.__dict__.setdefault("stopping", False)  # pickled by an older hybridnas
        self.__dict__.setdefault("repeats", False)

    @property
    def client(self) -> Any:
        linked = _DRIVERS.get(self.parent_run_id)
        if linked is not None:
            return linked[0]
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    def _print(self, line: str) -> None:
        linked = _DRIVERS.get(self.parent_run_id)
        say = self._say or (linked[1] if linked is not None else None)
        if say is not None:
            say(line)

    # ---- Tune hooks ------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Rebuild the bookkeeping of a resumed search from MLflow (the source of truth)."""
        from hybridnas.runners.pareto import HypervolumeTracker

        self._t0 = self.started if self.started is not None else time.monotonic()
        client = self.client
        parent = client.get_run(self.parent_run_id)
        self._shared = {k: parent.data.tags[k] for k in SHARED_TAGS if k in parent.data.tags}
        self._dataset_logged = bool(parent.inputs and parent.inputs.dataset_inputs)
        ref = parent.data.tags.get("hybridnas.hv_reference")
        self._hv = HypervolumeTracker(
            self.objectives, self.constraints, reference=json.loads(ref) if ref else None
        )
        for run in child_runs(client, self.experiment_id, self.parent_run_id):
            tid = run.data.tags.get("hybridnas.ray_trial_id")
            status = run.data.tags.get("hybridnas.status")
            if not tid or (run.data.tags.get("hybridnas.kind") == "repeat") != self.repeats:
                continue
            if status in FINISHED:
                self._runs[tid] = run.info.run_id
                key = run.data.tags.get("hybridnas.run_key") or run.data.tags.get("hybridnas.arch_hash", "")
                self._by_hash[key] = run.info.run_id
                self._done.add(tid)
                self._counts[status] += 1
                if status == "ok" and not self.repeats:
                    self._add_to_front(run.data.metrics, run.data.tags.get("hybridnas.trial", "?"))
            else:
                # Cut short by the interruption: the trial restarts from scratch, with a new run.
                close_unfinished_run(client, run)
                client.delete_run(run.info.run_id)
        if self._done:
            self._print(f"resumed: {self._summary()}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        poll = getattr(self.client, "poll", None)
        if poll is not None:  # the store was away: deliver what waits once it answers
            poll()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune's loop ended (finished, interrupted, or Tune raised): the runs of trials that did
        not finish end KILLED (a resumed search deletes them and runs those trials again)."""
        client = self.client
        for tid, run_id in list(self._runs.items()):
            if tid not in self._done:
                with contextlib.suppress(Exception):
                    set_tags(client, run_id, {"hybridnas.status": "killed"})
                    client.set_terminated(run_id, "KILLED")
                self._done.add(tid)
        poll = getattr(client, "poll", None)
        if poll is not None:
            poll(force=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.trial_id
        if tid in self._done or tid in self._runs:
            return  # finished before a resume (Tune replays it), or a retry after a worker failure
        from hybridnas.search_space.spec import ArchSpec

        cfg = trial_config(trial)
        adopted = self._by_hash.get(cfg.get("run_key") or cfg.get("arch_hash", ""))
        if adopted:
            # Finished after Ray's last snapshot of a killed driver: the resumed search replays it
            # under a new Ray trial id; the run it already has is the one that counts.
            self._runs[tid] = adopted
            self._done.add(tid)
            self.client.set_tag(adopted, "hybridnas.ray_trial_id", tid)
            return
        spec = ArchSpec.from_dict(cfg["arch"], warn=False)
        number = str(cfg.get("trial_number", tid))
        client = self.client
        run = client.create_run(
            self.experiment_id,
            run_name=self._name(cfg, spec),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "hybridnas.kind": "trial",
                "hybridnas.trial": number,
                "hybridnas.ray_trial_id": tid,
                **self._shared,
                "hybridnas.arch": run_names.arch_line(spec),
                "hybridnas.arch_hash": spec.arch_hash(),
                "hybridnas.status": "running",
                "hybridnas.optuna_params": json.dumps(cfg.get("optuna_params") or {}, sort_keys=True),
                # An ablation's trials carry their key and factor/value/seed/variant tags.
                **({"hybridnas.run_key": cfg["run_key"]} if cfg.get("run_key") else {}),
                **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
            },
        )
        run_id = run.info.run_id
        self._runs[tid] = run_id
        log_params(client, run_id, spec.flat_params())
        predicted = cfg.get("predicted") or {}
        log_metrics(client, run_id, {k: predicted.get(k) for k in ARCH_METRICS}, step=0)
        client.log_text(run_id, spec.to_yaml(), "arch.yaml")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = trial.trial_id
        run_id = self._runs.get(tid)
        if run_id is None or tid in self._done or result.get("status") != "running":
            return
        epoch = int(result.get("epoch", 0))
        log_metrics(self.client, run_id, {k: result.get(k) for k in EPOCH_METRICS}, step=epoch)
        self._epochs_logged[tid] = epoch

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = dict(trial.last_result or {})
        status = result.get("status")
        if status == "running" and self.stopping and int(result.get("epoch") or 0) > 0:
            status = STATUS_STOPPED  # the scheduler stopped it at this rung
        elif status not in FINISHED:  # returned without a final report: a bug, not a result
            status, result["error"] = "failed", "the trial ended without reporting a result"
        self._finish(trial, status, result, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Only worker failures get here (the trainable records its own exceptions), after the
        # retries of search.max_failures are spent.
        error = None
        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - the error file may live on a lost node
            pass
        result = dict(trial.last_result or {})
        result["error"] = str(error or "the trial's worker died or failed (Ray recorded no error)")
        self._finish(trial, "failed", result, trials)

    # ---- helpers ---------------------------------------------------------------------------

    def _finish(self, trial: Any, status: str, result: dict, trials: list) -> None:
        tid = trial.trial_id
        if tid in self._done:
            return
        if tid not in self._runs:
            self.on_trial_start(0, trials, trial)
        run_id = self._runs[tid]
        client = self.client
        cfg = trial_config(trial)
        number = str(cfg.get("trial_number", tid))
        if status != "infeasible":  # an untrained run has no training time, not a zero one
            log_metrics(client, run_id, {k: result.get(k) for k in TRAINING_METRICS if result.get(k)}, step=0)
        epoch = int(result.get("epoch", 0) or 0)
        if status in ("ok", STATUS_STOPPED) and epoch:
            log_metrics(client, run_id, {"epochs_trained": epoch}, step=0)
        if status == "ok" and epoch and self._epochs_logged.get(tid, 0) != epoch:
            # The curve's last point is the final accuracy: logged here only when no epoch report
            # carried it (a trial reports its epochs as it goes; this is the exception).
            log_metrics(client, run_id, {k: result.get(k) for k in EPOCH_METRICS}, step=epoch)
        tags = {"hybridnas.status": status}
        if status == STATUS_STOPPED:
            tags["hybridnas.rung"] = str(int(result.get("epoch") or result.get("epochs_trained") or 0))
        for key, tag in (
            ("hostname", "hybridnas.host"),
            ("node_id", "hybridnas.node_id"),
            ("precision", "hybridnas.precision"),
        ):
            if result.get(key):
                tags[tag] = result[key]
        if status == "failed":
            tags["hybridnas.error"] = _clip(result.get("error") or "unknown error")
        if status == "infeasible":
            tags["hybridnas.violations"] = _clip(result.get("violations") or "")
        set_tags(client, run_id, tags)
        if status == "failed" and result.get("traceback"):
            client.log_text(run_id, str(result["traceback"]), "error.txt")
        self._log_dataset(run_id, result.get("dataset"))
        client.set_terminated(run_id, RUN_STATUS[status])
        if status in run_names.STATUS_MARKS:
            from hybridnas.search_space.spec import ArchSpec

            rename(
                client,
                run_id,
                run_names.marked(self._name(cfg, ArchSpec.from_dict(cfg["arch"], warn=False)), status),
            )
        self._done.add(tid)
        self._counts[status] += 1
        if status == "ok" and not self.repeats:
            self._add_to_front(result, number)
        if not self.repeats:  # the parent's summary counts the search's trials, not the repeats
            self._log_progress()
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id != tid)
        self._print(self._line(number, status, result, running))

    def _name(self, cfg: Mapping[str, Any], spec: Any) -> str:
        """The child run's name before its outcome marks (`runners.run_names`)."""
        tags = cfg.get("tags") or {}
        if "variant" in tags:  # an ablation's trial
            return run_names.ablation_name(tags["variant"], tags.get("seed", "?"))
        base = run_names.trial_name(
            cfg.get("trial_number", "?"),
            run_names.digits(self.total_trials),
            run_names.varied_summary(spec, self.varied),
        )
        repeat = tags.get("hybridnas.seed") if tags.get("hybridnas.repeat_of") else None
        return run_names.marked(base, repeat_seed=repeat)

    def _log_dataset(self, run_id: str, info: Any) -> None:
        """The data the trial trained on, as dataset inputs of its run and (once) of the parent."""
        if not info:
            return
        data = json.loads(info) if isinstance(info, str) else dict(info)
        log_dataset(self.client, run_id, data)
        if not self._dataset_logged:
            log_dataset(self.client, self.parent_run_id, data)
            self._dataset_logged = True

    def _log_progress(self) -> None:
        """The parent's summary after each finished trial (step = trials finished): counts by
        status, the best value of each objective and, with several, the hypervolume both raw and
        as the share of its reference box (0-1)."""
        n_done = sum(self._counts.values())
        metrics: dict[str, float] = {f"n_{s}": n for s, n in self._counts.items()}
        metrics["n_done"] = n_done
        if self._hv is not None and self._hv.points:
            for j, (m, mode) in enumerate(self.objectives):
                column = [p[j] for p in self._hv.points]
                metrics[f"best_{m}"] = max(column) if mode == "max" else min(column)
            if len(self.objectives) > 1:
                metrics["hypervolume"] = self._hv.value
                norm = self._hv.normalized
                if norm is not None:
                    metrics["hypervolume_norm"] = norm
        log_metrics(self.client, self.parent_run_id, metrics, step=n_done)

    def _add_to_front(self, metrics: Mapping[str, Any], number: str) -> None:
        if self._hv is None:
            return
        values = {m: metrics.get(m) for m, _ in self.objectives}
        if not all(_finite(v) for v in values.values()):
            return
        first = self._hv.reference is None
        self._hv.add({m: float(v) for m, v in values.items()})
        if first:
            set_tags(
                self.client,
                self.parent_run_id,
                {"hybridnas.hv_reference": json.dumps(list(map(float, self._hv.reference)))},
            )
        metric, mode = self.objectives[0]
        v = float(values[metric])
        if self._best is None or (v > self._best[0] if mode == "max" else v < self._best[0]):
            self._best = (v, number)

    def _summary(self) -> str:
        c = self._counts
        total = f"/{self.total_trials}" if self.total_trials else ""
        parts = ", ".join(f"{n} {s}" for s, n in c.items() if n or s in ("ok", "failed", "infeasible"))
        text = f"{sum(c.values())}{total} done ({parts})"
        if self._best is not None:
            metric = self.objectives[0][0]
            text += f"; best {metric} {human(self._best[0], metric)} (trial {self._best[1]})"
        if len(self.objectives) > 1 and self._hv is not None and self._hv.points:
            text += f", hypervolume {self._hv.value:.4g}"
        away = getattr(self.client, "status", lambda: "")()
        return text + (f"; {away}" if away else "")

    def _line(self, number: str, status: str, result: Mapping[str, Any], running: int) -> str:
        shown = [m for m, _ in self.objectives] + [
            m for m in ("val_acc", "macs", "params") if m not in dict(self.objectives)
        ]
        if status in ("ok", STATUS_STOPPED):
            what = "  ".join(f"{m} {human(result.get(m), m)}" for m in shown if _finite(result.get(m)))
            what += f"  {float(result.get('train_time_s', 0.0)):.1f}s"
            if status == STATUS_STOPPED:
                what = f"at epoch {int(result.get('epoch') or result.get('epochs_trained') or 0)}: {what}"
        elif status == "infeasible":
            what = f"not trained: {result.get('violations', '')}"
        else:
            what = _clip(headline(str(result.get("error") or "")), 140)
        elapsed = time.monotonic() - self._t0
        return (
            f"[{elapsed:6.0f}s] {'repeat' if self.repeats else 'trial'} {number:>3} {status:<10} {what}\n"
            f"          {self._summary()}; {running} running"
        )
