"""Read a finished search back from MLflow, pick architectures, and write them as ArchSpec YAML.

Everything comes from the tracking server (the layout in the search issue: one parent run tagged
``hybridnas.kind=search``, nested child runs tagged ``hybridnas.kind=trial`` with final metrics and
an ``arch.yaml`` artifact), so export works later and on another machine pointed at the same
server. An exported file is the trial's ``arch.yaml`` plus ``metrics:`` and ``provenance:``;
`build_model` ignores both, so the model it builds has exactly the logged MACs and params.

Selections: ``best_acc``; ``knee`` (the knee of the Pareto front, see `runners.pareto.knee`);
``pareto`` (every front member); and budgets ``macs<=N``, ``flops<=N``, ``params<=N``,
``latency_ms<=N`` (best val_acc under the budget; N like ``5e7``, ``50M``, ``1.2G``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from hybridnas import __version__
from hybridnas.runners import store
from hybridnas.runners.files import atomic_write, check_writable_dir, check_writable_file
from hybridnas.runners.pareto import (
    DEFAULT_OBJECTIVES,
    METRIC_COLUMNS,
    feasible_table,
    human,
    knee,
    objective_pairs,
    show_measured_latency,
    trial_key,
)
from hybridnas.search_space.errors import UserError, did_you_mean

COLUMNS = ("run_id", "trial", "run_name", "status", *METRIC_COLUMNS, "arch", "arch_hash", "parent_run_id")
COUNT_METRICS = ("macs", "flops", "params")  # logged as floats by MLflow; exact integers below 2**53
# latency_ms: measured where the trial was measured, else predicted; the prediction beside it.
EXPORTED_METRICS = (
    "val_acc",
    "macs",
    "flops",
    "params",
    "latency_ms",
    "latency_ms_predicted",
    "latency_ms_measured",
)
BUDGET_METRICS = ("macs", "flops", "params", "latency_ms")
KEYWORDS = ("best_acc", "knee", "pareto")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BUDGET = re.compile(
    r"^\s*(?P<metric>[a-z_]+)\s*<=\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<suffix>[kKmMgGtT]?)\s*$"
)


class ExportError(UserError):
    """Nothing to export: no such experiment, no finished trials, nothing under a budget."""


MACHINE_TRAIN_KEYS = ("device", "threads")  # describe the machine a search ran on, not its recipe


def search_recipe(client: Any, run_id: str) -> dict | None:
    """``{"data": ..., "train": ...}`` of the search run ``run_id``, from its ``resolved_config.json``
    artifact (None when it has none): what `hybridnas train` needs to retrain an exported trial the
    way the search trained it. Unset data keys and the machine's train keys are left out."""
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = json.loads(Path(client.download_artifacts(run_id, "resolved_config.json", d)).read_text())
    except Exception:  # noqa: BLE001 - an older or foreign run: export the architecture without a recipe
        return None
    data = {k: v for k, v in (cfg.get("data") or {}).items() if v is not None}
    train = {k: v for k, v in (cfg.get("train") or {}).items() if k not in MACHINE_TRAIN_KEYS}
    return {"data": data, "train": train} if data and train else None


def _warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)  # the CLI prints it as "hybridnas: warning: ..."


