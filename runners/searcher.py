"""The searcher: Optuna's ask-and-tell behind Ray Tune's public `Searcher` interface.

`ArchSuggester` turns one Optuna trial into one architecture (define-by-run through
``SearchSpace.suggest``), computes its MACs, params and predicted latency in the driver and gives
Optuna the constraint values; `ArchSearcher` asks Optuna for a trial per Tune trial, skips
architectures this search already proposed and tells Optuna what each trial really was.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ray import cloudpickle
from ray.tune.search import Searcher

from hybridnas.runners.files import atomic_write
from hybridnas.runners.internals import picklable_sampler, restore_sampler_locks, sampler_without_locks
from hybridnas.runners.trial import STATUS_INFEASIBLE, STATUS_OK, STATUS_STOPPED, proposal
from hybridnas.search_space.errors import SpecError

MAX_RESAMPLE = 50  # duplicate proposals skipped before a duplicate is accepted (tiny spaces)


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
            from hybridnas.runners.latency_table import LatencyTable
            from hybridnas.search_space.space import SearchSpace
            from hybridnas.search_space.spec import InputSpec

            self._input = InputSpec.from_dict(self.input_dict)
            self._space = SearchSpace.from_dict(self.space_dict, input=self._input)
            self._table = LatencyTable(self.table_path)

    def measures(self, spec: Any) -> dict[str, float]:
        """MACs, flops, params (exact counts) and the predicted latency of ``spec``."""
        from hybridnas.runners.latency import LatencyContext
        from hybridnas.runners.latency_table import predict_latency
        from hybridnas.runners.macs import profile_spec

        self._lazy()
        prof = profile_spec(spec)
        lat = predict_latency(spec, self._table, LatencyContext.from_config(self.latency))
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
            return proposal(**base, build_error=f"{type(e).__name__}: {e}")
        violations = _violations(m, self.constraints)
        for name, value in violations.items():
            trial.set_constraint(name, value)
        trial.set_user_attr("arch_hash", h)
        feasible = all(v <= 0 for v in violations.values())
        return proposal(
            **base,
            predicted=m,
            feasible=feasible,
            violations="" if feasible else _describe_violations(m, self.constraints),
        )


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
        return picklable_sampler(optuna.samplers.NSGAIISampler(seed=seed, population_size=population))
    if sampler == "nsga3":
        return picklable_sampler(optuna.samplers.NSGAIIISampler(seed=seed, population_size=population))
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sampler == "grid":
        return optuna.samplers.GridSampler(grid_space, seed=seed)
    raise SpecError("search.sampler", f"{sampler!r} is not one of tpe, nsga2, nsga3, random, grid")


class ArchSearcher(Searcher):
    """Optuna's ask-and-tell behind Ray Tune's public `Searcher` interface.

    - ok / infeasible trials are told COMPLETE with their objective values (an infeasible one never
      trained: accuracy and training time 0; its constraint values, set when it was sampled, mark
      it infeasible, so constrained samplers rank it below every feasible trial);
    - failed trials (raised, diverged, worker lost) are told FAIL: no value is made up for them;
    - trials a scheduler stopped at a rung (asha, moasha) are told COMPLETE with their values at
      that rung, the rung (its epoch) recorded as the user attribute ``rung``: so NSGA-II's
      generations fill up and TPE sees them among the worse trials, where marking them pruned would
      leave NSGA-II (which breeds from complete trials only) in its random first generation for
      most of a moasha search (`hybridnas bench efficiency` replays both samplers this way);
    - an architecture this search already proposed is not run again: its Optuna trial is closed
      (with the twin's values when known) and another one is asked for.

    The whole state (the study with its sampler, the open trials, what was proposed) is pickled by
    `save` and read back by `restore`, which Tune calls on ``Tuner.restore``.
    """

    def __init__(
        self,
        suggester: ArchSuggester,
        sampler: Any,
        objectives: Sequence[tuple[str, str]],
        replay_name: str = "",
        stopping: bool = False,
    ) -> None:
        """``stopping``: a scheduler may stop trials at a rung; a trial that completes on a per-epoch
        result was stopped there (without a scheduler that would be a failure)."""
        super().__init__(metric=None, mode=None)
        import optuna

        self.suggester = suggester
        self.objectives = [(str(m), str(mode)) for m, mode in objectives]
        self.replay_name = replay_name
        directions = ["maximize" if mode == "max" else "minimize" for _, mode in self.objectives]
        self.study = optuna.create_study(directions=directions, sampler=sampler)
        self.open: dict[str, int] = {}  # Ray trial id -> Optuna trial number, until told
        self.arch_values: dict[str, list[float]] = {}  # arch hash -> objective values told
        self.trial_hash: dict[str, str] = {}  # Ray trial id -> arch hash
        self.stopping = stopping
        self._resumed = False
        self._asked: dict[int, Any] = {}  # Optuna trial number -> its Trial, until told (not pickled)

    # -- Tune's Searcher interface ----------------------------------------------------------

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True  # the objectives come from the experiment file, not from Tune

    def suggest(self, trial_id: str) -> dict | None:
        if self._resumed:
            self._enqueue_lost_trials()
        for _ in range(MAX_RESAMPLE):
            trial = self.study.ask()
            self._asked[trial.number] = trial
            config = self.suggester(trial)
            if "duplicate_of" not in config:
                break
            values = self.arch_values.get(config["arch_hash"])
            self._tell(trial.number, values)
        else:
            # The space is (nearly) exhausted: take the sampler's next choice even if trained before.
            self._tell(trial.number, None)
            trial = self.study.ask()
            self._asked[trial.number] = trial
            self.suggester.allow_duplicates = True
            try:
                config = self.suggester(trial)
            finally:
                self.suggester.allow_duplicates = False
        self.open[trial_id] = trial.number
        self.trial_hash[trial_id] = config.get("arch_hash", "")
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # per-epoch results go to the scheduler, not to Optuna

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.open.pop(trial_id, None)
        if number is None:
            return
        result = result or {}
        values = None if error else self.values_of(result)
        rung = self.stopped_at(result) if values is not None else None
        if rung is not None and number in self._asked:
            self._asked[number].set_user_attr("rung", rung)
        self._tell(number, values)
        if values is not None and self.trial_hash.get(trial_id):
            self.arch_values[self.trial_hash[trial_id]] = values

    def save(self, checkpoint_path: str) -> None:
        atomic_write(checkpoint_path, pickle.dumps(self))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f).__getstate__())
        self._resumed = True

    # Tune pickles the searcher with the Tuner (and `save` does): the study travels as one blob
    # pickled without the locks some Optuna samplers hold (see `runners.internals`).
    def __getstate__(self) -> dict:
        with sampler_without_locks(self.study.sampler):
            blob = cloudpickle.dumps(self.study)
        return {**{k: v for k, v in self.__dict__.items() if k not in ("study", "_asked")}, "study": blob}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        blob = state.pop("study")
        self.__dict__.update(state)
        self.__dict__.setdefault("stopping", False)
        self._asked = {}  # a trial open across a resume is told by its number, without its rung
        self.study = pickle.loads(blob) if isinstance(blob, bytes) else blob
        restore_sampler_locks(self.study.sampler)

    # -- helpers ------------------------------------------------------------------------------

    def stopped_at(self, result: Mapping[str, Any]) -> int | None:
        """The rung (epoch) a scheduler stopped this trial at, None when it was not stopped."""
        status = result.get("status")
        running = status == "running" and self.stopping
        if (running or status == STATUS_STOPPED) and int(result.get("epoch") or 0) > 0:
            return int(result["epoch"])
        return None

    def values_of(self, result: Mapping[str, Any]) -> list[float] | None:
        """The objective values Optuna is told for a finished trial (a stopped one: at its rung), or
        None (told FAIL)."""
        status = result.get("status")
        if status not in (STATUS_OK, STATUS_INFEASIBLE) and self.stopped_at(result) is None:
            return None
        values = []
        for metric, _ in self.objectives:
            v = result.get(metric)
            if v is None and status == STATUS_INFEASIBLE:
                v = 0.0  # never trained: no accuracy, no training time
            if v is None or not math.isfinite(float(v)):
                return None
            values.append(float(v))
        return values

    def _tell(self, number: int, values: list[float] | None) -> None:
        from optuna.trial import TrialState

        trial = self._asked.pop(number, number)  # the Trial object when at hand (user attributes set)
        try:
            if values is None:
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, values if len(values) > 1 else values[0])
        except Exception as e:  # noqa: BLE001 - a bookkeeping problem must not stop the search
            # GridSampler stops the study once every grid point was asked (the tell went through).
            if "Study.stop" not in str(e):
                logging.getLogger(__name__).warning("optuna tell failed for trial %s: %s", number, e)

    def _enqueue_lost_trials(self) -> None:
        """Trials that finished after Ray's last snapshot of a killed driver are unknown to the
        restored Tune and Optuna; ask for their parameters first, so they are replayed (from
        MLflow, see `runners.resume.Replays`) rather than lost or trained again."""
        import ray

        self._resumed = False
        try:
            actor = ray.get_actor(self.replay_name)
        except ValueError:
            return
        known = set(self.trial_hash.values())
        for arch_hash, params in ray.get(actor.lost_params.remote()).items():
            if arch_hash not in known and params:
                self.study.enqueue_trial(params, skip_if_exists=False)
