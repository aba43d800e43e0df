"""`hybridnas bench efficiency [--quick]`: how much compute each search strategy needs for a good front.

Claims about search strategies need many repetitions, and real searches on 2 cores cannot give
them. So the benchmark trains a sample of the space once (`runners/bench/curves.py`: every
epoch's val_acc and time, two seeds, cached) and then replays searches against that table:
the same Optuna samplers a search uses (`make_sampler`, asked and told as the search's searcher
does, constraints included) and the same promotion rule (`runners.scheduler.PromotionRule`), on
a simulated clock that advances by the measured epoch times with ``concurrency`` trials at a time.

- A proposal is mapped to the table's architecture with the fewest differing choices (ties: the
  first in the table), so the samplers search a coarser copy of the space: the printout says how
  far proposals were from the architecture that answered for them.
- Each repetition observes one of the two seeds of every architecture (drawn per repetition), so
  the search sees noise as a real one does; its result is scored by the *true* values: the
  seed-mean accuracy at the full budget and the costs.
- Quality is the hypervolume of the architectures a strategy trained to the full budget, as a
  share of the hypervolume of the table's own front (reference: the worst value of each objective
  over the table), after each amount of compute (the sum of trained epochs' seconds; the wall
  time is about that over the concurrency).
- A trial stopped at a rung is told to Optuna with its values at that rung (its ``rung`` recorded
  as a user attribute), as the search's searcher tells it; a duplicate proposal is told its
  twin's values and another is asked; an architecture over a constraint costs nothing.

Strategies: random+fifo, nsga2+fifo (the search without a scheduler), random+moasha,
nsga2+moasha; targets: nsga2+moasha reaches nsga2+fifo's final hypervolume with at most half the
compute, and random+fifo's with at most a third.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from hybridnas.runners.bench.curves import CurveTable

STRATEGIES = (("random", "fifo"), ("nsga2", "fifo"), ("random", "moasha"), ("nsga2", "moasha"))
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MAX_RESAMPLE = 50  # as the search: duplicate proposals skipped before giving up on new ones
TARGET_VS_NSGA2, TARGET_VS_RANDOM = 0.5, 1 / 3
PLAIN = 16  # architectures also trained with the plain learning-rate schedule, to compare


@dataclasses.dataclass
class Trace:
    """One replayed search: after each trial trained to the full budget, the compute spent so far
    and the hypervolume share of what it has."""

    strategy: str
    compute: list[float]
    hv: list[float]
    trials: int = 0  # trials that trained (feasible, not duplicates)
    epochs: int = 0  # epochs trained in all
    proposals: int = 0  # Optuna trials asked, duplicates and infeasible ones included
    distance: float = 0.0  # mean number of choices a proposal differed from its table architecture
    trained: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (arch, epochs), in start order
    study: Any = dataclasses.field(default=None, repr=False, compare=False)

    def hv_at(self, compute: float) -> float:
        i = int(np.searchsorted(self.compute, compute, side="right"))
        return self.hv[i - 1] if i else 0.0

    def compute_to(self, target: float) -> float:
        """The compute at which the hypervolume share first reached ``target`` (inf: never)."""
        for c, h in zip(self.compute, self.hv):
            if h >= target - 1e-12:
                return c
        return math.inf


class Replay:
    """Searches replayed against a `CurveTable` (see the module docstring)."""

    def __init__(
        self,
        table: CurveTable,
        space: Any,
        input: Any,
        concurrency: int,
        rungs: Sequence[int],
        eta: int,
        trials_hint: int | dict[str, int],
    ) -> None:
        from hybridnas.runners.pareto import hypervolume

        self.table, self.space, self.input = table, space, input
        self.concurrency, self.rungs, self.eta, self.trials_hint = concurrency, tuple(rungs), eta, trials_hint
        self.objectives = [tuple(o) for o in table.objectives]
        self.modes = [m for _, m in self.objectives]
        self.truth = table.true_points()
        ok = np.isfinite(self.truth).all(axis=1)
        worst = np.where(
            np.array(self.modes) == "max",
            np.nanmin(self.truth[ok], axis=0),
            np.nanmax(self.truth[ok], axis=0),
        )
        self.reference = worst
        self.full_hv = hypervolume(self.truth[ok], self.modes, self.reference)
        if not self.full_hv > 0:
            raise ValueError("the table's front has no hypervolume: too few distinct architectures")
        # Nearest-neighbour lookup: each flat parameter as a category code, -1 when absent.
        keys = sorted({k for a in table.archs for k in a["flat"]})
        self._codes = {k: {} for k in keys}
        self._matrix = np.array(
            [[self._code(k, a["flat"].get(k), add=True) for k in keys] for a in table.archs]
        )
        self._keys = keys

    def _code(self, key: str, value: Any, add: bool = False) -> int:
        if value is None:
            return -1
        codes = self._codes.setdefault(key, {})
        v = repr(value)
        if v not in codes:
            if not add:
                return -2  # a value no table architecture has: differs from all
            codes[v] = len(codes)
        return codes[v]

    def hint(self, scheduler: str) -> int:
        h = self.trials_hint
        return int(h[scheduler]) if isinstance(h, dict) else int(h)

    def nearest(self, spec: Any) -> tuple[int, int]:
        """(index, number of differing choices) of the table architecture closest to ``spec``."""
        flat = spec.flat_params()
        row = np.array([self._code(k, flat.get(k)) for k in self._keys])
        dist = (self._matrix != row).sum(axis=1) + len(set(flat) - set(self._keys))
        i = int(np.argmin(dist))
        return i, int(dist[i])

    def hv_share(self, found: Sequence[int]) -> float:
        from hybridnas.runners.pareto import hypervolume

        return (
            hypervolume(self.truth[list(found)], self.modes, self.reference) / self.full_hv if found else 0.0
        )

    def run(self, sampler: str, scheduler: str, rep: int, budget: float) -> Trace:
        """One search with ``sampler`` and ``scheduler`` (fifo | moasha), seeded by ``rep``, until
        ``budget`` seconds of compute are spent or no new architecture is proposed.

        The sampler is set up for ``trials_hint`` trials (per scheduler when a dict): what the
        experiment file would say for a search of that budget (NSGA-II's population, TPE's start).
        """
        import optuna
        from optuna.trial import TrialState

        from hybridnas.runners.scheduler import STOP, PromotionRule
        from hybridnas.runners.searcher import _violations, make_sampler

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        table, archs, epochs = self.table, self.table.archs, self.table.epochs
        study = optuna.create_study(
            directions=["maximize" if m == "max" else "minimize" for m in self.modes],
            sampler=make_sampler(sampler, rep, self.hint(scheduler)),
        )
        n_seeds = min(len(archs[i]["acc"]) for i in table.feasible)
        seed_of = np.random.default_rng([rep, 13]).integers(0, n_seeds, len(archs))
        rule = PromotionRule(self.objectives, self.rungs, self.eta) if scheduler == "moasha" else None
        trace = Trace(f"{sampler}+{scheduler}", [], [])
        told: dict[int, list[float]] = {}  # arch -> values told (what a duplicate is told)
        seen: set[int] = set()
        found: list[int] = []
        running: dict[int, dict] = {}
        events: list[tuple[float, int]] = []
        compute, distance = 0.0, 0
        names = [m for m, _ in self.objectives]

        def values(i: int, acc: float) -> list[float]:
            return [acc if m == "val_acc" else float(archs[i]["measures"][m]) for m, _ in self.objectives]

        def propose() -> tuple[Any, int] | None:
            nonlocal distance
            for _ in range(MAX_RESAMPLE):
                ot = study.ask()
                trace.proposals += 1
                i, d = self.nearest(self.space.suggest(ot, input=self.input))
                distance += d
                for name, v in _violations(archs[i]["measures"], table.constraints).items():
                    ot.set_constraint(name, v)
                if i in seen:
                    if i in told:
                        study.tell(ot, told[i])
                    else:
                        study.tell(ot, state=TrialState.FAIL)  # its twin is still training
                    continue
                seen.add(i)
                if not archs[i]["feasible"]:
                    told[i] = values(i, 0.0)  # never trained: no accuracy
                    study.tell(ot, told[i])
                    continue
                return ot, i
            return None

        def start(slot: int, now: float) -> None:
            p = propose()
            if p is not None:
                ot, i = p
                running[slot] = {"ot": ot, "arch": i, "epoch": 0, "n": len(trace.trained)}
                trace.trained.append((i, 0))
                trace.trials += 1
                heapq.heappush(events, (now + archs[i]["epoch_s"][seed_of[i]][0], slot))

        def finish(slot: int, vals: list[float]) -> None:
            t = running.pop(slot)
            told[t["arch"]] = vals
            study.tell(t["ot"], vals)

        for slot in range(self.concurrency):
            start(slot, 0.0)
        while events and compute < budget:
            now, slot = heapq.heappop(events)
            t = running[slot]
            i, s = t["arch"], seed_of[t["arch"]]
            t["epoch"] = e = t["epoch"] + 1
            trace.trained[t["n"]] = (i, e)
            compute += archs[i]["epoch_s"][s][e - 1]
            trace.epochs += 1
            vals = values(i, archs[i]["acc"][s][e - 1])
            if e == epochs:
                finish(slot, vals)
                found.append(i)
                trace.compute.append(compute)
                trace.hv.append(self.hv_share(found))
                start(slot, now)
            elif rule is not None and rule.decide(str(t["ot"].number), e, dict(zip(names, vals))) == STOP:
                t["ot"].set_user_attr("rung", e)
                finish(slot, vals)
                start(slot, now)
            else:
                heapq.heappush(events, (now + archs[i]["epoch_s"][s][e], slot))
        trace.distance = distance / max(1, trace.proposals)
        trace.study = study
        return trace


def trials_for(table: CurveTable, budget_trainings: float, rungs: Sequence[int], eta: int) -> dict[str, int]:
    """The trials a search file would ask for to spend ``budget_trainings`` full trainings of
    compute: fifo trains every feasible trial to the end; moasha about ``1/eta^k`` of them past the
    k-th rung (so many more trials fit), and neither pays for an infeasible one."""
    feasible = len(table.feasible) / len(table.archs)
    points = [*rungs, table.epochs]
    per_trial, share = points[0], 1.0
    for a, b in zip(points, points[1:]):
        share /= eta
        per_trial += share * (b - a)
    fifo = max(1, round(budget_trainings / feasible))
    return {"fifo": fifo, "moasha": max(1, round(fifo * table.epochs / per_trial))}


def schedule_report(table: CurveTable, rungs: Sequence[int]) -> list[str]:
    """The learning-rate schedule at the rungs: how well the accuracy there ranks the final one
    (Kendall tau against the seed mean at the full budget), annealed at each rung (what moasha
    trains) or once over the whole budget, and what restarting costs at the end."""
    from hybridnas.runners.fidelity import kendall_tau

    archs = [table.archs[i] for i in table.feasible if "acc_plain" in table.archs[i]]
    if len(archs) < 3 or not rungs:
        return []
    truth = [float(np.mean([acc[-1] for acc in a["acc"]])) for a in archs]
    lines = [
        f"learning rate at the rungs ({len(archs)} architectures; Kendall tau of the accuracy at a rung "
        "against the seed-mean accuracy at the full budget):"
    ]
    for r in rungs:
        restarted = kendall_tau([a["acc"][0][r - 1] for a in archs], truth)
        plain = kendall_tau([a["acc_plain"][r - 1] for a in archs], truth)
        lines.append(
            f"  epoch {r}: annealed at each rung {restarted:.2f}, one schedule over the budget {plain:.2f}"
        )
    final = np.array([a["acc"][0][-1] - a["acc_plain"][-1] for a in archs])
    seeds = np.array([abs(a["acc"][0][-1] - a["acc"][1][-1]) for a in archs])
    lines.append(
        f"  at the end: annealed at each rung minus one schedule, same seed: mean {100 * final.mean():+.2f} "
        f"points (median |difference| {100 * np.median(abs(final)):.2f}); two seeds differ by "
        f"{100 * np.median(seeds):.2f} points (median)"
    )
    return lines


def full_training_s(table: CurveTable) -> float:
    """Mean compute of one full-budget training over the table's trained architectures."""
    return float(np.mean([np.sum(t) for i in table.feasible for t in table.archs[i]["epoch_s"]]))


