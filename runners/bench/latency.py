"""`hybridnas bench latency [--experiment FILE] [--samples N] [--quick]`: how good is the latency table?

Samples architectures from a search space (the quickstart's by default) with Optuna's seeded
RandomSampler, predicts each one's latency with `runners.measure.predict_latency` (the per-unit
lookup table) and measures it end to end with `runners.measure.latency`, then prints the share of
architectures predicted within 10 % and the median error.

Protocol, so that the number says how well the table generalises rather than how well it
remembers: a fresh table is calibrated as a search calibrates it (`runners.measure.calibrate_table`:
every unit measured in context, then about a hundred architectures timed end to end and the
entries refit to them), but from a sample of *other* architectures of the same space, none of the
test ones. Then each test architecture is predicted -- from table entries alone when all its units
are known ("lookup"), else its missing units are measured in its own context first, as in a
search ("new") -- and only then timed end to end. The share the in-context entries alone would
have predicted within 10 % is printed too (the same run, before the refit). Both clocks are reported on the CPU with
one thread: wall time (what a user sees on a quiet machine) and the thread's CPU time (the same
thing, but unaffected by other processes competing for the cores; see `runners.measure.latency`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hybridnas.runners.bench import quickstart_path
from hybridnas.runners.machine import load_average, machine_line
from hybridnas.runners.measure import LatencyTable, calibrate_table, latency, missing_units, predict_latency
from hybridnas.search_space.errors import SpecError


def _experiment_path(name: str | None) -> Path:
    return Path(name) if name else quickstart_path("pass --experiment FILE")


def sample_architectures(
    space: Any, input: Any, n: int, seed: int, exclude: set[str] = frozenset()
) -> list[Any]:
    """Up to ``n`` distinct architectures (by arch_hash, none in ``exclude``) from Optuna's RandomSampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    seen, out = set(exclude), []
    for _ in range(50 * n):  # small spaces run out of new architectures: stop rather than loop forever
        if len(out) == n:
            break
        spec = space.suggest(study.ask(), input=input)
        if spec.arch_hash() not in seen:
            seen.add(spec.arch_hash())
            out.append(spec)
    return out


def _describe(spec: Any) -> str:
    parts = []
    for st in spec.stages:
        opts = ",".join(f"{k}={v}" for k, v in st.options.items())
        parts.append(
            f"{st.mixer}{'(' + opts + ')' if opts else ''} x{st.depth} c{st.channels}"
            + (f" +{st.addon}" if st.addon != "none" else "")
            + (f" ↓{st.downsample}" if st.downsample != "none" else "")
        )
    return f"stem {spec.stem.channels} | " + " | ".join(parts)


def evaluate(exp: Any, samples: int, runs: int, clock: str, seed: int = 0) -> list[dict[str, Any]]:
    """Predicted vs measured latency for ``samples`` test architectures; one dict per architecture.

    The table is calibrated from a pool of *other* random architectures of the space first (see
    the module docstring); each row also carries ``unfit_ms``, the prediction from the in-context
    unit times alone, and ``calibration``, what `calibrate_table` did.
    """
    from hybridnas.search_space.build import build_model

    lat = exp.latency
    kw = {"device": lat.device, "batch_size": lat.batch_size, "threads": lat.threads, "clock": clock}
    test = sample_architectures(exp.space, exp.input, samples, seed)
    pool = sample_architectures(
        exp.space, exp.input, min(2000, 50 * samples), seed + 1, {s.arch_hash() for s in test}
    )
    inp = exp.input
    shape = (inp.channels, inp.size, inp.size)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        table = LatencyTable(Path(d) / "latency.json")  # fresh: every entry is measured in this run
        cal = calibrate_table(pool, table, **kw, seed=seed)
        for spec in test:
            lookup = not missing_units(spec, table, **kw)
            t0 = time.perf_counter()
            predicted = predict_latency(spec, table, **kw)
            predict_s = time.perf_counter() - t0
            unfit = _unfit_prediction(spec, table, **kw)
            model = build_model(spec)
            measured = latency(model, shape, runs=runs, warmup=5, **kw)["median_ms"]
            rows.append(
                {
                    "arch": spec.arch_hash(),
                    "describe": _describe(spec),
                    "predicted_ms": predicted,
                    "unfit_ms": unfit,
                    "measured_ms": measured,
                    "error": (predicted - measured) / measured,
                    "unfit_error": (unfit - measured) / measured,
                    "lookup": lookup,
                    "predict_s": predict_s,
                    "calibration": cal,
                    "model": model,
                }
            )
        # The noise floor: each architecture timed again, minutes later. A predictor cannot agree with
        # a measurement more often than two measurements of the same network agree with each other.
        for r in rows:
            again = latency(r.pop("model"), shape, runs=runs, warmup=5, **kw)["median_ms"]
            r["remeasured_ms"] = again
            r["remeasure_diff"] = (again - r["measured_ms"]) / r["measured_ms"]
    return rows


