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
not knowing it at all: its result is then replayed from MLflow (`_Replays`; lost trials are asked
of Optuna again by their parameters) instead of being trained again, and the count stays right.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import pickle
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hybridnas.search_space.errors import SpecError, UserError

STATE_FILE = "state.json"
TUNE_DIR = "tune"
# Test hook, read by the driver: "3:raise,5:diverge,6:crash" (Optuna trial numbers). raise: the
# trainable raises; diverge: it trains with an infinite learning rate; crash: its process exits.
FAULTS_ENV = "HYBRIDNAS_FAULTS"
MAX_RESAMPLE = 50  # duplicate proposals skipped before a duplicate is accepted (tiny spaces)
CALIBRATION_SAMPLES = 2000  # architectures drawn to cover the latency table of a space too big to enumerate
STATUS_OK, STATUS_FAILED, STATUS_INFEASIBLE = "ok", "failed", "infeasible"


class SearchError(UserError):
    """A search that cannot start or continue as asked (existing output, nothing to resume, ...)."""


# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker, possibly on another node)

_DATA_CACHE: dict[str, Any] = {}  # per worker process; reuse_actors keeps the process across trials


def _dataset(data_cfg: Mapping[str, Any]) -> Any:
    key = json.dumps(dict(data_cfg), sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        from hybridnas.runners.data import load_dataset
        from hybridnas.search_space.config import DataConfig

        _DATA_CACHE.clear()  # one dataset per search; do not hold two in memory
        _DATA_CACHE[key] = load_dataset(DataConfig.from_dict(dict(data_cfg)))
    return _DATA_CACHE[key]


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (a direct call in a test)
        return ""


def _fault(config: Mapping[str, Any]) -> str | None:
    """The fault injected into this trial by ``HYBRIDNAS_FAULTS`` (tests only)."""
    for item in str(config.get("faults") or "").split(","):
        number, _, kind = item.partition(":")
        if number.strip() and number.strip() == str(config.get("trial_number")):
            return kind.strip()
    return None


def _replayed(config: Mapping[str, Any]) -> dict | None:
    """The result this architecture already has in MLflow, when a resumed search runs it again
    (see `_Replays`); None otherwise."""
    name = config.get("replay")
    if not name:
        return None
    import ray

    try:
        actor = ray.get_actor(name)
    except ValueError:
        return None  # no resume in progress: the usual case
    return ray.get(actor.get.remote(config.get("arch_hash")))


def hybridnas_trial(config: dict) -> None:
    """One trial: train ``config["arch"]`` and report per epoch, then the final metrics.

    Reports (``tune.report``) ``status: running`` once per epoch (epoch, train_loss, val_acc,
    imgs_per_s, epoch_time_s), then one final result with ``status`` ok | failed | infeasible,
    the driver-computed macs/flops/params/latency_ms, train_time_s and imgs_per_s. Never raises for
    a bad architecture or a diverging run: the error goes into the result.
    """
    from ray import tune

    started = time.time()
    # Whether this process had the trial's imports done before it got the trial (Ray's preloaded
    # workers, or an earlier trial on the same actor): a cold one pays ~4 s of imports in the trial.
    warm = all(m in sys.modules for m in WORKER_PRELOAD)
    replay = _replayed(config)
    if replay is not None:
        tune.report({**replay, "replayed": True})
        return
    base = {
        **config["predicted"],
        "trial_number": config.get("trial_number"),
        "arch_hash": config.get("arch_hash"),
        "started_at": started,
        "node_id": _node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "warm_start": warm,
    }
    if not config["feasible"]:
        tune.report(
            {**base, "status": STATUS_INFEASIBLE, "violations": config["violations"], "train_time_s": 0.0}
        )
        return
    epoch, t_train = 0, None
    try:
        from hybridnas.runners.train import train_model
        from hybridnas.search_space.config import TrainConfig
        from hybridnas.search_space.spec import ArchSpec

        if config.get("build_error"):
            raise RuntimeError(
                f"the driver could not build or measure this architecture: {config['build_error']}"
            )
        fault = _fault(config)
        if fault == "crash":
            os._exit(3)  # the worker process dies (as if killed by the OOM killer): Ray retries the trial
        if fault == "raise":
            raise RuntimeError(f"fault injected by {FAULTS_ENV} into trial {config.get('trial_number')}")
        spec = ArchSpec.from_dict(config["arch"], warn=False)
        cfg = TrainConfig.from_dict(config["train"])
        if fault == "diverge":
            cfg = cfg.replace(lr=float("inf"))  # an infinite step size: the loss turns NaN at once
        data = _dataset(config["data"])
        threads = cfg.threads or max(1, int(config.get("cpus") or 1))

        def on_epoch(m: dict) -> None:
            nonlocal epoch
            epoch = int(m["epoch"])
            tune.report({**base, **m, "status": "running"})

        t_train = time.perf_counter()
        res = train_model(spec, data, cfg, callback=on_epoch, threads=threads)
    except Exception as e:  # noqa: BLE001 - recorded as a failed trial; SystemExit (Tune's stop) passes
        tune.report(
            {
                **base,
                "status": STATUS_FAILED,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=20),
                "epoch": getattr(e, "epoch", epoch),  # TrainingDiverged says in which epoch
                "train_time_s": 0.0 if t_train is None else time.perf_counter() - t_train,
            }
        )
        return
    tune.report(
        {
            **base,
            "status": STATUS_OK,
            "epoch": res.epochs,
            "val_acc": res.val_acc,
            "train_loss": res.train_loss,
            "train_time_s": res.train_time_s,
            "imgs_per_s": res.imgs_per_s,
            "precision": res.precision,
        }
    )


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# The searcher (driver)


