"""The learning-curve table `hybridnas bench efficiency` replays searches against, built once and cached.

A random sample of a search space (the quickstart's by default), drawn with Optuna's seeded
RandomSampler as `hybridnas bench latency` draws its test set: every architecture is measured as a
search measures it (MACs, params, predicted latency, from the same latency table), and those that
meet the constraints are trained with the experiment's recipe for the full budget with two seeds,
recording each epoch's val_acc and its measured time. Architectures over a constraint are kept
untrained: a search proposes them too, and pays nothing for them.

The table is cached as JSON in the hybridnas cache folder (next to the latency table: see
`runners.latency_table.default_table_path`) under a name that fingerprints everything it depends on
(space, data, recipe, size, seeds, the learning-rate schedule, code version), and it is written
after every training, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
SEEDS = (0, 1)
PLAIN = -1  # the job "seed" of a training with the plain schedule (no restarts), seed SEEDS[0]


@dataclasses.dataclass
class CurveTable:
    """Architectures with their measures and, when feasible, per-seed learning curves.

    ``archs[i]`` holds ``arch`` (the spec as a dict), ``flat`` (its flat parameters), ``measures``
    (macs, flops, params, latency_ms), ``feasible`` and, when feasible, ``acc[seed][epoch]`` and
    ``epoch_s[seed][epoch]`` (epoch 1 at index 0). The first ``info["plain"]`` trained ones also
    have ``acc_plain[epoch]``: seed 0 with the learning rate annealed once over the whole budget.
    """

    objectives: list[tuple[str, str]]
    constraints: dict[str, dict[str, float]]
    epochs: int
    archs: list[dict]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def feasible(self) -> list[int]:
        return [i for i, a in enumerate(self.archs) if a["feasible"]]

    def complete(self) -> bool:
        return not self.missing()

    def missing(self) -> list[tuple[int, int]]:
        """(arch, seed) trainings not in the table yet; seed `PLAIN` for the plain-schedule ones."""
        jobs = [
            (i, s)
            for i in self.feasible
            for s in range(len(SEEDS))
            if len(self.archs[i].get("acc") or []) <= s
        ]
        plain = self.feasible[: int(self.info.get("plain", 0))]
        return jobs + [(i, PLAIN) for i in plain if "acc_plain" not in self.archs[i]]

    def true_points(self) -> np.ndarray:
        """(n, m) objective values with the seed-mean final accuracy; NaN rows for infeasible ones."""
        rows = []
        for a in self.archs:
            if not a["feasible"]:
                rows.append([np.nan] * len(self.objectives))
                continue
            final = float(np.mean([acc[-1] for acc in a["acc"]]))
            rows.append([final if m == "val_acc" else float(a["measures"][m]) for m, _ in self.objectives])
        return np.array(rows, dtype=float)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "objectives": [list(o) for o in self.objectives],
            "constraints": self.constraints,
            "epochs": self.epochs,
            "archs": self.archs,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, d: dict) -> CurveTable:
        if d.get("format") != FORMAT:
            raise ValueError(f"curve table format {d.get('format')!r}, expected {FORMAT}")
        return cls(
            [tuple(o) for o in d["objectives"]],
            d["constraints"],
            int(d["epochs"]),
            d["archs"],
            d.get("info", {}),
        )


def cache_path(fingerprint: dict) -> Path:
    """``efficiency-<hash>.json`` next to the latency table in the hybridnas cache folder."""
    from hybridnas.runners.latency_table import default_table_path

    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return default_table_path().parent / f"efficiency-{digest}.json"


def _save(path: Path, table: CurveTable) -> None:
    from hybridnas.runners.files import atomic_write

    atomic_write(path, json.dumps(table.to_json()))


# ------------------------------------------------------------------------------------------------
# training in worker processes (one thread each, like a search's trials)

_WORKER: dict[str, Any] = {}


def _init_worker(data_cfg: dict) -> None:
    import torch

    from hybridnas.runners.data import load_dataset
    from hybridnas.search_space.config import DataConfig

    torch.set_num_threads(1)
    _WORKER["data"] = load_dataset(DataConfig.from_dict(data_cfg))


def _train_curve(arch: dict, train_cfg: dict, restarts: Sequence[int]) -> dict:
    """One training for the table: val_acc and time of every epoch."""
    from hybridnas.runners.train import train_model
    from hybridnas.search_space.config import TrainConfig
    from hybridnas.search_space.spec import ArchSpec

    spec = ArchSpec.from_dict(arch, warn=False)
    cfg = TrainConfig.from_dict(train_cfg)
    kw = {"restarts": list(restarts)} if restarts else {}
    res = train_model(spec, _WORKER["data"], cfg, threads=1, **kw)
    return {"acc": [h["val_acc"] for h in res.history], "epoch_s": [h["epoch_time_s"] for h in res.history]}


def _progress(done: int, total: int, t0: float, stream: Any) -> None:
    """A bar redrawn in place on a terminal; on a pipe, a line at every tenth of the work."""
    tty = stream.isatty()
    if not tty and done not in (0, total) and done % max(1, total // 10):
        return
    width, elapsed = 30, time.perf_counter() - t0
    left = f", ~{elapsed / done * (total - done) / 60:.0f} min left" if 0 < done < total else ""
    line = f"  [{'#' * round(width * done / max(1, total)):{width}s}] {done}/{total} trainings, {elapsed / 60:.1f} min{left}"
    stream.write(("\r" + line + ("\n" if done == total else "")) if tty else line + "\n")
    stream.flush()


def build(
    exp: Any,
    n_feasible: int,
    *,
    seed: int = 0,
    restarts: Sequence[int] = (),
    plain: int = 0,
    workers: int = 2,
    path: Path | None = None,
    stream: Any = None,
    measure: Callable[[Any], dict] | None = None,
) -> tuple[CurveTable, Path]:
    """The table for ``exp`` with ``n_feasible`` trained architectures: from the cache when it is
    there (a partial one is completed), else sampled, measured and trained now.

    ``restarts``: the epochs at which the learning-rate schedule restarts (`runners.optim.restart_factor`);
    ``plain``: how many of the architectures also train once with the plain schedule (no restarts),
    to compare the two; ``measure(spec)``: macs/flops/params/latency_ms of an architecture (default: as a search measures).
    """
    stream = stream or sys.stderr
    objectives = [(o.metric, o.mode) for o in exp.objectives]
    constraints = {k: b.to_dict() for k, b in exp.constraints.items()}
    train_cfg = {**exp.train.to_dict(), "threads": 1, "device": "cpu"}
    data_cfg = dataclasses.asdict(exp.data)
    from hybridnas import __version__

    fingerprint = {
        "space": exp.space.to_dict(),
        "input": exp.input.to_dict(),
        "data": data_cfg,
        "train": train_cfg,
        "objectives": objectives,
        "constraints": constraints,
        "n": n_feasible,
        "seed": seed,
        "seeds": SEEDS,
        "restarts": list(restarts),
        "plain": plain if restarts else 0,
        "latency": dataclasses.asdict(exp.latency),
        "version": __version__,
    }
    path = path or cache_path(fingerprint)
    if path.exists():
        table = CurveTable.from_json(json.loads(path.read_text()))
        if table.complete():
            return table, path
    else:
        table = _sample(exp, n_feasible, seed, objectives, constraints, measure)
        table.info = {
            "restarts": list(restarts),
            "seeds": list(SEEDS),
            "experiment": exp.name,
            "plain": plain if restarts else 0,
        }
        _save(path, table)
    jobs = table.missing()
    for i in table.feasible:
        table.archs[i].setdefault("acc", [])
        table.archs[i].setdefault("epoch_s", [])
    stream.write(
        f"building the learning-curve table ({len(table.feasible)} architectures x {len(SEEDS)} seeds x "
        f"{exp.train.epochs} epochs, {workers} at a time; cached in {path})\n"
    )
    t0, done, results = time.perf_counter(), 0, {}
    _progress(0, len(jobs), t0, stream)
    for (i, s), res in _run(jobs, table, train_cfg, data_cfg, restarts, workers):
        if s == PLAIN:
            table.archs[i]["acc_plain"] = res["acc"]
            done += 1
            _save(path, table)
            _progress(done, len(jobs), t0, stream)
            continue
        results[i, s] = res
        # Seeds are stored in order: write every arch whose earlier seeds are in.
        for j, k in sorted(results):
            if len(table.archs[j]["acc"]) == k:
                table.archs[j]["acc"].append(results[j, k]["acc"])
                table.archs[j]["epoch_s"].append(results[j, k]["epoch_s"])
        done += 1
        _save(path, table)
        _progress(done, len(jobs), t0, stream)
    table.info["build_s"] = table.info.get("build_s", 0.0) + time.perf_counter() - t0
    table.info["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    _save(path, table)
    return table, path


def _run(
    jobs: list[tuple[int, int]],
    table: CurveTable,
    train_cfg: dict,
    data_cfg: dict,
    restarts: Sequence[int],
    workers: int,
) -> Any:
    """(job, result) pairs as trainings finish: ``workers`` processes of one thread each, or this
    process itself when ``workers`` is 1 (its torch threads restored afterwards)."""

    def args(i: int, s: int) -> tuple:
        if s == PLAIN:
            return table.archs[i]["arch"], {**train_cfg, "seed": SEEDS[0]}, []
        return table.archs[i]["arch"], {**train_cfg, "seed": SEEDS[s]}, list(restarts)

    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            _init_worker(data_cfg)
            for job in jobs:
                yield job, _train_curve(*args(*job))
        finally:
            torch.set_num_threads(threads)
            _WORKER.clear()
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no Ray or driver state inherited
    with cf.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(data_cfg,)
    ) as pool:
        futures = {pool.submit(_train_curve, *args(i, s)): (i, s) for i, s in jobs}
        for fut in cf.as_completed(futures):
            yield futures[fut], fut.result()


def _sample(
    exp: Any,
    n_feasible: int,
    seed: int,
    objectives: list[tuple[str, str]],
    constraints: dict,
    measure: Callable[[Any], dict] | None,
) -> CurveTable:
    """Random distinct architectures of the space until ``n_feasible`` meet the constraints."""
    from hybridnas.runners.bench.latency import sample_architectures

    if measure is None:
        measure = search_measures(exp)
    archs: list[dict] = []
    n_feasible_found, drawn = 0, 0
    pool = sample_architectures(exp.space, exp.input, 20 * n_feasible, seed)
    for spec in pool:
        if n_feasible_found == n_feasible:
            break
        m = measure(spec)
        feasible = all(
            (b.get("max") is None or m[k] <= b["max"]) and (b.get("min") is None or m[k] >= b["min"])
            for k, b in constraints.items()
        )
        n_feasible_found += feasible
        drawn += 1
        archs.append(
            {
                "arch": spec.to_dict(),
                "hash": spec.arch_hash(),
                "flat": spec.flat_params(),
                "measures": m,
                "feasible": feasible,
            }
        )
    return CurveTable(objectives, constraints, exp.train.epochs, archs)


def search_measures(exp: Any) -> Callable[[Any], dict]:
    """MACs, flops, params and predicted latency exactly as a search computes them for its trials."""
    from hybridnas.runners.calibration import calibrate_latency
    from hybridnas.runners.latency import LatencyContext
    from hybridnas.runners.searcher import ArchSuggester

    context = LatencyContext.from_config(exp.latency)
    cal = calibrate_latency(exp.space, exp.input, context, seed=exp.search.seed, name=exp.name)
    suggester = ArchSuggester(
        exp.space.to_dict(), exp.input.to_dict(), {}, dataclasses.asdict(exp.latency), cal["path"]
    )
    return suggester.measures