def _unfit_prediction(spec: Any, table: LatencyTable, **kw: Any) -> float:
    """What the table predicted before its refit: the in-context unit times and overhead."""
    from hybridnas.runners.measure import (
        _context_key,
        _resolve_device,
        _resolve_dtype,
        _unit_prior,
        unit_latencies,
    )

    context = _context_key(
        _resolve_device(kw["device"]), kw["batch_size"], kw["threads"], _resolve_dtype(None), kw["clock"]
    )
    return sum(_unit_prior(table.get(f"{context}||{r['unit']}")) for r in unit_latencies(spec, table, **kw))


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    lookups = [r["error"] for r in rows if r["lookup"]]
    return {
        "n": len(rows),
        "within_10": _share_within([r["error"] for r in rows]),
        "unfit_within_10": _share_within([r["unfit_error"] for r in rows if "unfit_error" in r]),
        "median_error": _median_abs([r["error"] for r in rows]),
        "n_lookup": len(lookups),
        "lookup_within_10": _share_within(lookups),
        "remeasure_within_10": _share_within([r["remeasure_diff"] for r in rows if "remeasure_diff" in r]),
        "remeasure_median": _median_abs([r["remeasure_diff"] for r in rows if "remeasure_diff" in r]),
    }


def _share_within(diffs: list[float], tol: float = 0.10) -> float:
    return sum(abs(d) <= tol for d in diffs) / len(diffs) if diffs else float("nan")


def _median_abs(diffs: list[float]) -> float:
    return statistics.median(abs(d) for d in diffs) if diffs else float("nan")


def main(args: argparse.Namespace) -> int:
    from hybridnas.search_space import Experiment

    exp = Experiment.from_yaml(_experiment_path(getattr(args, "experiment", None)))
    quick = bool(getattr(args, "quick", False))
    samples = getattr(args, "samples", 30) or 30
    if samples < 1:
        raise SpecError("--samples", f"must be >= 1, got {samples}")
    if quick:
        samples = min(samples, 6)
    runs = 20 if quick else 50
    lat = exp.latency
    print(machine_line())
    clocks = ["wall", "cpu"] if lat.device == "cpu" and lat.threads == 1 else ["wall"]
    print(
        f"latency table vs end-to-end: {exp.name}, {samples} test architectures, {lat.device}, "
        f"batch {lat.batch_size}, {lat.threads} thread(s), medians of {runs} runs; table calibrated on "
        "other architectures of the space"
    )
    print(load_average())
    summaries = {}
    for clock in clocks:
        t0 = time.perf_counter()
        rows = evaluate(exp, samples, runs, clock)
        took = time.perf_counter() - t0
        print(f"\nclock: {clock}")
        print(
            f"{'arch':12s}  {'pred ms':>8s}  {'meas ms':>8s}  {'error':>7s}  {'unfit':>7s}  {'again ms':>8s}  "
            f"{'diff':>7s}  {'how':6s}  architecture"
        )
        for r in rows:
            how = "lookup" if r["lookup"] else "new"
            print(
                f"{r['arch']:12s}  {r['predicted_ms']:8.3f}  {r['measured_ms']:8.3f}  {100 * r['error']:+6.1f}%  "
                f"{100 * r['unfit_error']:+6.1f}%  {r['remeasured_ms']:8.3f}  {100 * r['remeasure_diff']:+6.1f}%  {how:6s}  {r['describe']}"
            )
        s = summarize(rows)
        summaries[clock] = s
        cal = rows[0]["calibration"]
        lookup_s = statistics.median(r["predict_s"] for r in rows if r["lookup"]) if s["n_lookup"] else 0.0
        print(
            f"{clock}: {100 * s['within_10']:.0f}% of {s['n']} within 10% (target >= 90%), "
            f"median |error| {100 * s['median_error']:.1f}%; {s['n_lookup']} of {s['n']} were pure table "
            f"lookups ({100 * s['lookup_within_10']:.0f}% of those within 10%)."
        )
        print(
            f"  without the refit (in-context unit times alone, column 'unfit'): "
            f"{100 * s['unfit_within_10']:.0f}% within 10%."
        )
        print(
            f"  noise floor: measuring each network again agreed within 10% for "
            f"{100 * s['remeasure_within_10']:.0f}% (median |difference| {100 * s['remeasure_median']:.1f}%)."
        )
        print(
            f"  calibration: {cal['measured']} units measured in context, {cal['timed']} other architectures "
            f"timed end to end, {cal['seconds']:.1f} s; a lookup prediction takes {1e3 * lookup_s:.1f} ms; "
            f"this clock's run took {took:.0f} s."
        )
    print(f"\n{load_average()} at the end")
    return 0
