"""`hybridnas bench latency [--experiment FILE] [--samples N] [--quick] [--load N [--load-kind cpu|memory]]`: how good is the
latency table, on a quiet machine and on a busy one?

Samples architectures from a search space (the quickstart's by default) with Optuna's seeded
RandomSampler, predicts each one's latency with `runners.latency_table.predict_latency` (the
per-unit lookup table) and measures it end to end with `runners.latency.latency`, then prints the
share of architectures predicted within 10 % and the median error.

Protocol, so that the number says how well the table generalises rather than how well it
remembers: a fresh table is calibrated as a search calibrates it (`runners.calibration.calibrate_table`:
every unit measured in context, then about a hundred architectures timed end to end and the
entries refit to them), but from a sample of *other* architectures of the same space, none of the
test ones. Then each test architecture is predicted -- from table entries alone when all its units
are known ("lookup"), else its missing units are measured in its own context first, as in a
search ("new") -- and only then timed end to end. The share the in-context entries alone would
have predicted within 10 % is printed too (the same run, before the refit). Both clocks are
reported on the CPU with one thread: wall time and the thread's CPU time (see `runners.latency`).

``--load N`` then starts N busy processes (each bounded in time, all ended by the benchmark) and
calibrates and predicts again, under that load, from a fresh table; those predictions are scored
against the end-to-end times measured on the quiet machine before the load started. The noise
floor of each condition is how often two measurements of the same network agree within 10 %: two
quiet ones, or a loaded one against the quiet one. ``--load-kind memory`` makes each busy process
also stream through memory (`runners.bench.load`), which slows the timed process on either clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hybridnas.runners.bench import quickstart_path
from hybridnas.runners.bench.load import KINDS, busy_load
from hybridnas.runners.calibration import NoiseLimits, calibrate_table, deviation_text
from hybridnas.runners.latency import LatencyContext, latency
from hybridnas.runners.latency_table import (
    LatencyTable,
    missing_units,
    predict_latency,
    unit_latencies,
    unit_prior,
)
from hybridnas.runners.machine import machine_line
from hybridnas.search_space.errors import SpecError

LOAD_BOUND_S = 1800  # the busy processes end by themselves after this, should the benchmark not end them


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


def _load() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def _shape(exp: Any) -> tuple[int, int, int]:
    return (exp.input.channels, exp.input.size, exp.input.size)


def predictions(
    test: list[Any],
    pool: list[Any],
    ctx: LatencyContext,
    seed: int = 0,
    end_to_end: int = 120,
    limits: NoiseLimits = NoiseLimits(),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Calibrate a fresh table from ``pool``, then predict each of ``test`` from it: one dict per
    architecture (``predicted_ms``, ``unfit_ms``, ``lookup``, ``predict_s``) and what the calibration did."""
    with tempfile.TemporaryDirectory() as d:
        table = LatencyTable(Path(d) / "latency.json")  # fresh: every entry is measured in this run
        cal = calibrate_table(pool, table, ctx, end_to_end=end_to_end, seed=seed, limits=limits)
        rows = []
        for spec in test:
            lookup = not missing_units(spec, table, ctx)
            t0 = time.perf_counter()
            predicted = predict_latency(spec, table, ctx)
            rows.append(
                {
                    "arch": spec.arch_hash(),
                    "describe": _describe(spec),
                    "predicted_ms": predicted,
                    "predict_s": time.perf_counter() - t0,
                    "unfit_ms": _unfit_prediction(spec, table, ctx),
                    "lookup": lookup,
                }
            )
    return rows, cal