def replay_all(replay: Replay, reps: int, budget: float, strategies=STRATEGIES) -> dict[str, list[Trace]]:
    return {f"{s}+{k}": [replay.run(s, k, rep, budget) for rep in range(reps)] for s, k in strategies}


def _q(values: Sequence[float]) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    if np.isinf(v).sum() * 2 > len(v):
        return math.inf, math.inf, math.inf
    # With a few never-reached (inf) entries, interpolating would multiply inf by 0.
    method = "linear" if np.isfinite(v).all() else "nearest"
    return tuple(float(x) for x in np.percentile(v, [50, 25, 75], method=method))


def report(traces: dict[str, list[Trace]], budget: float, unit: float) -> tuple[str, dict[str, float]]:
    """The printed comparison, and the two ratios the targets are about."""
    lines = ["hypervolume share of the table's front (median [IQR], %) after a share of the compute budget:"]
    head = f"{'strategy':15s}" + "".join(f"{f'{round(100 * f)}%':>17s}" for f in FRACTIONS)
    lines.append(head + f"{'trials':>8s} {'epochs/trial':>13s} {'proposal dist':>14s}")
    for name, ts in traces.items():
        cells = []
        for f in FRACTIONS:
            m, lo, hi = _q([100 * t.hv_at(f * budget) for t in ts])
            cells.append(f"{m:5.1f} [{lo:4.1f}-{hi:5.1f}]".rjust(17))
        trials = np.mean([t.trials for t in ts])
        ept = np.sum([t.epochs for t in ts]) / max(1, np.sum([t.trials for t in ts]))
        dist = np.mean([t.distance for t in ts])
        lines.append(f"{name:15s}" + "".join(cells) + f"{trials:8.1f} {ept:13.2f} {dist:14.2f}")
    ratios = {}
    for base in ("nsga2+fifo", "random+fifo"):
        if base not in traces:
            continue
        target = float(np.median([t.hv_at(budget) for t in traces[base]]))
        lines.append(
            f"\ncompute to reach {base}'s final hypervolume ({100 * target:.1f}%), as a share of the budget "
            f"(= {base}'s compute; median [IQR], reps that reached it):"
        )
        for name, ts in traces.items():
            need = [t.compute_to(target) for t in ts]
            m, lo, hi = _q([c / budget for c in need])
            reached = sum(math.isfinite(c) and c <= budget for c in need)
            text = "not reached by half" if math.isinf(m) else f"{m:.2f} [{lo:.2f}-{hi:.2f}]"
            lines.append(
                f"  {name:15s} {text:22s} {reached}/{len(ts)}  ({m * budget / unit:.1f} full trainings)"
            )
            if name == "nsga2+moasha":
                ratios[base] = m
    return "\n".join(lines), ratios