def _violations(measures: Mapping[str, float], constraints: Mapping[str, Any]) -> dict[str, float]:
    """Optuna constraint values, one per bound: relative excess, <= 0 when satisfied.

    Relative, so that a MACs excess and a latency excess weigh alike in Optuna's total violation.
    """
    out = {}
    for metric, b in constraints.items():
        v = float(measures[metric])
        if b.get("max") is not None:
            out[f"{metric}_max"] = (v - b["max"]) / max(abs(b["max"]), 1e-12)
        if b.get("min") is not None:
            out[f"{metric}_min"] = (b["min"] - v) / max(abs(b["min"]), 1e-12)
    return out


def _describe_violations(measures: Mapping[str, float], constraints: Mapping[str, Any]) -> str:
    from hybridnas.runners.pareto import human

    parts = []
    for metric, b in constraints.items():
        v = float(measures[metric])
        if b.get("max") is not None and v > b["max"]:
            parts.append(f"{metric} {human(v, metric)} > max {human(b['max'], metric)}")
        if b.get("min") is not None and v < b["min"]:
            parts.append(f"{metric} {human(v, metric)} < min {human(b['min'], metric)}")
    return "; ".join(parts)


class ArchSuggester:
    """The define-by-run function given to `OptunaSearch`: one architecture per Optuna trial.

    Returns the constants Tune puts into the trial's config: the architecture, its MACs/flops/params
    and predicted latency, whether it meets the constraints. Pickled with the searcher state (every
    couple of seconds), so it holds plain data only; the space and the latency table are rebuilt
    lazily after unpickling.
    """

    def __init__(
        self,
        space: dict,
        input: dict,
        constraints: Mapping[str, Mapping[str, float]],
        latency: Mapping[str, Any],
        table_path: str | None,
        grid: bool = False,
    ) -> None:
        self.space_dict = space
        self.input_dict = input
        self.constraints = {k: dict(v) for k, v in constraints.items()}
        self.latency = dict(latency)
        self.table_path = table_path
        self.grid = grid
        self.seen: dict[str, int] = {}  # arch hash -> first Optuna trial number that proposed it
        self.allow_duplicates = False
        self._space = self._table = self._input = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_space", "_table", "_input")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._space = self._table = self._input = None

    def _lazy(self) -> None:
        if self._space is None:
            from hybridnas.runners.measure import LatencyTable
            from hybridnas.search_space.space import SearchSpace
            from hybridnas.search_space.spec import InputSpec

            self._input = InputSpec.from_dict(self.input_dict)
            self._space = SearchSpace.from_dict(self.space_dict, input=self._input)
            self._table = LatencyTable(self.table_path)

    def measures(self, spec: Any) -> dict[str, float]:
        """MACs, flops, params (exact counts) and the predicted latency of ``spec``."""
        from hybridnas.runners.measure import predict_latency, profile_spec

        self._lazy()
        prof = profile_spec(spec)
        lat = predict_latency(
            spec,
            self._table,
            device=self.latency["device"],
            batch_size=self.latency["batch_size"],
            threads=self.latency["threads"],
        )
        return {
            "macs": int(prof["macs"]),
            "flops": int(prof["flops"]),
            "params": int(prof["params"]),
            "latency_ms": lat,
        }

    def __call__(self, trial: Any) -> dict:
        self._lazy()
        spec = self._space.suggest(trial, input=self._input, grid=self.grid)
        h = spec.arch_hash()
        if h in self.seen and not self.allow_duplicates:
            return {"duplicate_of": self.seen[h], "arch_hash": h}
        self.seen.setdefault(h, trial.number)
        base = {
            "arch": spec.to_dict(),
            "arch_hash": h,
            "trial_number": trial.number,
            # What Optuna sampled (before any repair): a resumed search can ask for it again.
            "optuna_params": dict(trial.params),
        }
        try:
            m = self.measures(spec)
        except Exception as e:  # noqa: BLE001 - a block that cannot build this architecture
            # The trial then fails at once with this error instead of stopping the whole search.
            return {
                **base,
                "predicted": {},
                "feasible": True,
                "violations": "",
                "build_error": f"{type(e).__name__}: {e}",
            }
        violations = _violations(m, self.constraints)
        for name, value in violations.items():
            trial.set_constraint(name, value)
        trial.set_user_attr("arch_hash", h)
        feasible = all(v <= 0 for v in violations.values())
        return {
            **base,
            "predicted": m,
            "feasible": feasible,
            "violations": "" if feasible else _describe_violations(m, self.constraints),
        }


