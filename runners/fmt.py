"""One way to print a number: MACs, params, accuracy and latencies in tables and progress lines."""

from __future__ import annotations

import math
from typing import Any

COUNTS = ("macs", "flops", "params")  # printed with SI suffixes


def human(value: Any, metric: str = "") -> str:
    """Short human form of a metric value, by what the metric is.

    ``val_acc`` 0.9731 -> ``97.31%``; ``macs``/``flops``/``params`` 12345678 -> ``12.35M`` (K, M,
    G, T; whole numbers below 1000); a latency (a name with ``_ms`` in it: ``latency_ms``,
    ``latency_ms_measured``) -> ``0.558``; anything else 4 significant digits. None, NaN and inf
    print as ``-``; a value that is not a number prints as itself.
    """
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "-"
    if metric == "val_acc":
        return f"{100 * v:.2f}%"
    if metric in COUNTS:
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
            if abs(v) >= div:
                return f"{v / div:.2f}{suffix}"
        return f"{v:.0f}"
    if metric.endswith("_ms") or "_ms_" in metric:
        return f"{v:.3f}"
    return f"{v:.4g}"
