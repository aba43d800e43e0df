"""The ablation table: per-variant mean and spread over seeds, and the difference to the base.

The difference uses Welch's t-test (unequal variances): the interval is
``diff +- t_{1-a/2, df} * sqrt(s_v^2/n_v + s_b^2/n_b)`` with the Welch-Satterthwaite df, and the
p-value is scipy's ``ttest_ind(equal_var=False)``. A row is marked when its interval excludes zero.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from hybridnas.runners.fmt import human


@dataclass(frozen=True)
class Row:
    variant: str
    factor: str
    value: str
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan with one seed
    macs: float
    params: float
    latency_ms: float
    diff: float  # mean - base mean; 0 for the base
    ci_low: float  # nan without intervals
    ci_high: float
    p_value: float
    significant: bool


def welch(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(diff, ci_low, ci_high, p) for mean(a) - mean(b); nan interval when either side has < 2 values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        # Both sides are constant: the difference is exact (a degenerate interval); no test to run.
        return diff, diff, diff, (1.0 if diff == 0 else 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return diff, diff - half, diff + half, p


def build_table(results: list[dict], confidence: float = 0.95, metric: str = "val_acc") -> list[Row]:
    """results: one dict per finished (variant, seed) with variant, factor, value, seed and metric values.

    The base ("base") comes first; other variants follow in the order they first appear.
    """
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    if "base" not in by_variant:
        raise ValueError("no finished run of the base architecture: cannot compute differences")
    base_vals = np.array([r[metric] for r in by_variant["base"]], dtype=float)
    order = ["base"] + [v for v in by_variant if v != "base"]
    rows = []
    for name in order:
        rs = by_variant[name]
        vals = np.array([r[metric] for r in rs], dtype=float)
        if name == "base":
            diff, lo, hi, p = 0.0, math.nan, math.nan, math.nan
        else:
            diff, lo, hi, p = welch(vals, base_vals, confidence)
        sig = bool(not math.isnan(lo) and (lo > 0 or hi < 0))
        rows.append(
            Row(
                variant=name,
                factor=rs[0].get("factor", name),
                value=rs[0].get("value", ""),
                n=len(vals),
                mean=float(vals.mean()),
                std=float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
                macs=float(np.mean([r.get("macs", math.nan) for r in rs])),
                params=float(np.mean([r.get("params", math.nan) for r in rs])),
                latency_ms=float(np.mean([r.get("latency_ms", math.nan) for r in rs])),
                diff=diff,
                ci_low=lo,
                ci_high=hi,
                p_value=p,
                significant=sig,
            )
        )
    return rows


def _pct(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _p(x: float) -> str:
    return "-" if math.isnan(x) else ("<0.001" if x < 1e-3 else f"{x:.3f}")


def _cells(r: Row, confidence: float) -> list[str]:
    ci = "-" if math.isnan(r.ci_low) else f"[{_pct(r.ci_low, True)}, {_pct(r.ci_high, True)}]"
    return [
        r.variant + (" *" if r.significant else ""),
        str(r.n),
        f"{_pct(r.mean)} ± {_pct(r.std)}" if not math.isnan(r.std) else _pct(r.mean),
        "-" if r.variant == "base" else _pct(r.diff, True),
        ci,
        _p(r.p_value),
        human(r.macs, "macs"),
        human(r.params, "params"),
        "-" if math.isnan(r.latency_ms) else f"{r.latency_ms:.3f}",
    ]


def headers(confidence: float) -> list[str]:
    c = f"{round(100 * confidence)}% CI"
    return [
        "variant",
        "seeds",
        "val_acc % (mean ± sd)",
        "Δ vs base (pp)",
        c,
        "p (Welch)",
        "MACs",
        "params",
        "latency ms",
    ]


def to_markdown(rows: list[Row], confidence: float = 0.95, title: str = "") -> str:
    head = headers(confidence)
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r, confidence)) + " |" for r in rows]
    lines += ["", f"`*`: the {round(100 * confidence)}% confidence interval of the difference excludes zero."]
    return "\n".join(lines) + "\n"


def to_text(rows: list[Row], confidence: float = 0.95) -> str:
    head = headers(confidence)
    body = [_cells(r, confidence) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def _tex_escape(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("#", r"\#"),
        ("$", r"\$"),
    ):
        s = s.replace(a, b)
    return s


def to_latex(rows: list[Row], confidence: float = 0.95, caption: str = "") -> str:
    c = round(100 * confidence)
    out = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{lrrrrrrr}",
        r"\toprule",
        rf"Variant & Seeds & Top-1 (\%) & $\Delta$ (pp) & {c}\% CI & $p$ & MACs & Params \\",
        r"\midrule",
    ]
    for r in rows:
        mean = f"{100 * r.mean:.2f}" + ("" if math.isnan(r.std) else rf" $\pm$ {100 * r.std:.2f}")
        diff = "--" if r.variant == "base" else f"{100 * r.diff:+.2f}"
        if r.significant:
            diff = rf"\textbf{{{diff}}}"
        ci = "--" if math.isnan(r.ci_low) else f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"
        out.append(
            rf"{_tex_escape(r.variant)} & {r.n} & {mean} & {diff} & {ci} & {_p(r.p_value).replace('<', '$<$')} & "
            rf"{human(r.macs, 'macs')} & {human(r.params, 'params')} \\"
        )
        if r.variant == "base":
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{_tex_escape(caption)}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(rows: list[Row], path: Path, title: str = "", confidence: float = 0.95) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 4.0), dpi=120)
    x = np.arange(len(rows))
    means = np.array([100 * r.mean for r in rows])
    errs = np.array([0.0 if math.isnan(r.std) else 100 * r.std for r in rows])
    colors = ["#555555" if r.variant == "base" else ("#1f77b4" if r.significant else "#9ecae1") for r in rows]
    ax.bar(x, means, yerr=errs, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
    ax.axhline(means[0], color="#555555", linestyle="--", linewidth=0.8)
    lo = float(np.nanmin(means - errs))
    hi = float(np.nanmax(means + errs))
    pad = max(0.5, 0.15 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    ax.set_xticks(x, [r.variant.replace(", ", "\n") for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val_acc (%), mean ± sd over seeds")
    ax.set_title(title or "ablation", fontsize=10)
    fig.text(
        0.99,
        0.01,
        f"dark blue: {round(100 * confidence)}% CI of Δ excludes 0",
        ha="right",
        fontsize=7,
        color="#1f77b4",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