def _make_searcher_class():
    """`ArchOptunaSearch`, defined on first use so that importing this module does not import Ray."""
    global ArchOptunaSearch
    if "ArchOptunaSearch" in globals():
        return ArchOptunaSearch
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class _ArchOptunaSearch(OptunaSearch):
        """Ray's `OptunaSearch`, telling Optuna what a hybridnas trial really was.

        - ok / infeasible trials are COMPLETE with their objective values (an infeasible one never
          trained: its accuracy is 0 and its training time 0, and its constraint values, set when
          it was sampled, mark it infeasible, so constrained samplers rank it below every
          feasible trial);
        - failed trials (raised, diverged, worker lost) are FAIL: no value is made up for them;
        - an architecture this search already proposed is not run again: the Optuna trial is
          closed (with the twin's values when known) and another one is asked for.
        """

        def __init__(
            self, *args: Any, objectives: Sequence[tuple[str, str]] = (), replay_name: str = "", **kw: Any
        ) -> None:
            super().__init__(*args, **kw)
            self.objectives = [tuple(o) for o in objectives]
            self.replay_name = replay_name
            self.arch_values: dict[str, list[float]] = {}  # arch hash -> objective values told
            self.trial_hash: dict[str, str] = {}  # Ray trial id -> arch hash
            self._resumed = False

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            self._resumed = True

        def _enqueue_lost_trials(self) -> None:
            """Trials that finished after Ray's last snapshot of a killed driver are unknown to the
            restored Tune and Optuna; ask for their parameters first, so they are replayed (from
            MLflow, see `_Replays`) rather than lost or trained again, and the count stays right."""
            import ray

            self._resumed = False
            try:
                actor = ray.get_actor(self.replay_name)
            except ValueError:
                return
            known = set(self.trial_hash.values())
            for arch_hash, params in ray.get(actor.lost_params.remote()).items():
                if arch_hash not in known and params:
                    self._ot_study.enqueue_trial(params, skip_if_exists=False)

        def suggest(self, trial_id: str) -> dict | None:
            if self._resumed:
                self._enqueue_lost_trials()
            config = None
            for _ in range(MAX_RESAMPLE):
                config = super().suggest(trial_id)
                if config is None or "duplicate_of" not in config:
                    break
                ot_trial = self._ot_trials.pop(trial_id)
                values = self.arch_values.get(config["arch_hash"])
                if values is not None:
                    self._ot_study.tell(ot_trial, values if len(values) > 1 else values[0])
                else:
                    self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            if config is not None and "duplicate_of" in config:
                # The space is (nearly) exhausted: take the sampler's next choice even if trained before.
                self._ot_study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)
                self._space.allow_duplicates = True
                try:
                    config = super().suggest(trial_id)
                finally:
                    self._space.allow_duplicates = False
            if config is not None:
                self.trial_hash[trial_id] = config.get("arch_hash", "")
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # no pruning: per-epoch results carry accuracy only, not every objective

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            status = (result or {}).get("status")
            values = None
            if not error and status in (STATUS_OK, STATUS_INFEASIBLE):
                values = []
                for metric, _ in self.objectives:
                    v = result.get(metric)
                    if v is None and status == STATUS_INFEASIBLE:
                        v = 0.0  # never trained: no accuracy, no training time
                    if v is None or not math.isfinite(float(v)):
                        values = None
                        break
                    values.append(float(v))
            try:
                if values is None:
                    self._ot_study.tell(ot_trial, state=TrialState.FAIL)
                else:
                    self._ot_study.tell(ot_trial, values if len(values) > 1 else values[0])
                    h = self.trial_hash.get(trial_id)
                    if h:
                        self.arch_values[h] = values
            except Exception as e:  # noqa: BLE001 - a bookkeeping problem must not stop the search
                logging.getLogger(__name__).warning("optuna tell failed for trial %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)

    _ArchOptunaSearch.__name__ = _ArchOptunaSearch.__qualname__ = "ArchOptunaSearch"
    _ArchOptunaSearch.__module__ = __name__
    ArchOptunaSearch = _ArchOptunaSearch  # module-level name: pickle finds it on restore
    return ArchOptunaSearch


def __getattr__(name: str) -> Any:
    # Unpickling a saved searcher looks up `runners.search.ArchOptunaSearch` before anything built it.
    if name == "ArchOptunaSearch":
        return _make_searcher_class()
    raise AttributeError(name)


class _PicklableLock:
    """A `threading.Lock` for ``with`` blocks that pickles as a new, unlocked lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def __reduce__(self) -> tuple:
        return (_PicklableLock, ())


def _picklable(sampler: Any) -> Any:
    """Optuna 5.1's NSGA-II/III samplers keep a `threading.Lock` in ``_thread_lock`` (used only in
    ``with`` blocks) and no ``__getstate__``, so they cannot be pickled, and Ray Tune pickles the
    searcher with its sampler when the Tuner is built: every nsga2/nsga3 search failed with "cannot
    pickle '_thread.lock' object". A sampler that pickles is left alone."""
    import optuna

    try:
        pickle.dumps(sampler)
        return sampler
    except TypeError:
        if not hasattr(sampler, "_thread_lock"):
            raise
    log = logging.getLogger(__name__)
    log.debug("optuna %s: %s holds an unpicklable lock; swapped", optuna.__version__, type(sampler).__name__)
    sampler._thread_lock = _PicklableLock()
    pickle.dumps(sampler)  # anything else unpicklable fails here, not in the Tuner
    return sampler


