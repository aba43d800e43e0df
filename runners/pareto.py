"""Pareto fronts of a search: non-dominated sorting, hypervolume, the knee, and the plots.

Every function takes objective values as an ``(n, m)`` array plus one mode per column (``"max"`` or
``"min"``). Internally everything is turned into minimisation by negating the ``max`` columns, so a
point ``a`` dominates ``b`` when ``a <= b`` in every column and ``a < b`` in at least one.

- Non-dominated sorting and hypervolume come from moocore (López-Ibáñez et al.,
  https://multi-objective.github.io/moocore/python/), a maintained C library: the 2-D/3-D
  algorithms are O(n log n) (Fonseca, Paquete & López-Ibáñez 2006; Guerreiro & Fonseca 2017).
- The knee is the front member farthest from the hyperplane through the extreme points, after
  normalising each objective to [0, 1] over the front (Das 1999, "On characterizing the 'knee' of
  the Pareto curve based on Normal-Boundary Intersection", Structural Optimization 18; the same
  measure drives KnEA, Zhang, Tian & Jin 2015, https://doi.org/10.1109/TEVC.2014.2339823).

Rows with a missing (NaN) or infinite value are never on a front and add no hypervolume: a trial
that failed to report latency must not win by default.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hybridnas.runners.fmt import human

MODES = ("max", "min")
# The default when a parent run does not say which objectives it searched.
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (("val_acc", "max"), ("macs", "min"))
METRIC_COLUMNS = (
    "val_acc",  # the seed mean when the trial was repeated (search.repeats), else its one seed
    "val_acc_sd",  # standard deviation over its seeds (repeated trials only)
    "seeds",  # how many seeds val_acc is the mean of
    "val_acc_single",  # a repeated trial's accuracy with the search's own seed
    "macs",
    "flops",
    "params",
    "latency_ms",
    "latency_ms_measured",
    "train_time_s",
    "imgs_per_s",
)
# Axis labels with units. MACs are multiply-accumulates (what papers print as "FLOPs"); flops = 2 * macs.
LABELS = {
    "val_acc": "validation accuracy",
    "val_acc_sd": "validation accuracy, standard deviation over seeds",
    "macs": "MACs (multiply-accumulates)",
    "flops": "FLOPs (= 2 x MACs)",
    "params": "parameters",
    "latency_ms": "latency (ms; measured where measured, else predicted)",
    "latency_ms_predicted": "latency (ms, predicted)",
    "latency_ms_measured": "latency (ms, measured)",
    "train_time_s": "training time (s)",
    "imgs_per_s": "training throughput (images/s)",
}
# Counts that span decades across a search space: a log axis keeps the small models readable.
LOG_AXES = {"macs", "flops", "params"}


# ---------------------------------------------------------------------------------------------
# dominance, ranks, hypervolume, knee


def objective_pairs(objectives: Iterable[Any]) -> list[tuple[str, str]]:
    """Accept ``[(metric, mode)]``, ``[[metric, mode]]`` (JSON) or objects with ``.metric``/``.mode``."""
    pairs = []
    for o in objectives:
        metric, mode = (o.metric, o.mode) if hasattr(o, "metric") else (o[0], o[1])
        if mode not in MODES:
            raise ValueError(f"objective {metric!r}: mode {mode!r} is not one of {', '.join(MODES)}")
        pairs.append((str(metric), str(mode)))
    return pairs


def _as_min(points: Any, modes: Sequence[str]) -> np.ndarray:
    """(n, m) float array with the ``max`` columns negated, so that smaller is better everywhere."""
    p = np.asarray(points, dtype=float)
    if p.ndim == 1:  # one objective given as a flat vector
        p = p[:, None]
    if p.ndim != 2:
        raise ValueError(f"points must be an (n, m) array, got shape {p.shape}")
    if len(modes) != p.shape[1]:
        raise ValueError(f"{len(modes)} modes for {p.shape[1]} objective columns")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"mode {bad[0]!r} is not one of {', '.join(MODES)}")
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    return p * sign


def non_dominated(points: Any, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    Duplicates of a non-dominated point are all non-dominated (moocore's ``keep_weakly=True``): two
    trials that tie on every objective are both on the front. Rows with NaN/inf are ``False``.
    """
    import moocore

    p = _as_min(points, modes)
    mask = np.zeros(len(p), dtype=bool)
    finite = np.isfinite(p).all(axis=1)
    if finite.any():
        mask[finite] = moocore.is_nondominated(p[finite], keep_weakly=True)
    return mask