def evaluate(
    exp: Any,
    samples: int,
    runs: int,
    clock: str,
    seed: int = 0,
    end_to_end: int = 120,
    limits: NoiseLimits = NoiseLimits(),
) -> list[dict[str, Any]]:
    """Predicted vs measured latency for ``samples`` test architectures; one dict per architecture.

    The table is calibrated from a pool of *other* random architectures of the space first (see
    the module docstring); each row also carries ``unfit_ms``, the prediction from the in-context
    unit times alone, ``calibration``, what `calibrate_table` did, and ``remeasured_ms``, the
    architecture timed again after all others (the noise floor).
    """
    from hybridnas.search_space.build import build_model

    ctx = dataclasses.replace(LatencyContext.from_config(exp.latency), clock=clock)
    test = sample_architectures(exp.space, exp.input, samples, seed)
    pool = sample_architectures(
        exp.space, exp.input, min(2000, 50 * samples), seed + 1, {s.arch_hash() for s in test}
    )
    rows, cal = predictions(test, pool, ctx, seed, end_to_end, limits)
    models = [build_model(spec) for spec in test]
    for r, model, spec in zip(rows, models, test):
        measured = latency(model, _shape(exp), ctx, runs=runs, warmup=5)["median_ms"]
        r.update(
            measured_ms=measured,
            error=(r["predicted_ms"] - measured) / measured,
            unfit_error=(r["unfit_ms"] - measured) / measured,
            calibration=cal,
            spec=spec,
        )
    # The noise floor: each architecture timed again, minutes later. A predictor cannot agree with
    # a measurement more often than two measurements of the same network agree with each other.
    for r, model in zip(rows, models):
        again = latency(model, _shape(exp), ctx, runs=runs, warmup=5)["median_ms"]
        r["remeasured_ms"] = again
        r["remeasure_diff"] = (again - r["measured_ms"]) / r["measured_ms"]
    return rows


def evaluate_loaded(
    exp: Any, quiet: list[dict[str, Any]], runs: int, clock: str, seed: int = 0, end_to_end: int = 120
) -> list[dict[str, Any]]:
    """`evaluate` again on the same test architectures, meant to run under load: a fresh table
    calibrated from the same pool, predictions scored against ``quiet``'s measurements (taken on
    the quiet machine), and each architecture timed under the load too (the loaded noise floor)."""
    from hybridnas.search_space.build import build_model

    ctx = dataclasses.replace(LatencyContext.from_config(exp.latency), clock=clock)
    test = [r["spec"] for r in quiet]
    pool = sample_architectures(
        exp.space, exp.input, min(2000, 50 * len(test)), seed + 1, {s.arch_hash() for s in test}
    )
    rows, cal = predictions(test, pool, ctx, seed, end_to_end)
    for r, q in zip(rows, quiet):
        loaded = latency(build_model(q["spec"]), _shape(exp), ctx, runs=runs, warmup=5)["median_ms"]
        r.update(
            measured_ms=q["measured_ms"],
            error=(r["predicted_ms"] - q["measured_ms"]) / q["measured_ms"],
            unfit_error=(r["unfit_ms"] - q["measured_ms"]) / q["measured_ms"],
            remeasured_ms=loaded,
            remeasure_diff=(loaded - q["measured_ms"]) / q["measured_ms"],
            calibration=cal,
        )
    return rows


def _unfit_prediction(spec: Any, table: LatencyTable, ctx: LatencyContext) -> float:
    """What the table predicted before its refit: the in-context unit times and overhead."""
    key = ctx.key()
    return sum(unit_prior(table.get(f"{key}||{r['unit']}")) for r in unit_latencies(spec, table, ctx))


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


def _verdict(cal: dict[str, Any]) -> str:
    q = cal["quality"]
    noise = "" if q["noise"] is None else f", noise {deviation_text(q['noise'])}"
    if q.get("tail") is not None:
        noise += f", tail {deviation_text(q['tail'])}"
    return ("calibrated" if q["calibrated"] else "NOT calibrated") + noise


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'arch':12s}  {'pred ms':>8s}  {'meas ms':>8s}  {'error':>7s}  {'unfit':>7s}  {'again ms':>8s}  "
        f"{'diff':>7s}  {'how':6s}  architecture"
    )
    for r in rows:
        how = "lookup" if r["lookup"] else "new"
        print(
            f"{r['arch']:12s}  {r['predicted_ms']:8.3f}  {r['measured_ms']:8.3f}  {100 * r['error']:+6.1f}%  "
            f"{100 * r['unfit_error']:+6.1f}%  {r['remeasured_ms']:8.3f}  {100 * r['remeasure_diff']:+6.1f}%  "
            f"{how:6s}  {r['describe']}"
        )