def make_sampler(sampler: str, seed: int, trials: int, grid_space: dict | None = None) -> Any:
    """The Optuna sampler named in ``search.sampler``, seeded.

    NSGA-II/III get a population of about a third of the trials (at least 4, at most 50): with
    Optuna's default of 50 a 24-trial search would never leave its random first generation.
    TPE starts after a quarter of the trials (2..10) and samples parameters jointly
    (multivariate, grouped for the conditional mixer options).
    """
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(2, min(10, trials // 4)), multivariate=True, group=True
        )
    population = max(4, min(50, trials // 3))
    if sampler == "nsga2":
        return _picklable(optuna.samplers.NSGAIISampler(seed=seed, population_size=population))
    if sampler == "nsga3":
        return _picklable(optuna.samplers.NSGAIIISampler(seed=seed, population_size=population))
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sampler == "grid":
        return optuna.samplers.GridSampler(grid_space, seed=seed)
    raise SpecError("search.sampler", f"{sampler!r} is not one of tpe, nsga2, nsga3, random, grid")


class _Replays:
    """A Ray actor, alive during a resumed search, holding the trials MLflow says finished.

    Ray snapshots a search every couple of seconds, so a driver killed right after a trial
    finished may come back with that trial marked running, or not knowing it at all. Keyed by
    architecture hash (unique within a search): `hybridnas_trial` reports the stored result
    instead of training again, and the searcher asks Optuna for the lost trials' parameters first.
    """

    def __init__(self, results: dict[str, dict], params: dict[str, dict]) -> None:
        self.results = results
        self.params = params

    def get(self, arch_hash: str) -> dict | None:
        return self.results.get(arch_hash)

    def lost_params(self) -> dict[str, dict]:
        return self.params


# ---------------------------------------------------------------------------------------------
# Latency table


def calibrate_latency(
    space: Any, input: Any, latency: Any, table_path: str | None = None, stream: Any = None, seed: int = 0
) -> dict[str, Any]:
    """Calibrate the latency table for this space before any trial runs (`runners.measure.calibrate_table`).

    Small spaces are enumerated; bigger ones are covered by ``CALIBRATION_SAMPLES`` random draws
    (a unit the draws missed is measured when first met). Every unit is measured in context and
    about a hundred architectures end to end, to which the unit entries are refit. What the table
    has already (a previous search, same machine, same code) is not measured again.
    Returns ``{"units", "measured", "timed", "fit", "seconds", "path", "broken"}``.
    """
    import optuna
    from hybridnas.runners.measure import (
        LatencyTable,
        _context_key,
        _resolve_device,
        _resolve_dtype,
        calibrate_table,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    table = LatencyTable(table_path)
    # A space calibrated before in this context (machine, threads, batch, torch, block code) is
    # marked in the table: a repeated search skips drawing and checking its 2,000 architectures.
    context = _context_key(
        _resolve_device(latency.device), latency.batch_size, latency.threads, _resolve_dtype(None), "wall"
    )
    what = {"space": space.to_dict(), "input": input.to_dict(), "samples": CALIBRATION_SAMPLES, "seed": seed}
    marker = f"{context}||space|{hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]}"
    done = table.get(marker)
    if done is not None:
        return {
            "units": done["units"],
            "measured": 0,
            "timed": 0,
            "fit": done["fit"],
            "broken": done["broken"],
            "seconds": time.perf_counter() - t0,
            "path": str(table.path),
        }
    if space.size(input) <= CALIBRATION_SAMPLES:
        specs = space.enumerate(input)
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        specs = [space.suggest(study.ask(), input=input, grid=False) for _ in range(CALIBRATION_SAMPLES)]
    res = calibrate_table(
        specs,
        table,
        device=latency.device,
        batch_size=latency.batch_size,
        threads=latency.threads,
        seed=seed,
    )
    if not res["broken"]:  # a broken architecture may be fixed by a code change: check again next time
        summary = {k: res[k] for k in ("units", "fit", "broken")}
        table.put(marker, {"ms": 0.0, **summary})
        table.save()
    return {**res, "seconds": time.perf_counter() - t0, "path": str(table.path)}


# ---------------------------------------------------------------------------------------------
# Output directory state


def _read_state(out: Path) -> dict | None:
    path = out / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SearchError(f"{path} is unreadable ({e}); remove it or use another --out") from None


def _write_state(out: Path, state: dict) -> None:
    from hybridnas.runners.export import atomic_write

    atomic_write(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _fingerprint(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolved(exp: Any) -> dict:
    d = exp.to_resolved_dict()
    d.pop("out_dir", None)  # --out may move; the search is the same
    d.pop("tracking", None)
    return d


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
    return exp


# ---------------------------------------------------------------------------------------------
# Ray


def _quiet_env() -> None:
    # Before Ray Tune is imported: these are read at import or controller start.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network call home
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record: no CSV/JSON/TB
    # Experiment snapshots (trial states + Optuna) every 2 s instead of Ray's adaptive >= 10 s, so a
    # killed driver loses little; a snapshot of a few dozen trials costs milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0 on restore too
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Per-epoch and infeasible results lack some objectives by design (the searcher handles them).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


# Imported by every worker process of a Ray started here, before it takes work (Ray's
# ``preload_python_modules``): torch (with torch._dynamo, which the optimizers import on first
# use), Tune's function-trainable machinery and this package's training path: about 4 s of imports
# per process (on this 2-core machine) otherwise paid by the first trial on it.
WORKER_PRELOAD = (
    "torch",
    "torch._dynamo",
    "ray.tune.trainable.function_trainable",
    "hybridnas.runners.search",
    "hybridnas.runners.train",
    "hybridnas.runners.data",
    "hybridnas.search_space.build",
)


_LOCAL_RAY_SESSION: str | None = None  # the job id of the Ray that `init_ray` started in this process


def _ray_started_here() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_job_id() == _LOCAL_RAY_SESSION


@contextlib.contextmanager
def _trial_actors_on_prestarted_workers(local: bool | None = None) -> Iterator[None]:
    """Let Tune's trial actors run on the workers Ray prestarted (and preloaded) at ``ray.init``.

    Tune gives its trial actors a runtime environment of a few environment variables
    (``PL_DISABLE_FORK=1`` and some propagated from the driver: ray.tune.execution.class_cache).
    Ray only hands an actor an idle worker of the same runtime environment, and it prestarts
    workers with none, so every trial actor got a fresh process and imported torch again (measured:
    the second slot's first trial started 7 s after Tune asked for it). For a Ray started by this
    process the variables are already in every worker's environment (inherited from the driver),
    so the trial actors can go without: the class cache's variable lists are emptied while Tune
    runs. A cluster's workers do not inherit the driver's environment: left as Tune has it.
    """
    cache = None
    if local is None:  # the callers' case: is this the Ray `init_ray` started here?
        local = _ray_started_here()
    if local:
        with contextlib.suppress(ImportError):
            from ray.tune.execution import class_cache as cache
    if cache is None or not hasattr(cache, "DEFAULT_ENV_VARS") or not hasattr(cache, "ENV_VARS_TO_PROPAGATE"):
        yield
        return
    saved = cache.DEFAULT_ENV_VARS, cache.ENV_VARS_TO_PROPAGATE
    cache.DEFAULT_ENV_VARS, cache.ENV_VARS_TO_PROPAGATE = {}, set()
    try:
        yield
    finally:
        cache.DEFAULT_ENV_VARS, cache.ENV_VARS_TO_PROPAGATE = saved


def _package_for_cluster() -> str:
    """The ``hybridnas`` package as one folder that Ray can ship to a cluster's nodes.

    Installed from a wheel, that is the package's own folder. In an editable install the
    subpackages live in the repository's top-level folders, so they are copied into one temporary
    ``hybridnas/`` tree (Python sources and the example files only)."""
    import importlib
    import shutil
    import tempfile

    import hybridnas

    root = Path(hybridnas.__file__).parent
    subs = ("blocks", "search_space", "runners", "experiments")
    if all((root / s / "__init__.py").is_file() for s in subs):
        return str(root)
    stage = Path(tempfile.mkdtemp(prefix="hybridnas-ship-")) / "hybridnas"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root, stage, ignore=ignore)
    for sub in subs:
        src = Path(importlib.import_module(f"hybridnas.{sub}").__path__[0])
        shutil.copytree(src, stage / sub, ignore=ignore, dirs_exist_ok=True)
    return str(stage)


def init_ray(address: str | None = None, workers: int | None = None) -> bool:
    """Start (or join) Ray unless this process already did (Ray then stays up until the process
    exits, so a second search reuses it). Returns True when started here.

    ``workers`` (the trials that run at once) caps the worker processes a local Ray prestarts and
    keeps idle (Ray's ``num_workers_soft_limit``; one per CPU otherwise): each one imports torch
    (~300 MB) up front, which is waste beyond the trial slots on a many-core machine. More are
    still started when needed."""
    _quiet_env()
    import ray

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        try:
            # Ship this package's code with the job: nodes need only the dependencies installed.
            ray.init(address=address, runtime_env={"py_modules": [_package_for_cluster()]}, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SearchError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    else:
        # Ray starts one idle worker per CPU as soon as this driver connects; they import what a
        # trial needs while the driver sets the search up, and Tune's trial actors take them (see
        # `_trial_actors_on_prestarted_workers`): the first trials start without paying the imports.
        os.environ.setdefault("PL_DISABLE_FORK", "1")  # what Tune gives its actors; inherited here
        system: dict[str, Any] = {"preload_python_modules": list(WORKER_PRELOAD)}
        if workers:
            system["num_workers_soft_limit"] = max(1, min(int(workers), os.cpu_count() or 1))
        # "local": a new Ray here. With no address Ray joins whatever RAY_ADDRESS or
        # /tmp/ray/ray_current_cluster names (`ray start`, ray.cluster_utils in another process)
        # and then refuses num_cpus; a cluster is joined with --address only.
        ray.init(address="local", num_cpus=os.cpu_count(), _system_config=system, **common)
        global _LOCAL_RAY_SESSION
        _LOCAL_RAY_SESSION = ray.get_runtime_context().get_job_id()
    # Tune logs every failed trial with its traceback; the progress line and MLflow already say it.
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return True


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


def input_for(data_cfg: Any) -> Any:
    """The input the architectures get from the `DataConfig` ``data_cfg`` (a search's or an
    ablation's ``data:``): known from the dataset name, else from loading it here."""
    from hybridnas.search_space.experiment import known_input
    from hybridnas.search_space.spec import InputSpec

    known = known_input(data_cfg)
    if known is not None:
        return known
    data = _dataset(dataclasses.asdict(data_cfg))
    return InputSpec(channels=data.channels, size=data.size, classes=data.classes)


def _start_parent(client: Any, exp_id: str, exp: Any, out: Path, uri: str) -> str:
    from hybridnas.runners.tracking import log_params

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
    params = {
        "sampler": exp.search.sampler,
        "seed": exp.search.seed,
        "trials": exp.search.trials,
        "concurrency": exp.search.concurrency,
        "max_failures": exp.search.max_failures,
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


@contextlib.contextmanager
def _parent_guard(client: Any, run_id: str) -> Iterator[None]:
    """The parent run ends KILLED on Ctrl-C (a second one, or before Tune's loop), FAILED with the
    error on anything else, never stuck in RUNNING."""
    from hybridnas.runners.tracking import set_tags

    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="KILLED")
        raise
    except Exception as e:
        with contextlib.suppress(Exception):
            set_tags(client, run_id, {"hybridnas.error": f"{type(e).__name__}: {e}"[:5000]})
            client.set_terminated(run_id, "FAILED")
        raise


def _replays_from_mlflow(client: Any, exp_id: str, parent: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Results and Optuna parameters of the finished trials of a search, by architecture hash."""
    from hybridnas.runners.tracking import FINAL_METRICS, FINISHED, child_runs

    results, params = {}, {}
    for run in child_runs(client, exp_id, parent):
        tags = run.data.tags
        h, status = tags.get("hybridnas.arch_hash"), tags.get("hybridnas.status")
        if h and status in FINISHED:
            r = {k: run.data.metrics[k] for k in FINAL_METRICS if k in run.data.metrics}
            r.update(status=status, trial_number=tags.get("hybridnas.trial"), arch_hash=h)
            if status == STATUS_FAILED:
                r["error"] = tags.get("hybridnas.error", "")
            if status == STATUS_INFEASIBLE:
                r["violations"] = tags.get("hybridnas.violations", "")
            results[h] = r
            params[h] = json.loads(tags.get("hybridnas.optuna_params") or "{}")
    return results, params


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
    progress: bool = True,
    stream: Any = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) the search described by ``exp``; see the module docstring.

    Raises `SearchError` / `TrackingError` (UserErrors) for an output directory that already holds
    a search (without ``resume``), nothing to resume, an experiment changed since, an unusable
    tracking store or an unreachable cluster - all before any trial runs.
    """
    from hybridnas.runners import tracking as tr

    stream = stream or sys.stdout
    say = (lambda line: print(line, file=stream, flush=True)) if progress else (lambda line: None)
    t_start = time.time()
    _warm_imports()
    timings: dict[str, float] = {}
    out = Path(out_dir or exp.out_dir).expanduser().resolve()
    state = _read_state(out)
    faults = os.environ.get(FAULTS_ENV, "")
    fingerprint = _fingerprint({**_resolved(exp), "faults": faults})
    if state and not resume:
        raise SearchError(
            f"{out} already holds a search (MLflow run {state.get('parent_run_id')}); continue it with --resume, "
            "or start a fresh one with --out DIR"
        )
    if resume and not state:
        raise SearchError(f"nothing to resume in {out} (no {STATE_FILE}); start the search without --resume")
    if state and state.get("fingerprint") != fingerprint:
        raise SearchError(
            f"the experiment changed since the search in {out} started (file, --trials or --epochs); resume with "
            "the same settings, or start a fresh search with --out DIR"
        )

    input_spec = input_for(exp.data)  # may load the data here: a data error stops us before MLflow
    uri = tr.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    if state:
        if tracking_uri and uri != state["tracking_uri"]:
            raise SearchError(
                f"the search in {out} logs to {tr.redact(state['tracking_uri'])}, not {tr.redact(uri)}; "
                "resume without --tracking-uri"
            )
        uri = state["tracking_uri"]
    tr.check_tracking_uri(uri)
    if address:  # joining a running cluster costs this machine nothing: fail before MLflow has a run
        t = time.time()
        init_ray(address)
        timings["ray_init_s"] = time.time() - t
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
                "fingerprint": fingerprint,
                "trials": exp.search.trials,
                "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
                "finished": False,
            }
            # state.json is written once the Tuner exists (just before it runs): a search that
            # fails to start leaves nothing to "resume" and can simply be started again.
    except MlflowException as e:
        raise tr.TrackingError(f"MLflow at {tr.redact(uri)}: {e.message}") from None

    with _parent_guard(client, parent):
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
        say(f"mlflow: experiment {exp.tracking.experiment!r}, search run {parent} at {tr.redact(uri)}")

        timings["mlflow_s"] = time.time() - t_start - timings.get("ray_init_s", 0.0)
        # The latency table, while nothing else runs on this machine (a local Ray is not started yet).
        cal = calibrate_latency(exp.space, input_spec, exp.latency, seed=exp.search.seed)
        timings["latency_table_s"] = cal["seconds"]
        say(
            f"latency table: {cal['units']} units, {cal['measured']} measured now"
            + (f", {cal['timed']} architectures timed end to end" if cal["timed"] else "")
            + (
                f", refit: {100 * cal['fit']['within_10_after']:.0f}% of {cal['fit']['archs']} within 10%"
                if "within_10_after" in cal["fit"]
                else ""
            )
            + f" ({cal['seconds']:.1f}s), cached in {cal['path']}"
            + (
                f"; {len(cal['broken'])} architectures could not be built ({cal['broken'][0]})"
                if cal["broken"]
                else ""
            )
        )
        import torch

        torch.set_num_threads(
            1
        )  # the driver only profiles small models from now on; the cores are the trials'

        started_ray = False
        if not address:
            t = time.time()
            started_ray = init_ray(address, workers=exp.search.concurrency)
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
            cal["path"],
            grid=grid,
        )
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument")
        searcher_cls = _make_searcher_class()
        sampler = make_sampler(
            exp.search.sampler,
            exp.search.seed,
            n_trials,
            exp.space.grid_search_space(input_spec) if grid else None,
        )
        metrics, modes = [m for m, _ in objectives], [mode for _, mode in objectives]
        replay_name = f"hybridnas-replay-{parent}"
        searcher = searcher_cls(
            suggester,
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=sampler,
            objectives=objectives,
            replay_name=replay_name,
        )
        param_space = {
            "data": dataclasses.asdict(exp.data),
            "train": exp.train.to_dict(),
            "cpus": exp.resources.cpu,
            "faults": faults,
            "replay": replay_name,
        }
        trainable = tune.with_resources(hybridnas_trial, {"cpu": exp.resources.cpu, "gpu": exp.resources.gpu})
        callback = tr.MlflowSearchCallback(
            uri,
            exp_id,
            parent,
            objectives,
            constraints,
            total_trials=n_trials,
            progress=progress,
            stream=stream,
        )
        tune_path = out / TUNE_DIR
        replays = None
        if resume and tune.Tuner.can_restore(str(tune_path)):
            results, params = _replays_from_mlflow(client, exp_id, parent)
            if results:
                replays = ray.remote(num_cpus=0)(_Replays).options(name=replay_name).remote(results, params)
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, param_space=param_space)
            say(f"resuming {tune_path}: {len(results)} trials finished before")
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    num_samples=n_trials,
                    max_concurrent_trials=exp.search.concurrency,
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
        _write_state(out, state)
        t = time.time()
        try:
            with _trial_actors_on_prestarted_workers():
                grid_result = tuner.fit()
            timings["tune_s"] = time.time() - t
        finally:
            if replays is not None:
                ray.kill(replays)

    trials = _trial_rows(grid_result)
    finished = tr.child_runs(client, exp_id, parent)
    counts = {s: 0 for s in (STATUS_OK, STATUS_FAILED, STATUS_INFEASIBLE)}
    for run in finished:
        s = run.data.tags.get("hybridnas.status")
        if s in counts:
            counts[s] += 1
    interrupted = sum(counts.values()) < n_trials
    starts = [t["started_at"] for t in trials if t.get("started_at") and not t.get("replayed")]
    first_trial_s = (min(starts) - t_start) if starts and not resume else None

    front, exported, files = None, [], []
    if interrupted:
        client.update_run(parent, status="KILLED")
        say(
            f"interrupted: {sum(counts.values())}/{n_trials} trials finished; continue with: "
            f"hybridnas search {exp.path or '<file>'} --resume" + (f" --out {out}" if out_dir else "")
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
            front, exported, files = _finish(
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
        timings["finish_s"] = time.time() - t
        state["finished"] = True
        _write_state(out, state)
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
        wall_s=time.time() - t_start,
        first_trial_s=first_trial_s,
        calibration=cal,
        timings=timings,
        ui_command=tr.ui_command(uri),
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


FRONT_ROUNDS = 3  # latency rounds per front member, interleaved across members


def front_latencies(archs: Mapping[str, Any], input_size: Sequence[int], lat: Any) -> dict[str, float]:
    """End-to-end latency (ms) of each architecture in ``archs`` (key -> ArchSpec).

    Right after a search the machine is not quiet yet: processes of the Ray just shut down are still
    exiting, and a median taken then can come out twice too high. So each member is timed in
    ``FRONT_ROUNDS`` rounds of 30 runs, the rounds interleaved across members (a burst lands on one
    round of several members, not on all rounds of one), and its latency is the lowest round median.
    """
    from hybridnas.runners.measure import latency
    from hybridnas.search_space.build import build_model

    models = {k: build_model(a) for k, a in archs.items()}
    best: dict[str, float] = {}
    for _ in range(FRONT_ROUNDS):
        for k, model in models.items():
            ms = latency(
                model,
                input_size,
                device=lat.device,
                batch_size=lat.batch_size,
                threads=lat.threads,
                runs=30,
            )["median_ms"]
            best[k] = min(best.get(k, math.inf), ms)
    return best


def _finish(
    exp: Any,
    client: Any,
    uri: str,
    exp_id: str,
    parent: str,
    out: Path,
    objectives: list,
    input_spec: Any,
    say: Any,
    quiet: Callable[[], Any] | None = None,
) -> tuple[Any, list[Path], list[Path]]:
    """Measure the front, tag it, plot it, export it, log it all on the parent run.

    ``quiet()``, when given, returns once the machine is quiet enough to time the front (the
    search's Ray has shut down); the runs are read back from MLflow before waiting for it.
    """
    from hybridnas.runners.export import ExportError, export_arch, load_runs
    from hybridnas.runners.pareto import feasible_table, write_fronts
    from hybridnas.runners.tracking import front_tags, log_metrics

    try:
        df = load_runs(exp.tracking.experiment, uri, parent_run_id=parent)
    except ExportError as e:
        say(f"no Pareto front: {e}")
        return None, [], []
    t = feasible_table(df, objectives)
    front = t[t["pareto"]].reset_index(drop=True)
    # The plots first (they do not show the measured latency): drawn while the search's Ray exits.
    plots = write_fronts(df, objectives, out / "pareto", title=exp.name, csv=False)
    if quiet is not None:
        quiet()
    # End-to-end latency of the front, now that no trial competes for the cores.
    measured = front_latencies(
        {r["run_id"]: r["arch"] for r in front.to_dict("records")},
        (input_spec.channels, input_spec.size, input_spec.size),
        exp.latency,
    )
    for run_id, ms in measured.items():
        log_metrics(client, run_id, {"latency_ms_measured": ms})
    df["latency_ms_measured"] = [measured.get(rid, math.nan) for rid in df["run_id"]]
    front["latency_ms_measured"] = [measured.get(rid, math.nan) for rid in front["run_id"]]
    front_tags(client, measured.keys(), df["run_id"])
    files = write_fronts(df, objectives, out / "pareto", plots=False) + plots
    for f in files:
        client.log_artifact(parent, str(f))
    export_dir = out / "exported"
    export_dir.mkdir(parents=True, exist_ok=True)
    for old in export_dir.glob("*.yaml"):
        old.unlink()
    exported = []
    for r in front.to_dict("records"):
        path = export_dir / f"{exp.name}_trial{r['trial']}.yaml"
        exported.append(
            export_arch(
                r,
                exp.tracking.experiment,
                path,
                selection="pareto",
                tracking_uri=uri,
                recipe=df.attrs.get("recipe"),
            )
        )
    if exported:
        client.log_artifacts(parent, str(export_dir), "exported")
    client.set_tag(parent, "hybridnas.front_size", str(len(front)))
    return front, exported, files


# ---------------------------------------------------------------------------------------------
# CLI


def front_text(front: Any, objectives: Sequence[tuple[str, str]]) -> str:
    """The Pareto front as a fixed-width table: objectives, then the other metrics, then the architecture."""
    from hybridnas.runners.pareto import arch_summary, human

    metrics = [m for m, _ in objectives]
    for extra in ("val_acc", "macs", "params", "latency_ms", "latency_ms_measured"):
        if extra not in metrics:
            metrics.append(extra)
    header = ["trial", *[m.replace("latency_ms_measured", "measured_ms") for m in metrics], "architecture"]
    rows = [
        [str(r["trial"]), *[human(r.get(m), m) for m in metrics], arch_summary(r.get("arch"))]
        for r in front.to_dict("records")
    ]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(args: argparse.Namespace) -> int:
    """`hybridnas search FILE [--tracking-uri URI] [--address A] [--resume] [--out DIR] [--trials N] [--epochs N]`."""
    from hybridnas.search_space.experiment import Experiment

    exp = Experiment.from_yaml(args.experiment)
    exp = apply_overrides(exp, getattr(args, "trials", None), getattr(args, "epochs", None))
    res = run_search(
        exp,
        tracking_uri=getattr(args, "tracking_uri", None),
        address=getattr(args, "address", None),
        resume=bool(getattr(args, "resume", False)),
        out_dir=getattr(args, "out", None),
    )
    c = res.counts
    print(
        f"\nsearch {exp.name}: {sum(c.values())} trials ({c['ok']} ok, {c['failed']} failed, "
        f"{c['infeasible']} infeasible) in {res.wall_s / 60:.1f} min"
    )
    if res.interrupted:
        return 130
    if res.front is not None and len(res.front):
        goals = ", ".join(f"{m} ({mode})" for m, mode in res.objectives)
        print(f"Pareto front of {goals}: {len(res.front)} architectures")
        print(front_text(res.front, res.objectives))
    if res.exported:
        print("exported architectures:")
        for p in res.exported:
            print(f"  {_rel(p)}")
    if res.pareto_files:
        print(
            f"plots and table: {_rel(res.pareto_files[0].parent)}/ (pareto.csv, pareto_*.png, pareto_*.html)"
        )
    print(f"browse in MLflow: {res.ui_command}")
    if res.exported:
        print(f"train one further: hybridnas train {_rel(res.exported[0])} --epochs 10")
    return 0
