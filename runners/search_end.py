"""The end of a search, after its trials: the front measured end to end, marked, plotted, exported
and logged on the parent run (`finish_search`), and the parent's summary note (`search_note`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.store import SearchRecord

FRONT_ROUNDS = 3  # latency rounds per front member, interleaved across members


def front_latencies(archs: Mapping[str, Any], input_size: Sequence[int], lat: Any) -> dict[str, float]:
    """End-to-end latency (ms) of each architecture in ``archs`` (key -> ArchSpec).

    Right after a search the machine is not quiet yet: processes of the Ray just shut down are still
    exiting, and a median taken then can come out twice too high. So each member is timed in
    ``FRONT_ROUNDS`` rounds of 30 runs, the rounds interleaved across members (a burst lands on one
    round of several members, not on all rounds of one), and its latency is the lowest round median.
    """
    from hybridnas.runners.latency import latency
    from hybridnas.search_space.build import build_model

    ctx = LatencyContext.from_config(lat)
    models = {k: build_model(a) for k, a in archs.items()}
    best: dict[str, float] = {}
    for _ in range(FRONT_ROUNDS):
        for k, model in models.items():
            ms = latency(model, input_size, ctx, runs=30)["median_ms"]
            best[k] = min(best.get(k, math.inf), ms)
    return best


def finish_search(
    exp: Any,
    rec: SearchRecord,
    objectives: list,
    input_spec: Any,
    say: Any,
    quiet: Callable[[], Any] | None = None,
) -> tuple[Any, list[Path], list[Path]]:
    """Measure the front, mark it, plot it, export it, log it all on the parent run.

    ``quiet()``, when given, returns once the machine is quiet enough to time the front (the
    search's Ray has shut down); the runs are read back from MLflow before waiting for it.
    """
    from hybridnas.runners.export import ExportError, export_arch, load_runs
    from hybridnas.runners.pareto import feasible_table, show_measured_latency, write_fronts
    from hybridnas.runners.store import front_tags, log_metrics, run_route

    client, uri, exp_id, parent, out = rec.client, rec.uri, rec.exp_id, rec.parent, rec.out
    try:
        df = load_runs(exp.tracking.experiment, uri, parent_run_id=parent)
    except ExportError as e:
        say(f"no Pareto front: {e}")
        if quiet is not None:
            quiet()
        return None, [], []
    t = feasible_table(df, objectives)
    front = t[t["pareto"]].reset_index(drop=True)
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
    front = show_measured_latency(front)  # what the user sees: measured, the prediction beside it
    front_tags(client, measured.keys(), df["run_id"])
    names = mark_front(client, df, set(measured))
    df["run_name"] = [names.get(rid, "") for rid in df["run_id"]]
    front["run_name"] = [names.get(rid, "") for rid in front["run_id"]]
    # Relative links: they open inside the MLflow UI that shows front.md, whatever its address.
    files = write_fronts(
        df, objectives, out / "pareto", title=exp.name, link=lambda rid: run_route(exp_id, rid)
    )
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
    summary = client.get_run(parent).data.metrics  # the callback's n_* and hypervolume, latest values
    log_metrics(client, parent, {"front_size": len(front)}, step=int(summary.get("n_done", 0)))
    front_md = next((f for f in files if f.name == "front.md"), None)
    if front_md is not None:  # the run's description: what the run page shows first
        note = search_note(exp, {**summary, "front_size": len(front)}, objectives)
        client.set_tag(parent, "mlflow.note.content", note + "\n\n" + front_md.read_text())
    return front, exported, files


def search_note(exp: Any, metrics: Mapping[str, float], objectives: Sequence[tuple[str, str]]) -> str:
    """One paragraph on a finished search: what ran, how it went, the front and its hypervolume."""
    from hybridnas.runners.pareto import human
    from hybridnas.runners.store import FINISHED

    order = {f"n_{s}": i for i, s in enumerate(FINISHED)}
    keys = sorted(
        (k for k in metrics if k.startswith("n_") and k != "n_done"), key=lambda k: order.get(k, 99)
    )
    counts = ", ".join(f"{int(metrics[k])} {k[2:]}" for k in keys)
    text = (
        f"hybridnas search `{exp.path or exp.name}`: {int(metrics.get('n_done', 0))} trials ({counts}); "
        f"{int(metrics.get('front_size', 0))} on the front of "
        + ", ".join(f"{m} ({mode})" for m, mode in objectives)
    )
    best = [f"{m} {human(metrics[f'best_{m}'], m)}" for m, _ in objectives if f"best_{m}" in metrics]
    if best:
        text += "; best " + ", best ".join(best)
    if "hypervolume_norm" in metrics:
        text += (
            f"; hypervolume {metrics['hypervolume_norm']:.3f} of its reference box "
            f"({metrics['hypervolume']:.4g} raw)"
        )
    return text + "."


def mark_front(client: Any, df: Any, front: set[str]) -> dict[str, str]:
    """Rename the finished trials' runs so that exactly the front's carry ``[front]``
    (`runners.run_names`); returns run id -> name."""
    from hybridnas.runners.run_names import marked, unmarked
    from hybridnas.runners.store import rename

    names = {}
    for rid, current in zip(df["run_id"], df["run_name"]):
        name = marked(unmarked(str(current)), front=rid in front)
        rename(client, rid, name, current)
        names[rid] = name
    return names


# ---------------------------------------------------------------------------------------------
# CLI
