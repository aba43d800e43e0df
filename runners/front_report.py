"""The front of a search as the MLflow UI shows it (a markdown table and one interactive page) and as
the terminal prints it (`front_text`).

- `front_markdown`: ``front.md``, the front as a markdown table (MLflow's artifact view renders
  markdown; the search's parent run also carries it as its description).
- `fronts_page`: ``fronts.html``, one page with a plot per pair of objectives. plotly.js is
  embedded once (about 4.9 MB; one file per pair used to embed it in each), so the page opens
  offline and inside MLflow's artifact view.

Where the front's latency was measured end to end (``latency_ms_measured``), plots with a latency
axis show the measured value next to the predicted one, and every hover text shows it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from hybridnas.runners.pareto import (
    LOG_AXES,
    _label,
    _predicted_positions,
    _step_where,
    arch_summary,
    error_bars,
    feasible_table,
    human,
    non_dominated,
    objective_pairs,
    show_measured_latency,
)

MEASURED = "latency_ms_measured"


def shown_metrics(objectives: Sequence[tuple[str, str]], columns: Iterable[str]) -> list[str]:
    """The objectives, then val_acc, macs, params, latency_ms and the measured latency, where present."""
    cols = set(columns)
    metrics = [m for m, _ in objectives]
    for extra in ("val_acc", "macs", "params", "latency_ms", MEASURED):
        if extra not in metrics and extra in cols:
            metrics.append(extra)
    return metrics


def _has_measured(t: pd.DataFrame) -> pd.Series:
    if MEASURED not in t.columns:
        return pd.Series(False, index=t.index)
    return pd.to_numeric(t[MEASURED], errors="coerce").notna()


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def front_markdown(
    df: pd.DataFrame,
    objectives: Iterable[Any],
    title: str = "",
    link: Callable[[str], str] | None = None,
) -> str:
    """The front (of all objectives) as a markdown table, best first objective first.

    One row per member: its run (the run name when ``df`` has ``run_name``, linked by
    ``link(run_id)`` when given), the metrics of `shown_metrics` and the architecture.
    """
    objs = objective_pairs(objectives)
    t = feasible_table(df, objs)
    f = t[t["pareto"]]
    metrics = shown_metrics(objs, f.columns)
    head = ["run", *[m.replace(MEASURED, "latency_ms (measured)") for m in metrics], "architecture"]
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(metrics) + ["---"]) + "|",
    ]
    for r in f.to_dict("records"):
        name = str(r.get("run_name") or f"trial {r.get('trial', '')}")
        run = f"[{_cell(name)}]({link(r['run_id'])})" if link and r.get("run_id") else _cell(name)
        cells = [run, *[_value(r, m) for m in metrics], _cell(r.get("arch_summary", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    goals = ", ".join(f"{m} ({mode})" for m, mode in objs)
    lines += ["", f"{len(f)} of {len(t)} comparable trials are on the front of {goals}."]
    return "\n".join(lines) + "\n"


def _value(r: Mapping[str, Any], m: str) -> str:
    """A metric as shown; val_acc of a trial repeated with more seeds as ``mean ±sd (n=N)``."""
    if m == "val_acc" and int(r.get("seeds") or 1) > 1 and pd.notna(r.get("val_acc_sd")):
        return f"{human(r.get(m), m)} ±{100 * float(r['val_acc_sd']):.2f} (n={int(r['seeds'])})"
    return human(r.get(m), m)


def _hover(r: Mapping[str, Any], metrics: list[str]) -> str:
    lines = [str(r.get("run_name") or f"trial {r.get('trial', '')}"), str(r.get("arch_summary", ""))]
    lines += [f"{m}: {_value(r, m)}" for m in metrics if m in r and human(r.get(m), m) != "-"]
    if r.get("run_id"):
        lines.append(f"run {r['run_id']}")
    return "<br>".join(lines)


def _figure(t: pd.DataFrame, y: tuple[str, str], x: tuple[str, str], title: str, metrics: list[str]) -> Any:
    """One pair's plot: every feasible trial, the front of all objectives ringed, the pair's own
    front as its attainment staircase and, on a latency axis, the measured latency of the front."""
    import plotly.graph_objects as go

    (ym, ymode), (xm, xmode) = y, x
    front2 = non_dominated(t[[ym, xm]].to_numpy(dtype=float), [ymode, xmode])

    def trace(rows: pd.DataFrame, xcol: str = xm, ycol: str = ym, **kw: Any) -> Any:
        # Plain lists, not numpy arrays: plotly >= 6 would base64-encode arrays in the page.
        return go.Scatter(
            x=rows[xcol].astype(float).tolist(),
            y=rows[ycol].astype(float).tolist(),
            hovertext=[_hover(r, metrics) for r in rows.to_dict("records")],
            hoverinfo="text",
            **kw,
        )

    fig = go.Figure()
    fig.add_trace(
        trace(t, mode="markers", name=f"all feasible trials ({len(t)})", marker={"color": "#a6a6a6"})
    )
    full_only = t["pareto"].to_numpy() & ~front2
    if full_only.any():
        fig.add_trace(
            trace(
                t[full_only],
                mode="markers",
                name="on the front of all objectives",
                marker={"color": "rgba(0,0,0,0)", "size": 11, "line": {"color": "#ff7f0e", "width": 2}},
            )
        )
    f = t[front2].sort_values(xm, kind="stable")
    bars = {  # seed means of repeated members: +- one standard deviation
        ("error_y" if k == "yerr" else "error_x"): {"type": "data", "array": v, "visible": True}
        for k, v in error_bars(f, xm, ym).items()
    }
    fig.add_trace(
        trace(
            f,
            mode="lines+markers",
            name=f"Pareto front: {ym} vs {xm}",
            line={"shape": "hv" if _step_where(xmode) == "post" else "vh", "color": "#1f77b4"},
            marker={"size": 10, "color": "#1f77b4"},
            **bars,
        )
    )
    rows, px, py = _predicted_positions(t, xm, ym)
    if len(rows):  # measured trials sit at their measurement (feasible_table); the prediction beside
        fig.add_trace(
            go.Scatter(
                x=px,
                y=py,
                mode="markers",
                name="predicted latency (front, latency measured end to end)",
                marker={"symbol": "x", "color": "#595959", "size": 7},
                hovertext=[_hover(r, metrics) for r in rows.to_dict("records")],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title=title,
        template="plotly_white",
        xaxis_title=_label(xm, xmode),
        yaxis_title=_label(ym, ymode),
        legend={"orientation": "h", "y": -0.2},
        height=520,
    )
    for metric, update in ((xm, fig.update_xaxes), (ym, fig.update_yaxes)):
        if metric in LOG_AXES and (t[metric] > 0).all():
            update(type="log")
        if metric == "val_acc":
            update(tickformat=".1%")
    return fig


def fronts_page(df: pd.DataFrame, objectives: Iterable[Any], title: str = "") -> str:
    """One self-contained HTML page with a plot per pair of objectives (plotly.js embedded once)."""
    import html

    import plotly.io as pio

    objs = objective_pairs(objectives)
    t = feasible_table(df, objs)
    metrics = shown_metrics(objs, t.columns)
    head = f"{title}: " if title else ""
    parts = []
    for i, (y, x) in enumerate(itertools.combinations(objs, 2)):
        fig = _figure(t, y, x, f"{head}{y[0]} vs {x[0]}", metrics)
        parts.append(pio.to_html(fig, include_plotlyjs=i == 0, full_html=False, default_width="100%"))
    n_front = int(t["pareto"].sum())
    note = (
        f"{len(t)} feasible trials, {n_front} on the front of all objectives (ringed). "
        "Hover a point for its run; drag to zoom, double-click to reset."
    )
    if _has_measured(t).any():
        note += (
            " Latency axes show the front's latency measured end to end after the search; x: its prediction."
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title or 'Pareto fronts')}</title></head>\n"
        "<body style='font-family: sans-serif; margin: 1em 2em'>\n"
        f"<h2>{html.escape(title or 'Pareto fronts')}</h2>\n<p>{html.escape(note)}</p>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def front_text(front: Any, objectives: Sequence[tuple[str, str]]) -> str:
    """The Pareto front as a fixed-width table: objectives, then the other metrics, then the architecture.

    With repeated members (``search.repeats``) val_acc is the seed mean, followed by its standard
    deviation and the number of seeds; a member marked ``~`` is not told apart from one that
    dominates it once accuracy differences inside the error bars are ignored.
    """
    front = show_measured_latency(front)  # latency_ms: measured where measured; the prediction beside it
    metrics = [m for m, _ in objectives]
    for extra in ("val_acc", "macs", "params", "latency_ms", "latency_ms_predicted"):
        if extra not in metrics and extra in front.columns:
            metrics.append(extra)
    repeated = "seeds" in front.columns and (front["seeds"] > 1).any()

    def cell(r: dict, m: str) -> str:
        if m == "val_acc" and repeated:
            sd = f" ±{100 * r['val_acc_sd']:.2f}" if r.get("seeds", 1) > 1 else ""
            return f"{human(r.get(m), m)}{sd} (n={int(r.get('seeds', 1))})"
        return human(r.get(m), m)

    header = ["trial", *[m.replace("latency_ms_predicted", "predicted_ms") for m in metrics], "architecture"]
    rows = [
        [
            ("~" if r.get("indistinct") else "") + str(r["trial"]),
            *[cell(r, m) for m in metrics],
            arch_summary(r.get("arch")),
        ]
        for r in front.to_dict("records")
    ]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if "indistinct" in front.columns and front["indistinct"].any():
        lines.append(
            "~ not told apart from a member at least as good in every other objective: their accuracies "
            "(mean ± sd) overlap"
        )
    return "\n".join(lines)
