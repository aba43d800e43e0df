"""Which trials of a search keep training: fifo, Ray's ASHA, or multi-objective ASHA (moasha).

- `PromotionRule` is moasha's decision, a plain class with no Ray in it (the efficiency benchmark
  replays it against recorded learning curves, `runners/bench/efficiency.py`). Rungs sit at
  ``min_epochs * eta^k`` epochs below the full budget. When a trial reaches a rung, its vector
  (accuracy at the rung plus the cost objectives, known before training) joins the rung's
  records, and it goes on when it is among the best ``ceil(n / eta)`` of the ``n`` trials recorded
  there: ordered by non-dominated sorting, then crowding distance within a front (NSGA-II's
  measure: the more isolated point first, it spreads the front), exact ties in a fixed order
  (a hash of the trial's id: by arrival, equal later trials would never go on). That is
  asynchronous successive halving (Li et al. 2020, https://arxiv.org/abs/1810.05934) with the
  multi-objective ordering of MO-ASHA (Schmucker et al. 2021, https://arxiv.org/abs/2106.12639).
  Decisions are taken once, on arrival, as Ray's ASHA does (a stopped trial is not resumed later),
  so early arrivals are promoted more readily; over many trials about 1 in ``eta`` goes on.
  Decisions are final, so one more rule keeps them consistent: a trial dominated at a rung by a
  trial already stopped there is stopped too (a worse trial never goes on where a better one did
  not). The converse cannot hold without giving up the 1-in-eta rate: the first trial at a rung
  always goes on, and stopping trials that dominate it would have to be forbidden for good. A
  trial whose vector is not finite (a missing or NaN metric) is stopped without taking a place in
  the ranking.
- `MOASHAScheduler` is a thin Ray Tune `TrialScheduler` (on the public `FIFOScheduler`) that feeds
  the rule each trial's per-epoch results (``epoch``, ``val_acc`` and the cost metrics every
  result carries) and stops the trials it rejects.
- `make_scheduler` maps ``search.scheduler`` to one: ``fifo`` (Ray's FIFOScheduler), ``asha`` (Ray's
  ASHAScheduler on the first objective) or ``moasha``.

Ray's Tuner does not save a scheduler's state with the experiment: with ``state_path`` both
schedulers write theirs (atomically) after every decision at a rung and read it back on first use
after a ``--resume``, so a resumed search neither forgets rungs nor decides a trial twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from hybridnas.runners.files import atomic_write
from hybridnas.runners.pareto import objective_pairs, pareto_ranks
from hybridnas.search_space.experiment import rung_epochs

log = logging.getLogger(__name__)
CONTINUE, PROMOTE, STOP = "continue", "promote", "stop"
STATE_FORMAT = 1


def rungs_for(min_epochs: int, max_epochs: int, eta: int) -> tuple[int, ...]:
    """``min_epochs * eta^k`` for every k with a value below ``max_epochs`` (the full budget is no rung)."""
    if min_epochs < 1 or eta < 2:
        raise ValueError(f"need min_epochs >= 1 and eta >= 2, got {min_epochs} and {eta}")
    return rung_epochs(min_epochs, max_epochs, eta)


def crowding_distance(points: Any, modes: Sequence[str]) -> np.ndarray:
    """NSGA-II's crowding distance of each point within ``points`` (Deb et al. 2002, sec. III-B).

    Per objective, the points are sorted; the two ends get infinity and every other point the gap
    between its two neighbours, divided by the objective's range; the distance is the sum over
    objectives. Larger means more isolated, so a better spread when kept. Points with equal values
    get equal distances (computed on the distinct points). Rows with NaN/inf get NaN.
    """
    p = np.asarray(points, dtype=float) * np.array([-1.0 if m == "max" else 1.0 for m in modes])
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p).all(axis=1))
    if len(finite) == 0:
        return out
    unique, inverse = np.unique(p[finite], axis=0, return_inverse=True)
    dist = np.zeros(len(unique))
    if len(unique) <= 2:
        dist[:] = np.inf
    for j in range(unique.shape[1]):
        order = np.argsort(unique[:, j], kind="stable")
        col = unique[order, j]
        span = col[-1] - col[0]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0 and len(unique) > 2:
            dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    out[finite] = dist[inverse.reshape(-1)]
    return out


@dataclass
class Record:
    """One trial at one rung: its objective vector, when it arrived, and the decision taken."""

    trial: str
    values: tuple[float, ...]
    arrival: int
    promoted: bool
    finite: bool


def _tiebreak(rec: Record) -> tuple[str, int]:
    """Exact ties (same front, same crowding) in an order that is fixed but unrelated to arrival:
    by arrival, a later trial would never beat an equal earlier one and too few would go on."""
    return hashlib.sha1(rec.trial.encode()).hexdigest(), rec.arrival


class PromotionRule:
    """Multi-objective asynchronous successive halving: see the module docstring.

    >>> rule = PromotionRule([("val_acc", "max"), ("macs", "min")], rungs=[1, 3], eta=3)
    >>> rule.decide("a", 1, {"val_acc": 0.80, "macs": 2e6})  # the first at a rung goes on
    'promote'
    >>> rule.decide("b", 1, {"val_acc": 0.70, "macs": 3e6})  # dominated by a
    'stop'
    >>> rule.decide("a", 2, {"val_acc": 0.85, "macs": 2e6})  # between rungs
    'continue'
    """

    def __init__(self, objectives: Iterable[Any], rungs: Sequence[int], eta: int) -> None:
        self.objectives = objective_pairs(objectives)
        self.modes = [mode for _, mode in self.objectives]
        self.rungs = tuple(sorted({int(r) for r in rungs}))
        if not self.rungs or self.rungs[0] < 1:
            raise ValueError(f"rungs must be epochs >= 1, got {list(rungs)!r}")
        if eta < 2:
            raise ValueError(f"eta must be >= 2, got {eta}")
        self.eta = int(eta)
        self.records: dict[int, dict[str, Record]] = {r: {} for r in self.rungs}
        self.arrivals = 0
        self._sign = np.array([-1.0 if m == "max" else 1.0 for m in self.modes])

    @classmethod
    def for_budget(
        cls, objectives: Iterable[Any], min_epochs: int, max_epochs: int, eta: int
    ) -> PromotionRule:
        return cls(objectives, rungs_for(min_epochs, max_epochs, eta), eta)

    # -------------------------------------------------------------------------------- decisions

    def vector(self, values: Mapping[str, Any]) -> tuple[float, ...]:
        """The objective values of a result, NaN for a missing or non-numeric one."""
        out = []
        for metric, _ in self.objectives:
            v = values.get(metric)
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                out.append(math.nan)
        return tuple(out)

    def decide(self, trial: str, epoch: int, values: Mapping[str, Any]) -> str:
        """``promote`` or ``stop`` when ``epoch`` reaches a rung the trial has no decision for yet,
        the decision taken before when it has one (idempotent: a replayed result is decided alike),
        ``continue`` between rungs, and ``stop`` after any rung where it was stopped."""
        due = [r for r in self.rungs if r <= epoch]
        for r in due:
            rec = self.records[r].get(trial)
            if rec is not None and not rec.promoted:
                return STOP
        undecided = [r for r in due if trial not in self.records[r]]
        if not undecided:
            last = due[-1] if due else None
            return PROMOTE if last == epoch else CONTINUE
        rung = undecided[-1]  # a skipped report: decide at the highest rung reached, as Ray's ASHA does
        vec = self.vector(values)
        rec = Record(str(trial), vec, self.arrivals, False, all(math.isfinite(v) for v in vec))
        self.arrivals += 1
        self.records[rung][rec.trial] = rec
        if rec.finite:
            rec.promoted = self._promote(rung, rec)
        return PROMOTE if rec.promoted else STOP

    def _dominates(self, a: Sequence[float], b: Sequence[float]) -> bool:
        x, y = np.asarray(a) * self._sign, np.asarray(b) * self._sign
        return bool((x <= y).all() and (x < y).any())

    def ranking(self, rung: int) -> list[str]:
        """The trials recorded at ``rung`` with finite values, best first (the order `decide` uses)."""
        pool = [r for r in self.records[rung].values() if r.finite]
        if not pool:
            return []
        points = np.array([r.values for r in pool])
        ranks = pareto_ranks(points, self.modes)
        crowd = np.zeros(len(pool))
        for level in np.unique(ranks):
            members = np.flatnonzero(ranks == level)
            crowd[members] = crowding_distance(points[members], self.modes)
        order = sorted(range(len(pool)), key=lambda i: (ranks[i], -crowd[i], _tiebreak(pool[i])))
        return [pool[i].trial for i in order]

    def _promote(self, rung: int, rec: Record) -> bool:
        stopped = [r for r in self.records[rung].values() if r.finite and not r.promoted and r is not rec]
        if any(self._dominates(r.values, rec.values) for r in stopped):
            return False
        order = self.ranking(rung)
        return order.index(rec.trial) < math.ceil(len(order) / self.eta)

    # -------------------------------------------------------------------------------- summaries

    def reached(self) -> dict[int, int]:
        """How many trials reached each rung (epoch -> count), finite or not."""
        return {r: len(recs) for r, recs in self.records.items()}

    def promoted(self) -> dict[int, int]:
        """How many trials went on from each rung (epoch -> count)."""
        return {r: sum(rec.promoted for rec in recs.values()) for r, recs in self.records.items()}

    def highest_rung(self, trial: str) -> int | None:
        """The highest rung (epoch) ``trial`` reached, None before the first."""
        reached = [r for r in self.rungs if trial in self.records[r]]
        return reached[-1] if reached else None

    def stopped_at(self, trial: str) -> int | None:
        """The rung (epoch) where ``trial`` was stopped, None when it never was."""
        for r in self.rungs:
            rec = self.records[r].get(trial)
            if rec is not None and not rec.promoted:
                return r
        return None

    # -------------------------------------------------------------------------------- state

    def to_state(self) -> dict:
        """Plain JSON data (NaN as null) that `from_state` turns back into an equal rule."""
        return {
            "format": STATE_FORMAT,
            "objectives": [list(o) for o in self.objectives],
            "rungs": list(self.rungs),
            "eta": self.eta,
            "arrivals": self.arrivals,
            "records": {
                str(r): [
                    [
                        rec.trial,
                        [v if math.isfinite(v) else None for v in rec.values],
                        rec.arrival,
                        rec.promoted,
                    ]
                    for rec in recs.values()
                ]
                for r, recs in self.records.items()
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PromotionRule:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"scheduler state format {state.get('format')!r}, expected {STATE_FORMAT}")
        rule = cls(state["objectives"], state["rungs"], state["eta"])
        rule.arrivals = int(state["arrivals"])
        for r, rows in state["records"].items():
            for trial, values, arrival, promoted in rows:
                vec = tuple(math.nan if v is None else float(v) for v in values)
                rule.records[int(r)][trial] = Record(
                    trial, vec, int(arrival), bool(promoted), all(math.isfinite(v) for v in vec)
                )
        return rule


# ------------------------------------------------------------------------------------------------
# Ray Tune


class _Persistent:
    """Save the scheduler's state to ``state_path`` after each rung decision (with its own public
    ``save``), and read it back (``restore``) on first use in a process that did not write it:
    Ray's ``Tuner.restore`` brings the scheduler back as it was pickled at the start."""

    _state_path: str | None = None
    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = self._state_path
        if path and os.path.exists(path):
            try:
                self.restore(path)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - a broken state file: decide afresh, and say so
                log.warning("scheduler state %s unreadable (%s): rungs start empty", path, e)
            self._state_path, self._loaded = path, True  # the output folder may have moved since

    def _persist(self) -> None:
        if self._state_path:
            atomic_write(self._state_path, self.save)  # type: ignore[attr-defined]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": False}  # unpickled (restored Tuner): read the file again