def main(args: argparse.Namespace) -> int:
    from hybridnas.search_space import Experiment

    exp = Experiment.from_yaml(_experiment_path(getattr(args, "experiment", None)))
    quick = bool(getattr(args, "quick", False))
    samples = getattr(args, "samples", 30) or 30
    load = getattr(args, "load", 0) or 0
    kind = getattr(args, "load_kind", None) or "cpu"
    if samples < 1:
        raise SpecError("--samples", f"must be >= 1, got {samples}")
    if load < 0:
        raise SpecError("--load", f"must be >= 0 busy processes, got {load}")
    if kind not in KINDS:
        raise SpecError("--load-kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if quick:
        samples = min(samples, 6)
    runs = 20 if quick else 50
    end_to_end = 30 if quick else 120
    lat = exp.latency
    ctx = LatencyContext.from_config(lat)
    clocks = ["wall", "cpu"] if ctx.device.type == "cpu" and ctx.threads == 1 else ["wall"]
    print(machine_line())
    print(
        f"latency table vs end-to-end: {exp.name}, {samples} test architectures, {lat.device}, "
        f"batch {lat.batch_size}, {lat.threads} thread(s), medians of {runs} runs; table calibrated on "
        f"other architectures of the space; default clock here: {ctx.clock}; {_load()}"
    )
    quiet: dict[str, list[dict[str, Any]]] = {}
    for clock in clocks:
        t0 = time.perf_counter()
        rows = quiet[clock] = evaluate(exp, samples, runs, clock, end_to_end=end_to_end)
        took = time.perf_counter() - t0
        print(f"\nclock: {clock}")
        _print_rows(rows)
        s = summarize(rows)
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
            f"timed end to end, {cal['seconds']:.1f} s, {_verdict(cal)}; a lookup prediction takes "
            f"{1e3 * lookup_s:.1f} ms; this clock's run took {took:.0f} s."
        )
    if load:
        loaded: dict[str, list[dict[str, Any]]] = {}
        with busy_load(load, LOAD_BOUND_S, kind):
            print(f"\nunder load: {load} busy processes ({kind}) started; {_load()}")
            for clock in clocks:
                loaded[clock] = evaluate_loaded(exp, quiet[clock], runs, clock, end_to_end=end_to_end)
                s = summarize(loaded[clock])
                print(
                    f"{clock} under load {load}: {100 * s['within_10']:.0f}% of {s['n']} within 10% of the quiet "
                    f"times, median |error| {100 * s['median_error']:.1f}%; "
                    f"{_verdict(loaded[clock][0]['calibration'])}; {_load()}"
                )
        print(f"load ended ({load} processes stopped)")
        _print_side_by_side(quiet, loaded, load, ctx.clock)
    print(f"\nmachine: {_load()}")
    return 0


def _print_side_by_side(
    quiet: dict[str, list[dict[str, Any]]], loaded: dict[str, list[dict[str, Any]]], load: int, default: str
) -> None:
    """Quiet and loaded scores per clock in one table, each with its noise floor and calibration verdict."""
    print(
        "\nside by side: predictions within 10% of end-to-end times measured on the quiet machine "
        "before the load; noise floor = repeat measurements within 10% (quiet vs quiet, loaded vs quiet)"
    )
    head = ["clock", "quiet", "noise floor", "calibration", f"load {load}", "noise floor", "calibration"]
    rows = []
    for clock in quiet:
        q, lo = summarize(quiet[clock]), summarize(loaded[clock])
        rows.append(
            [
                clock + (" (default)" if clock == default else ""),
                f"{100 * q['within_10']:.0f}%",
                f"{100 * q['remeasure_within_10']:.0f}%",
                _verdict(quiet[clock][0]["calibration"]),
                f"{100 * lo['within_10']:.0f}%",
                f"{100 * lo['remeasure_within_10']:.0f}%",
                _verdict(loaded[clock][0]["calibration"]),
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