def real_searches(exp: Any) -> list[str]:
    """The experiment searched for real, once with ``fifo`` and once with ``moasha`` (no repeats:
    they are the same for both), in a temporary store: wall time, epochs trained and the
    hypervolume of each front, against one reference (0 for maximised objectives, the constraint
    or 1.1 x the worst value of both fronts for minimised ones)."""
    import tempfile

    from hybridnas.runners.pareto import hypervolume
    from hybridnas.runners.search import run_search
    from hybridnas.runners.store import child_runs, make_client

    objectives = [(o.metric, o.mode) for o in exp.objectives]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="hybridnas-bench-efficiency-") as tmp:
        for kind in ("fifo", "moasha"):
            e = dataclasses.replace(
                exp,
                search=dataclasses.replace(exp.search, scheduler=kind, repeats=0),
                tracking=dataclasses.replace(exp.tracking, experiment=f"{exp.name}-{kind}"),
            )
            res = run_search(e, tracking_uri=f"sqlite:///{tmp}/mlflow.db", out_dir=f"{tmp}/{kind}")
            client = make_client(res.tracking_uri)
            exp_id = client.get_experiment_by_name(e.tracking.experiment).experiment_id
            trained = [
                int(r.data.metrics.get("epochs_trained", 0))
                for r in child_runs(client, exp_id, res.parent_run_id)
            ]
            front = (
                res.front[[m for m, _ in objectives]].to_numpy(dtype=float) if res.front is not None else None
            )
            runs[kind] = {
                "wall": res.wall_s,
                "epochs": sum(trained),
                "full": res.counts["ok"],
                "front": front,
            }
    fronts = [r["front"] for r in runs.values() if r["front"] is not None and len(r["front"])]
    ref = []
    for j, (metric, mode) in enumerate(objectives):
        cap = exp.constraints.get(metric)
        if mode == "max":
            ref.append(0.0)
        elif cap is not None and cap.max is not None:
            ref.append(float(cap.max))
        else:
            ref.append(1.1 * max(float(f[:, j].max()) for f in fronts))
    modes = [mode for _, mode in objectives]
    lines = [
        f"real searches of {exp.name} ({exp.search.trials} trials, {exp.train.epochs} epochs, concurrency "
        f"{exp.search.concurrency}, no repeats), one after the other on this machine:",
        f"  {'scheduler':10s} {'wall s':>8s} {'epochs trained':>15s} {'to the end':>11s} {'front':>6s} {'hypervolume':>12s}",
    ]
    for kind, r in runs.items():
        hv = hypervolume(r["front"], modes, ref) if r["front"] is not None and len(r["front"]) else 0.0
        r["hv"] = hv
        n = 0 if r["front"] is None else len(r["front"])
        lines.append(f"  {kind:10s} {r['wall']:8.0f} {r['epochs']:15d} {r['full']:11d} {n:6d} {hv:12.4g}")
    f, m = runs["fifo"], runs["moasha"]
    lines.append(
        f"  moasha / fifo: wall {m['wall'] / f['wall']:.2f}x, epochs {m['epochs'] / max(1, f['epochs']):.2f}x, "
        f"hypervolume {m['hv'] / f['hv'] if f['hv'] else math.nan:.2f}x"
    )
    return lines