def pareto_ranks(points: Any, modes: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: 0 for the front, 1 for the front once 0 is removed, and so on.

    Duplicates share a rank. Rows with NaN/inf get -1 (unranked).
    """
    import moocore

    p = _as_min(points, modes)
    ranks = np.full(len(p), -1, dtype=int)
    finite = np.isfinite(p).all(axis=1)
    if finite.any():
        ranks[finite] = moocore.pareto_rank(p[finite])
    return ranks


def hypervolume(points: Any, modes: Sequence[str], reference: Sequence[float]) -> float:
    """Volume of objective space dominated by ``points`` and bounded by ``reference`` (moocore).

    ``reference`` is in the objectives' own units and directions (e.g. ``[0.0, 5e7]`` for
    val_acc max, macs min). Points that do not strictly beat the reference in every objective add
    nothing. With a fixed reference, adding points never lowers the value.
    """
    import moocore

    p = _as_min(points, modes)
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape != (p.shape[1],) or not np.isfinite(ref).all():
        raise ValueError(f"reference must be {p.shape[1]} finite numbers, got {list(reference)!r}")
    p = p[np.isfinite(p).all(axis=1)]
    if len(p) == 0:
        return 0.0
    return float(moocore.hypervolume(p, ref=ref * sign))


def _bound_max(bound: Any) -> float | None:
    """The upper limit of a constraint given as a number, ``{"max": x}`` or an object with ``.max``."""
    if bound is None:
        return None
    if isinstance(bound, (int, float)):
        return float(bound)
    value = bound.get("max") if isinstance(bound, Mapping) else getattr(bound, "max", None)
    return None if value is None else float(value)


def reference_point(
    objectives: Iterable[Any],
    first: Mapping[str, float] | None = None,
    constraints: Mapping[str, Any] | None = None,
    multiple: float = 10.0,
) -> np.ndarray:
    """The hypervolume reference of a search, fixed before (or at) its first finished trial.

    Policy, per objective:

    - ``max`` objectives (val_acc): 0, their natural lower bound (every hybridnas metric is >= 0).
    - ``min`` objectives with a constraint maximum (``constraints: {macs: {max: 5e7}}``): that
      maximum, since no feasible trial exceeds it (flops and macs imply each other: flops = 2 x macs).
    - other ``min`` objectives: ``multiple`` x the first finished trial's value (``first``).

    The reference never moves afterwards, so hypervolumes logged at each step compare with each
    other and never decrease as trials are added. A resumed search gets the same reference by
    passing the same first trial (or by storing the returned point).
    """
    constraints = dict(constraints or {})
    caps = {k: _bound_max(v) for k, v in constraints.items()}
    if caps.get("flops") is None and caps.get("macs") is not None:
        caps["flops"] = 2.0 * caps["macs"]
    if caps.get("macs") is None and caps.get("flops") is not None:
        caps["macs"] = caps["flops"] / 2.0
    ref = []
    for metric, mode in objective_pairs(objectives):
        if mode == "max":
            ref.append(0.0)
        elif caps.get(metric) is not None:
            ref.append(float(caps[metric]))
        else:
            value = None if first is None else first.get(metric)
            if value is None or not math.isfinite(float(value)):
                raise ValueError(
                    f"no reference for minimised {metric!r}: give a constraint maximum or the first"
                    " trial's value"
                )
            # A zero first value (nothing to scale) still needs a box with some volume.
            ref.append(multiple * float(value) if float(value) > 0 else 1.0)
    return np.asarray(ref, dtype=float)


# The best value each metric can take, where it has one: accuracy tops out at 1, every other
# hybridnas metric is a count or a time (>= 0, best at 0 when minimised).
_UPPER = {"val_acc": 1.0}


def ideal_point(objectives: Iterable[Any]) -> np.ndarray | None:
    """The best point the objectives can reach in principle (0 for a minimised metric, 1 for
    accuracy); None when a maximised objective has no upper bound."""
    ideal = []
    for metric, mode in objective_pairs(objectives):
        if mode == "min":
            ideal.append(0.0)
        elif metric in _UPPER:
            ideal.append(_UPPER[metric])
        else:
            return None
    return np.asarray(ideal, dtype=float)


def normalized_hypervolume(
    value: float, objectives: Iterable[Any], reference: Sequence[float]
) -> float | None:
    """``value`` as a share of the box between the reference and the ideal point (0-1): 1 would be
    an architecture with perfect accuracy and no cost. None without an ideal point or box."""
    ideal = ideal_point(objectives)
    if ideal is None:
        return None
    box = float(np.prod(np.abs(np.asarray(reference, dtype=float) - ideal)))
    return value / box if box > 0 and math.isfinite(box) else None


class HypervolumeTracker:
    """Hypervolume after each finished trial of a search, with the reference fixed at the first one.

    >>> hv = HypervolumeTracker([("val_acc", "max"), ("macs", "min")], constraints={"macs": {"max": 5e7}})
    >>> hv.add({"val_acc": 0.9, "macs": 1e7})  # 0.9 * (5e7 - 1e7)
    36000000.0
    """

    def __init__(
        self,
        objectives: Iterable[Any],
        constraints: Mapping[str, Any] | None = None,
        reference: Sequence[float] | None = None,
        multiple: float = 10.0,
    ):
        self.objectives = objective_pairs(objectives)
        self.modes = [mode for _, mode in self.objectives]
        self.constraints = dict(constraints or {})
        self.multiple = multiple
        self.reference = None if reference is None else np.asarray(reference, dtype=float)
        self.points: list[list[float]] = []

    def add(self, metrics: Mapping[str, float]) -> float:
        """Add one finished, feasible trial's metrics; return the hypervolume of all trials so far."""
        if self.reference is None:
            self.reference = reference_point(self.objectives, metrics, self.constraints, self.multiple)
        self.points.append([float(metrics.get(m, math.nan)) for m, _ in self.objectives])
        return self.value

    @property
    def value(self) -> float:
        if not self.points:
            return 0.0
        return hypervolume(np.array(self.points), self.modes, self.reference)

    @property
    def normalized(self) -> float | None:
        """`value` as a share of the reference box (`normalized_hypervolume`); None before the
        first point or when the objectives have no ideal point."""
        if self.reference is None:
            return None
        return normalized_hypervolume(self.value, self.objectives, self.reference)