def load_runs(
    experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None
) -> pd.DataFrame:
    """One row per finished (``hybridnas.status=ok``) trial of the latest search in ``experiment``
    (or of the search run ``parent_run_id``).

    Columns: run_id, trial, run_name, status, val_acc (the seed mean of a trial repeated with more
    seeds, ``search.repeats``), val_acc_sd and seeds (its spread and count; 1 seed otherwise),
    val_acc_single (a repeated trial's own seed), macs, flops, params, latency_ms,
    latency_ms_measured, train_time_s, imgs_per_s, arch (an ArchSpec from the run's arch.yaml),
    arch_hash, parent_run_id. ``df.attrs`` holds experiment, parent_run_id, tracking_uri,
    objectives (``[(metric, mode)]`` from the parent's ``hybridnas.objectives`` tag), counts and
    recipe (`search_recipe`).
    Raises `ExportError` (a UserError) for an unknown experiment (listing those that exist), a
    missing search run, or no finished trials.
    """
    from mlflow.exceptions import MlflowException

    from hybridnas.search_space.spec import ArchSpec

    try:
        client, uri = store.open_existing(tracking_uri)
    except store.TrackingError as e:
        raise ExportError(str(e)) from None
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted((e.name for e in client.search_experiments()), key=str.lower)
            listing = ", ".join(names) if names else "none"
            raise ExportError(
                f"no MLflow experiment {experiment!r} at {store.redact(uri)}{did_you_mean(experiment, names)};"
                f" experiments there: {listing}"
            )
        if parent_run_id:
            parent = client.get_run(parent_run_id)
            if parent.info.experiment_id != exp.experiment_id:
                raise ExportError(f"run {parent_run_id} is not in experiment {experiment!r}")
        else:
            found = client.search_runs(
                [exp.experiment_id],
                filter_string="tags.`hybridnas.kind` = 'search'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not found:
                raise ExportError(
                    f"experiment {experiment!r} has no hybridnas search run (tag hybridnas.kind=search)"
                )
            parent = found[0]
        pid = parent.info.run_id
        children = store.search_all(
            client,
            [exp.experiment_id],
            f"tags.`mlflow.parentRunId` = '{pid}' AND tags.`hybridnas.kind` = 'trial'",
        )
    except MlflowException as e:
        raise ExportError(f"MLflow at {store.redact(uri)}: {e.message}") from None

    statuses: dict[str, int] = {}
    latest: dict[str, Any] = {}
    for run in children:
        status = run.data.tags.get("hybridnas.status", "unknown")
        statuses[status] = statuses.get(status, 0) + 1
        if status != "ok":
            continue
        trial = run.data.tags.get("hybridnas.trial", run.info.run_id)
        # A resumed search may log a trial twice; its latest run is the one that counts.
        if trial not in latest or run.info.start_time > latest[trial].info.start_time:
            latest[trial] = run
    if not latest:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trial runs at all"
        raise ExportError(f"experiment {experiment!r} (search run {pid}) has no finished trials ({counts})")

    rows = []
    with tempfile.TemporaryDirectory(prefix="hybridnas-export-") as tmp:
        for i, (trial, run) in enumerate(latest.items()):
            try:
                local = client.download_artifacts(
                    run.info.run_id, "arch.yaml", dst_path=os.path.join(tmp, str(i))
                )
                arch = ArchSpec.from_yaml(Path(local), warn=False)  # it was accepted once already
            except (MlflowException, OSError, UserError, ValueError) as e:
                _warn(f"trial {trial} (run {run.info.run_id}) skipped: no readable arch.yaml ({e})")
                continue
            m = run.data.metrics
            row = {
                c: m.get(c, math.nan)
                for c in COLUMNS
                if c not in ("run_id", "trial", "run_name", "status", "arch")
            }
            if "val_acc_mean" in m:  # trained again with more seeds (search.repeats): the mean counts
                row.update(val_acc=m["val_acc_mean"], val_acc_single=m.get("val_acc", math.nan))
            row["seeds"] = int(m.get("seeds", 1))
            row.update(
                run_id=run.info.run_id,
                trial=str(trial),
                run_name=run.info.run_name or "",
                status="ok",
                arch=arch,
                arch_hash=run.data.tags.get("hybridnas.arch_hash", arch.arch_hash()),
                parent_run_id=pid,
            )
            rows.append(row)
    if not rows:
        raise ExportError(f"experiment {experiment!r}: no finished trial has a readable arch.yaml")
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in COUNT_METRICS:
        if df[c].notna().all():
            df[c] = df[c].round().astype("int64")
    df = df.sort_values("trial", key=lambda s: s.map(trial_key), kind="stable").reset_index(drop=True)
    df.attrs.update(
        experiment=experiment,
        experiment_id=exp.experiment_id,
        parent_run_id=pid,
        tracking_uri=uri,
        objectives=_parent_objectives(parent),
        statuses=statuses,
        recipe=search_recipe(client, pid),
    )
    return df


def _parent_objectives(parent) -> list[tuple[str, str]]:
    raw = parent.data.tags.get("hybridnas.objectives")
    if raw:
        try:
            return objective_pairs(json.loads(raw))
        except (ValueError, TypeError, IndexError, KeyError):
            _warn(f"search run {parent.info.run_id}: unreadable hybridnas.objectives tag {raw!r}")
    return list(DEFAULT_OBJECTIVES)


def parse_budget(how: str) -> tuple[str, float] | None:
    """``"macs<=50M"`` -> ``("macs", 5e7)``; None when ``how`` is not a budget at all."""
    m = _BUDGET.match(how)
    if not m:
        return None
    metric = m["metric"]
    if metric not in BUDGET_METRICS:
        raise ExportError(
            f"--select {how!r}: budgets apply to {', '.join(BUDGET_METRICS)}"
            f"{did_you_mean(metric, BUDGET_METRICS)}"
        )
    return metric, float(m["num"]) * _SUFFIX[m["suffix"].lower()]


def check_selection(how: str) -> str:
    """The stripped selection if it is valid, else an `ExportError` saying what is allowed."""
    key = how.strip()
    if key not in KEYWORDS and parse_budget(key) is None:
        raise ExportError(
            f"--select {how!r}: expected best_acc, knee, pareto or a budget such as "
            f'"macs<=50M", "params<=1e5", "latency_ms<=2.5"{did_you_mean(key, KEYWORDS)}'
        )
    return key


def select(df: pd.DataFrame, how: str, objectives: Any = None) -> pd.DataFrame:
    """The rows of ``df`` chosen by ``how`` (best_acc | knee | pareto | "macs<=N" ...).

    ``objectives`` (``[(metric, mode)]``) define the front for knee/pareto; by default the search's
    own (``df.attrs["objectives"]``). best_acc and budgets break val_acc ties by fewer MACs, then
    fewer params. Always returns a DataFrame (one row except for pareto).
    """
    objs = objective_pairs(objectives or df.attrs.get("objectives") or DEFAULT_OBJECTIVES)
    key = check_selection(how)
    budget = None if key in KEYWORDS else parse_budget(key)
    if key in ("knee", "pareto"):
        front = feasible_table(df, objs)
        front = front[front["pareto"]].reset_index(drop=True)
        if front.empty:
            raise ExportError("no trial has every objective logged: " + ", ".join(m for m, _ in objs))
        if key == "knee":
            metrics, modes = [m for m, _ in objs], [mode for _, mode in objs]
            front = front.iloc[[knee(front[metrics].to_numpy(dtype=float), modes)]]
        out = front
    else:
        cand = df[pd.to_numeric(df["val_acc"], errors="coerce").notna()]
        if budget is not None:
            metric, limit = budget
            values = pd.to_numeric(cand[metric], errors="coerce")
            has = cand[values.notna()]
            if has.empty:
                raise ExportError(f"--select {how!r}: no finished trial has {metric} logged")
            cand = has[values[values.notna()] <= limit]
            if cand.empty:
                smallest = has.loc[pd.to_numeric(has[metric]).idxmin()]
                raise ExportError(
                    f"--select {how!r}: no finished trial has {metric} <= {human(limit, metric)};"
                    f" the smallest available is {human(smallest[metric], metric)}"
                    f" (trial {smallest['trial']})"
                )
        if cand.empty:
            raise ExportError("no finished trial has val_acc logged")
        order = [c for c in ("val_acc", "macs", "params") if c in cand.columns]
        out = cand.sort_values(order, ascending=[False] + [True] * (len(order) - 1), kind="stable").head(1)
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


def _get(row: Any, key: str, default: Any = None) -> Any:
    try:
        value = row[key]
    except (KeyError, IndexError):
        return default
    return default if value is None else value


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def export_arch(
    row: Mapping[str, Any] | pd.Series,
    experiment: str,
    path: str | Path,
    *,
    selection: str | None = None,
    tracking_uri: str | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> Path:
    """Write the row's architecture as ArchSpec YAML with ``metrics:`` and ``provenance:``.

    ``row`` is a row of `load_runs` (or any mapping with ``arch`` and the metric/run columns). The
    file is written atomically; it round-trips to the same ArchSpec (checked before writing).
    ``recipe`` (`search_recipe`, ``df.attrs["recipe"]``) adds ``provenance.data`` and
    ``provenance.train``, so `hybridnas train FILE` retrains it on the search's data and recipe.
    """
    from hybridnas.search_space.spec import ArchSpec

    arch = _get(row, "arch")
    if not isinstance(arch, ArchSpec):
        raise ExportError(f"trial {_get(row, 'trial', '?')}: no architecture to export")
    row = show_measured_latency(pd.DataFrame([dict(row)])).iloc[0]  # measured latency where measured
    metrics = {}
    for k in EXPORTED_METRICS:
        v = _get(row, k)
        if _finite(v):
            metrics[k] = int(round(float(v))) if k in COUNT_METRICS else float(v)
    if "latency_ms_measured" not in metrics:  # not measured: latency_ms is the prediction itself
        metrics.pop("latency_ms_predicted", None)
    provenance = {
        "experiment": experiment,
        "run_id": _get(row, "run_id"),
        "parent_run_id": _get(row, "parent_run_id"),
        "trial": None if _get(row, "trial") is None else str(_get(row, "trial")),
        "tracking_uri": store.redact(tracking_uri) if tracking_uri else None,
        "hybridnas_version": __version__,
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "selection": selection,
        **({"data": dict(recipe["data"]), "train": dict(recipe["train"])} if recipe else {}),
    }
    provenance = {k: v for k, v in provenance.items() if v is not None}
    spec = dataclasses.replace(arch, metrics=metrics, provenance=provenance)
    text = spec.to_yaml()
    if ArchSpec.from_yaml(text, warn=False) != arch:  # never write a file that would build a different model
        raise RuntimeError(f"trial {provenance.get('trial')}: exported YAML does not round-trip")
    return atomic_write(path, text)


def slug(text: str) -> str:
    """A file-name-safe form of an experiment name or selection: macs<=50M -> macs_le_50M."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("<=", "_le_")).strip("_")


def export_selection(
    df: pd.DataFrame, experiment: str, how: str, out: str | os.PathLike | None = None
) -> list[tuple[Path, dict]]:
    """Write the architectures ``how`` selects from a search's runs (`load_runs`): one file, or a
    folder of files for ``pareto``. Returns ``[(path, row)]``."""
    rows = select(df, how)
    uri, recipe = df.attrs.get("tracking_uri"), df.attrs.get("recipe")
    written = []
    if how == "pareto":
        folder = Path(out or f"{experiment}_front")
        check_writable_dir(folder, "--out" if out else "output folder")
        for r in rows.to_dict("records"):
            path = folder / f"{slug(experiment)}_trial{slug(str(r['trial']))}.yaml"
            written.append(
                (export_arch(r, experiment, path, selection=how, tracking_uri=uri, recipe=recipe), r)
            )
    else:
        path = Path(out) if out else Path(f"{slug(experiment)}_{slug(how)}.yaml")
        if path.is_dir():
            path = path / f"{slug(experiment)}_{slug(how)}.yaml"
        check_writable_file(path, "--out" if out else "output file")
        r = rows.iloc[0].to_dict()
        written.append((export_arch(r, experiment, path, selection=how, tracking_uri=uri, recipe=recipe), r))
    return written