def main(args: argparse.Namespace) -> int:
    from hybridnas.runners.bench import quickstart_path
    from hybridnas.runners.bench.curves import build
    from hybridnas.runners.machine import load_average, machine_line
    from hybridnas.runners.scheduler import rungs_for
    from hybridnas.search_space import Experiment
    from hybridnas.search_space.errors import SpecError

    quick = bool(getattr(args, "quick", False))
    path = getattr(args, "experiment", None) or quickstart_path("pass --experiment FILE")
    exp = Experiment.from_yaml(path)
    n = getattr(args, "archs", None) or (6 if quick else 32)
    reps = getattr(args, "reps", None) or 20
    budget_trainings = getattr(args, "budget", None) or (3 if quick else 12)
    for key, v, lo in (("--archs", n, 4), ("--reps", reps, 1), ("--budget", budget_trainings, 1)):
        if v < lo:
            raise SpecError(key, f"must be >= {lo}, got {v}")
    if quick:  # a small table: 1,000 images, at most 3 epochs
        exp = dataclasses.replace(
            exp,
            data=dataclasses.replace(exp.data, samples=1000),
            train=exp.train.replace(epochs=min(exp.train.epochs, 3)),
        )
    s = exp.search
    min_epochs, eta = (s.min_epochs, s.reduction_factor) if s.scheduler == "moasha" else (1, 3)
    rungs = rungs_for(min_epochs, exp.train.epochs, eta)
    print(machine_line(), flush=True)
    print(
        f"bench efficiency: {exp.name}, {n} trained architectures x 2 seeds x {exp.train.epochs} epochs"
        f"{' (quick: 1,000 images)' if quick else ''}; {load_average()}"
    )
    t0 = time.perf_counter()
    # The curves are trained as a moasha search trains its trials: the learning rate restarts at the
    # rungs (`runners.optim.restart_factor`; the final accuracy is the same as without, within seed noise).
    table, cached = build(exp, n, seed=s.seed, restarts=rungs, plain=min(n, 4 if quick else PLAIN))
    print(
        f"table: {len(table.archs)} architectures sampled, {len(table.feasible)} trained, "
        f"{len(table.archs) - len(table.feasible)} over a constraint; built in "
        f"{table.info.get('build_s', 0.0) / 60:.1f} min ({'read from' if time.perf_counter() - t0 < 5 else 'now in'} {cached})"
    )
    for line in schedule_report(table, rungs):
        print(line)
    unit = full_training_s(table)
    budget = budget_trainings * unit
    hints = trials_for(table, budget_trainings, rungs, eta)
    replay = Replay(table, exp.space, exp.input, s.concurrency, rungs, eta, hints)
    print(
        f"replay: {reps} repetitions per strategy, concurrency {s.concurrency}, budget {budget:,.0f} s of "
        f"compute (= {budget_trainings} full trainings of {unit:.1f} s); moasha rungs at epoch(s) "
        f"{', '.join(map(str, rungs))} of {exp.train.epochs} (eta {eta}); samplers set up for "
        f"{hints['fifo']} trials (fifo) and {hints['moasha']} (moasha), what fits the budget"
    )
    t0 = time.perf_counter()
    traces = replay_all(replay, reps, budget)
    text, ratios = report(traces, budget, unit)
    print(text)
    print(f"(replays took {time.perf_counter() - t0:.0f} s)")
    for base, target, what in (
        ("nsga2+fifo", TARGET_VS_NSGA2, "half"),
        ("random+fifo", TARGET_VS_RANDOM, "a third"),
    ):
        r = ratios.get(base, math.inf)
        verdict = "met" if r <= target else "NOT met"
        print(
            f"target: nsga2+moasha reaches {base}'s final hypervolume with at most {what} of its compute: "
            f"{'never' if math.isinf(r) else f'{r:.2f}x'}, {verdict}"
        )
    if not getattr(args, "no_real", False):
        print()
        real = exp
        if quick:  # a small real pair too: 6 trials
            real = dataclasses.replace(exp, search=dataclasses.replace(exp.search, trials=6))
        if real.search.scheduler != "moasha":
            real = dataclasses.replace(
                real, search=dataclasses.replace(real.search, min_epochs=min_epochs, reduction_factor=eta)
            )
        for line in real_searches(real):
            print(line)
    return 0