class MOASHAScheduler(_Persistent, FIFOScheduler):
    """Ray Tune scheduler for moasha: runs trials in order (FIFO) and stops those `PromotionRule`
    rejects at a rung. Results without ``time_attr`` or with a ``status`` other than ``running``
    (infeasible, failed, final and replayed results) pass through."""

    def __init__(
        self,
        objectives: Iterable[Any],
        rungs: Sequence[int],
        eta: int,
        time_attr: str = "epoch",
        state_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.rule = PromotionRule(objectives, rungs, eta)
        self.time_attr = time_attr
        self._state_path = None if state_path is None else str(state_path)
        self._metric = self.rule.objectives[0][0]
        self._loaded = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives came with the constructor; the searcher's metric is not ours

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        epoch = result.get(self.time_attr)
        if epoch is None or result.get("status", "running") != "running":
            return TrialScheduler.CONTINUE
        before = self.rule.arrivals
        # Records are kept per architecture, not per Tune trial: a trial lost when a driver was
        # killed is asked again under a new id and must meet the decisions its first run got.
        key = str((trial.config or {}).get("arch_hash") or trial.trial_id)
        decision = self.rule.decide(key, int(epoch), result)
        if self.rule.arrivals != before:
            self._persist()
        return TrialScheduler.STOP if decision == STOP else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        reached, went_on = self.rule.reached(), self.rule.promoted()
        return "moasha: " + ", ".join(f"epoch {r}: {went_on[r]}/{reached[r]} on" for r in self.rule.rungs)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.rule.to_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.rule = PromotionRule.from_state(json.loads(Path(checkpoint_path).read_text()))


class PersistentASHAScheduler(_Persistent, ASHAScheduler):
    """Ray's ASHAScheduler (one bracket) whose state survives a ``--resume`` (see `_Persistent`)."""

    def __init__(self, *args: Any, state_path: str | os.PathLike | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._state_path = None if state_path is None else str(state_path)
        self._loaded = False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        if result.get("status", "running") != "running":  # final, infeasible, failed, replayed
            return TrialScheduler.CONTINUE
        if result.get(self._time_attr, 0) >= self._max_t:
            # Ray's ASHA stops a trial at max_t (and may cut it at a last milestone there), before
            # the trainable's final report: the full budget is reached, let the trial finish itself.
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if self._time_attr in result and self._metric in result:
            self._persist()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load()
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
            self._persist()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._trial_info.pop(trial.trial_id, None)


def make_scheduler(
    kind: str,
    objectives: Sequence[tuple[str, str]],
    epochs: int,
    min_epochs: int = 1,
    eta: int = 3,
    state_path: str | os.PathLike | None = None,
) -> TrialScheduler:
    """The Ray Tune scheduler for ``search.scheduler`` (experiment validation has checked the keys)."""
    if kind == "fifo":
        return FIFOScheduler()
    if kind == "asha":
        metric, mode = objectives[0]
        return PersistentASHAScheduler(
            time_attr="epoch",
            metric=metric,
            mode=mode,
            max_t=epochs,
            grace_period=min_epochs,
            reduction_factor=eta,
            brackets=1,
            state_path=state_path,
        )
    if kind == "moasha":
        return MOASHAScheduler(objectives, rungs_for(min_epochs, epochs, eta), eta, state_path=state_path)
    raise ValueError(f"unknown scheduler {kind!r}; one of fifo, asha, moasha")