def knee(points: Any, modes: Sequence[str]) -> int:
    """Index (into ``points``) of the knee of the front: the best trade-off, where gaining more in
    one objective starts to cost a lot in the others.

    Method: take the non-dominated points, normalise each objective to [0, 1] over the front (0 =
    best), find the extreme point of each objective (best in it, ties broken by the others), and
    return the front member with the largest signed distance to the hyperplane through those
    extremes, on the side of the ideal point (Das 1999). In 2-D that hyperplane is the line between
    the two ends of the front, so the knee is the point bulging farthest towards the ideal corner.
    When the extremes do not span a hyperplane (fewer distinct extremes than objectives), the
    plane ``sum(x) = const`` through their centroid is used instead. Ties go to the point closest
    to the ideal point. Scaling an objective does not move the knee; a log scale would (the
    normalisation is linear).
    """
    p = _as_min(points, modes)
    front = np.flatnonzero(non_dominated(points, modes))
    if len(front) == 0:
        raise ValueError("no point with finite values in every objective")
    f = p[front]
    lo, hi = f.min(axis=0), f.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (f - lo) / span
    m = z.shape[1]
    if m == 1:
        return int(front[int(np.argmin(z[:, 0]))])
    extremes = []
    for j in range(m):
        others = np.delete(z, j, axis=1).sum(axis=1)
        extremes.append(int(np.lexsort((others, z[:, j]))[0]))
    e = z[extremes]
    normal, offset = None, 0.0
    if len(set(extremes)) == m:
        try:
            normal = np.linalg.solve(e, np.ones(m))
            offset = 1.0
        except np.linalg.LinAlgError:
            normal = None
        if normal is not None and not np.isfinite(normal).all():
            normal = None
    if normal is None:
        normal, offset = np.ones(m), float(e.sum(axis=1).mean())
    distance = (offset - z @ normal) / np.linalg.norm(normal)
    closeness = np.linalg.norm(z, axis=1)
    best = np.lexsort((closeness, -np.round(distance, 12)))[0]
    return int(front[best])


