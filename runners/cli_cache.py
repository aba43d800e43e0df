"""`hybridnas cache [show|clear] [--space NAME]`: the latency cache, printed; the work is `runners.cache`."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from hybridnas.runners.cache import CacheError, cache_report, clear_cache
from hybridnas.runners.calibration import deviation_text


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _quality(q: dict[str, Any]) -> str:
    parts = []
    if q.get("noise") is not None:
        parts.append(f"noise {deviation_text(q['noise'])}")
    if q.get("tail") is not None:
        parts.append(f"tail {deviation_text(q['tail'])}")
    if q.get("refit") is not None:
        parts.append(f"refit {100 * q['refit']:.0f}% of {q.get('archs', 0)} within 10%")
    if q.get("noisy"):
        parts.append(f"{q['noisy']} noisy entries")
    if q.get("load") is not None:
        parts.append(f"load {q['load']:.1f}")
    return ", ".join(parts)


def report_text(report: dict[str, Any]) -> str:
    """The cache as a table: one line per measuring context, one per calibrated space under it."""
    size = report["bytes"]
    lines = [
        f"latency cache: {report['path']} ({size / 1024:.0f} KiB)"
        if size
        else f"latency cache: {report['path']} (empty)"
    ]
    header = [
        "machine",
        "threads",
        "batch",
        "dtype",
        "clock",
        "torch",
        "code",
        "units",
        "archs",
        "noisy",
        "age",
    ]
    rows = [
        [
            c["machine"],
            c.get("threads", "?"),
            c.get("batch", "?"),
            c.get("dtype", "?"),
            c.get("clock", "?"),
            c.get("torch", "?"),
            c.get("code", "?") + ("" if c["current"] else " (old)"),
            str(c["units"]),
            str(c["archs"]),
            str(c["noisy"]),
            _age(c["age_s"]),
        ]
        for c in report["contexts"]
    ]
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        for c, r in zip(report["contexts"], rows):
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            for s in c["spaces"]:
                state = "calibrated" if s["calibrated"] else "NOT calibrated"
                lines.append(
                    f"    space {s['name']}: {state} ({_quality(s['quality'])}), {_age(s['age_s'])} ago"
                )
    for p in report["set_aside"]:
        lines.append(f"set aside (unreadable or another format; delete it or `hybridnas cache clear`): {p}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``hybridnas cache [show]`` lists the cache; ``hybridnas cache clear [--space NAME]`` empties it."""
    if getattr(args, "action", "show") != "clear" and getattr(args, "space", None):
        raise CacheError("--space goes with `hybridnas cache clear`")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if getattr(args, "action", "show") == "clear":
            res = clear_cache(space=getattr(args, "space", None))
            text = (
                f"removed the latency cache ({', '.join(res['files'])}; {res['entries']} entries)"
                if res["files"]
                else f"removed {res['entries']} entries of space(s) {', '.join(res['spaces'])}"
                if res["spaces"]
                else "the latency cache is empty"
            )
        else:
            text = report_text(cache_report())
    for w in caught:
        print(f"hybridnas: warning: {w.message}", file=sys.stderr)
    print(text)
    return 0