def dominated_within_noise(points: Any, spreads: Any, modes: Sequence[str]) -> np.ndarray:
    """For each row: does another row dominate it once differences inside the error bars are ignored?

    ``spreads`` has the shape of ``points`` (a standard deviation per value; 0 for exact values such
    as MACs). Two values are tied when their intervals ``value +- spread`` overlap. Row ``j`` is
    marked when some row ``i`` is better than or tied with it in every objective and better beyond
    the error bars in at least one: a front member whose only edge is an accuracy inside seed noise
    cannot be told apart from a cheaper member. With zero spreads this is plain dominance.
    """
    p = _as_min(points, modes)
    s = np.abs(np.asarray(spreads, dtype=float).reshape(p.shape))
    s = np.where(np.isfinite(s), s, 0.0)
    out = np.zeros(len(p), dtype=bool)
    for j in range(len(p)):
        if not np.isfinite(p[j]).all():
            continue
        tied = np.abs(p - p[j]) <= s + s[j]
        no_worse = ((p <= p[j]) | tied).all(axis=1)
        better = ((p < p[j]) & ~tied).any(axis=1)
        mark = no_worse & better & np.isfinite(p).all(axis=1)
        mark[j] = False
        out[j] = bool(mark.any())
    return out


# ---------------------------------------------------------------------------------------------
# tables and plots


def arch_summary(spec: Any) -> str:
    """Mixers per stage in one line: ``conv x2 c32 | acmix x1 c64 +ca``."""
    if spec is None or not hasattr(spec, "stages"):
        return ""
    parts = []
    for st in spec.stages:
        text = f"{st.mixer} x{st.depth} c{st.channels}"
        if getattr(st, "addon", "none") not in (None, "none"):
            text += f" +{st.addon}"
        parts.append(text)
    return " | ".join(parts)


def trial_key(t: Any) -> tuple:
    """Sort trial ids naturally: '2' before '10', Ray ids 'abc_00002' by their number."""
    s = str(t)
    tail = s.rsplit("_", 1)[-1]
    return (0, int(tail), s) if tail.isdigit() else (1, 0, s)


def feasible_table(df: pd.DataFrame, objectives: Iterable[Any]) -> pd.DataFrame:
    """The trials that can be compared: status ok (when given) and every objective finite, with
    ``pareto`` (bool), ``rank`` and ``arch_summary`` columns added, front first; with a
    ``val_acc_sd`` column also ``indistinct``: front members `dominated_within_noise`."""
    objs = objective_pairs(objectives)
    metrics = [m for m, _ in objs]
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"objective column(s) {missing} not in the table (columns: {list(df.columns)})")
    t = df.copy()
    if "status" in t.columns:
        t = t[t["status"].fillna("ok") == "ok"]
    for m in metrics:
        t[m] = pd.to_numeric(t[m], errors="coerce")
    t = t[np.isfinite(t[metrics].to_numpy(dtype=float)).all(axis=1)].copy()
    values = t[metrics].to_numpy(dtype=float).reshape(len(t), len(metrics))
    modes = [mode for _, mode in objs]
    t["pareto"] = non_dominated(values, modes) if len(t) else np.zeros(0, dtype=bool)
    t["rank"] = pareto_ranks(values, modes) if len(t) else np.zeros(0, dtype=int)
    if "val_acc_sd" in t.columns and "val_acc" in metrics:
        # Front members whose edge over a member that dominates them otherwise is an accuracy
        # inside the seeds' error bars (search.repeats): not told apart from it.
        spreads = np.zeros_like(values)
        spreads[:, metrics.index("val_acc")] = pd.to_numeric(t["val_acc_sd"], errors="coerce").fillna(0.0)
        front = t["pareto"].to_numpy()
        marks = np.zeros(len(t), dtype=bool)
        if front.any():
            marks[front] = dominated_within_noise(values[front], spreads[front], modes)
        t["indistinct"] = marks
    if "arch_summary" not in t.columns:
        t["arch_summary"] = [arch_summary(a) for a in t["arch"]] if "arch" in t.columns else ""
    if "arch" in t.columns and "arch_hash" not in t.columns:
        t["arch_hash"] = [a.arch_hash() if hasattr(a, "arch_hash") else "" for a in t["arch"]]
    first_metric, first_mode = objs[0]
    t["_trial_key"] = [trial_key(x) for x in t["trial"]] if "trial" in t.columns else 0
    t = t.sort_values(
        ["rank", first_metric, "_trial_key"], ascending=[True, first_mode == "min", True], kind="stable"
    )
    return show_measured_latency(t.drop(columns=["_trial_key"]).reset_index(drop=True))


def show_measured_latency(t: pd.DataFrame) -> pd.DataFrame:
    """``latency_ms`` as a user should read it: the end-to-end measurement where the trial was
    measured (``latency_ms_measured``, the front after a search), else the table's prediction,
    which stays beside it as ``latency_ms_predicted``. Applied after the front is chosen, so the
    ``pareto`` flags and ranks are those of the values the search optimised. Applying it again
    changes nothing; without a ``latency_ms_measured`` column it returns ``t`` as it is."""
    if not {"latency_ms", "latency_ms_measured"} <= set(t.columns):
        return t
    t = t.copy()
    predicted = pd.to_numeric(t["latency_ms"], errors="coerce")
    if "latency_ms_predicted" in t.columns:
        earlier = pd.to_numeric(t["latency_ms_predicted"], errors="coerce")
        predicted = earlier.where(np.isfinite(earlier), predicted)
    measured = pd.to_numeric(t["latency_ms_measured"], errors="coerce")
    t["latency_ms_predicted"] = predicted
    t["latency_ms"] = measured.where(np.isfinite(measured), predicted)
    return t


def _csv_frame(t: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    metrics = [m for m, _ in objectives]
    lead = ["trial", "run_id", "pareto", "rank"]
    metric_cols = metrics + [c for c in METRIC_COLUMNS if c not in metrics]
    if "latency_ms" in metric_cols:  # the prediction beside the latency shown
        metric_cols.insert(metric_cols.index("latency_ms") + 1, "latency_ms_predicted")
    tail = ["arch_summary", "arch_hash", "status", "parent_run_id"]
    order = [c for c in lead + metric_cols + tail if c in t.columns]
    rest = [c for c in t.columns if c not in order and c != "arch"]
    return t[order + rest]


def front_table(df: pd.DataFrame, objectives: Iterable[Any], front_only: bool = True) -> str:
    """A fixed-width text table of the front (or all feasible trials), for the terminal."""
    objs = objective_pairs(objectives)
    t = feasible_table(df, objs)
    if front_only:
        t = t[t["pareto"]]
    metrics = [m for m, _ in objs] + [
        c for c in ("val_acc", "macs", "params", "latency_ms", "latency_ms_predicted") if c not in dict(objs)
    ]
    metrics = [m for m in metrics if m in t.columns]
    header = ["trial", *metrics, "arch"]
    rows = [
        [str(r.get("trial", "")), *[human(r.get(m), m) for m in metrics], str(r.get("arch_summary", ""))]
        for r in t.to_dict("records")
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _label(metric: str, mode: str) -> str:
    better = "higher" if mode == "max" else "lower"
    return f"{LABELS.get(metric, metric)}, {better} is better"


def _step_where(x_mode: str) -> str:
    """Where the attainment staircase steps, for points sorted by ascending x.

    With x minimised, between two front points the best reachable y is the left point's (the step
    comes after it: 'post'); with x maximised it is the right point's ('pre').
    """
    return "post" if x_mode == "min" else "pre"


def _predicted_positions(t: pd.DataFrame, xm: str, ym: str) -> tuple[pd.DataFrame, list, list]:
    """The measured trials and where their predicted latency would put them (when an axis is latency)."""
    if "latency_ms" not in (xm, ym) or "latency_ms_predicted" not in t.columns:
        return t.iloc[:0], [], []
    rows = t[np.isfinite(pd.to_numeric(t["latency_ms_measured"], errors="coerce"))]
    px = rows["latency_ms_predicted" if xm == "latency_ms" else xm].astype(float).tolist()
    py = rows["latency_ms_predicted" if ym == "latency_ms" else ym].astype(float).tolist()
    return rows, px, py


def _png(t, y, x, front2, title) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    (ym, ymode), (xm, xmode) = y, x
    fig = Figure(figsize=(7.0, 5.0), dpi=110)
    ax = fig.add_subplot()
    ax.scatter(t[xm], t[ym], s=22, color="0.65", label=f"all feasible trials ({len(t)})", zorder=2)
    full_only = t["pareto"].to_numpy() & ~front2
    if full_only.any():
        ax.scatter(
            t.loc[full_only, xm],
            t.loc[full_only, ym],
            s=40,
            facecolors="none",
            edgecolors="C1",
            label="on the front of all objectives",
            zorder=3,
        )
    f = t[front2].sort_values(xm, kind="stable")
    ax.step(f[xm], f[ym], where=_step_where(xmode), color="C0", lw=1.5, zorder=3)
    ax.scatter(f[xm], f[ym], s=40, color="C0", label=f"Pareto front: {ym} vs {xm}", zorder=4)
    bars = error_bars(f, xm, ym)
    if bars:  # seed means of repeated members: +- one standard deviation
        ax.errorbar(f[xm], f[ym], **bars, fmt="none", ecolor="C0", alpha=0.6, capsize=3, zorder=3)
    rows, px, py = _predicted_positions(t, xm, ym)
    if len(rows):  # the measured trials sit at their measurement; their prediction is drawn beside
        ax.scatter(
            px, py, marker="x", s=18, color="0.35", label="predicted latency (measured trials)", zorder=2
        )
        for a, b, c, d in zip(px, py, rows[xm].astype(float), rows[ym].astype(float)):
            ax.plot([a, c], [b, d], color="0.6", lw=0.6, zorder=1)
    for _, r in f.iterrows():
        ax.annotate(
            str(r.get("trial", "")), (r[xm], r[ym]), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    for metric, setter in ((xm, ax.set_xscale), (ym, ax.set_yscale)):
        if metric in LOG_AXES and (t[metric] > 0).all():
            setter("log")
    if ym == "val_acc":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if xm == "val_acc":
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(_label(xm, xmode))
    ax.set_ylabel(_label(ym, ymode))
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def error_bars(f: pd.DataFrame, xm: str, ym: str) -> dict[str, list[float]]:
    """``{"yerr": [...]}`` / ``{"xerr": [...]}`` for a val_acc axis when the front has seed spreads."""
    if "val_acc_sd" not in f.columns or not (pd.to_numeric(f["val_acc_sd"], errors="coerce") > 0).any():
        return {}
    sd = pd.to_numeric(f["val_acc_sd"], errors="coerce").fillna(0.0).astype(float).tolist()
    return {"yerr": sd} if ym == "val_acc" else {"xerr": sd} if xm == "val_acc" else {}


def write_fronts(
    df: pd.DataFrame,
    objectives: Iterable[Any],
    out_dir: str | Path,
    title: str | None = None,
    *,
    csv: bool = True,
    plots: bool = True,
    link: Any = None,
) -> list[Path]:
    """Write ``pareto.csv``, ``front.md``, ``fronts.html`` and a ``pareto_<a>_vs_<b>.png`` per pair.

    ``df`` has one row per trial with the objective columns, ``trial``, and optionally ``status``
    (only ``ok`` rows are used), ``run_id``, ``run_name``, ``latency_ms_measured`` and ``arch`` (an
    ArchSpec, summarised per stage). The CSV holds every feasible trial with its ``pareto`` flag
    and non-dominated ``rank``; ``front.md`` the front as a markdown table
    (`runners.front_report.front_markdown`, its runs linked by ``link(run_id)`` when given);
    ``fronts.html`` one interactive page with every pair (`runners.front_report.fronts_page`). In
    each plot ``a`` is on the y axis and ``b`` on the x axis; the front of that pair is connected as
    the attainment staircase and the front of all objectives is ringed. Files are written
    atomically. Returns the written paths (CSV first). ``csv=False`` / ``plots=False`` leave out
    the CSV / everything else.
    """
    from hybridnas.runners import front_report
    from hybridnas.runners.files import atomic_write

    objs = objective_pairs(objectives)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = feasible_table(df, objs)
    paths = [atomic_write(out / "pareto.csv", _csv_frame(t, objs).to_csv(index=False))] if csv else []
    if len(t) == 0 or not plots:
        return paths
    paths.append(atomic_write(out / "front.md", front_report.front_markdown(df, objs, title or "", link)))
    if len(objs) < 2:
        return paths
    for y, x in itertools.combinations(objs, 2):
        front2 = non_dominated(t[[y[0], x[0]]].to_numpy(dtype=float), [y[1], x[1]])
        head = f"{title}: " if title else ""
        caption = f"{head}{y[0]} vs {x[0]} ({int(front2.sum())} on the front)"
        paths.append(atomic_write(out / f"pareto_{y[0]}_vs_{x[0]}.png", _png(t, y, x, front2, caption)))
    paths.append(atomic_write(out / "fronts.html", front_report.fronts_page(df, objs, title or "")))
    return paths
