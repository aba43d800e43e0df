"""What the latency cache holds, and clearing it: the library side of `hybridnas cache`.

The cache is one file, `runners.latency_table.default_table_path()` (``HYBRIDNAS_CACHE_DIR``
moves it). Its entries are keyed by the measuring context (`LatencyContext.key`: machine,
threads, batch, dtype, clock, torch version, block code); each calibrated space leaves a record
with its name, time and quality (`runners.calibration.calibrate_latency`). Nothing here prints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from hybridnas.runners.calibration import SPACE, trusted
from hybridnas.runners.latency import code_version
from hybridnas.runners.latency_table import ARCH, OVERHEAD, LatencyTable
from hybridnas.search_space.errors import UserError, did_you_mean


class CacheError(UserError):
    """A cache request that names something the cache does not hold."""


def parse_context(key: str) -> dict[str, str]:
    """``"cpu:AMD EPYC|threads=1|batch=1|..."`` -> ``{"machine": "cpu:AMD EPYC", "threads": "1", ...}``."""
    machine, *fields = key.split("|")
    out = {"machine": machine}
    for f in fields:
        name, _, value = f.partition("=")
        out[name] = value
    return out


def set_aside_files(path: Path) -> list[Path]:
    """Table files set aside as corrupt or of another format (``latency.json.bad-*``)."""
    return sorted(path.parent.glob(path.name + ".bad-*")) if path.parent.is_dir() else []


def cache_report(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the cache holds: ``{"path", "bytes", "set_aside", "contexts": [...]}``.

    One dict per measuring context, newest first: ``machine``, ``threads``, ``batch``, ``dtype``,
    ``clock``, ``torch``, ``code``, ``current`` (this torch and this block code would use it),
    ``units``/``archs`` (entries), ``noisy`` (entries to be measured again), ``age_s`` (since the
    newest entry), and ``spaces``: each calibrated space's ``name``, ``key``, ``calibrated``,
    ``quality`` and ``age_s``. A bad file is set aside on reading (`LatencyTable`).
    """
    table = LatencyTable(path)
    now = time.time()
    contexts: dict[str, dict[str, Any]] = {}
    for key, entry in table.items():
        ctx, _, what = key.partition("||")
        c = contexts.setdefault(
            ctx,
            {
                **parse_context(ctx),
                "key": ctx,
                "units": 0,
                "archs": 0,
                "noisy": 0,
                "newest": None,
                "spaces": [],
            },
        )
        at = entry.get("at")
        if isinstance(at, (int, float)):
            c["newest"] = max(c["newest"] or at, at)
        if what.startswith(SPACE):
            q = entry.get("quality", {})
            c["spaces"].append(
                {
                    "name": entry.get("name") or what,
                    "key": key,
                    "calibrated": bool(q.get("calibrated")) and not q.get("noisy"),
                    "quality": q,
                    "age_s": now - at if isinstance(at, (int, float)) else None,
                }
            )
            continue
        if what.startswith(ARCH):
            c["archs"] += 1
        elif what != OVERHEAD:
            c["units"] += 1
        if what != OVERHEAD and not trusted(entry):
            c["noisy"] += 1
    for c in contexts.values():
        newest = c.pop("newest")
        c["age_s"] = None if newest is None else now - newest
        c["current"] = c.get("torch") == torch.__version__ and c.get("code") == code_version()
    rows = sorted(contexts.values(), key=lambda c: (c["age_s"] is None, c["age_s"] or 0))
    exists = table.path.exists()
    return {
        "path": str(table.path),
        "bytes": table.path.stat().st_size if exists else 0,
        "set_aside": [str(p) for p in set_aside_files(table.path)],
        "contexts": rows,
    }


def clear_cache(path: str | os.PathLike | None = None, space: str | None = None) -> dict[str, Any]:
    """Clear the whole cache (the file and any set-aside copies), or one space's calibrations.

    ``space`` is a name `cache_report` lists (the experiment's name). Its calibration records go,
    in every context, with the unit and end-to-end entries made of its units only; any other
    space that used one of those entries is no longer calibrated either (its record goes too, and
    its next search measures what is missing). Returns ``{"entries", "spaces", "files"}``: how many
    entries, which spaces' records and which files were removed. An unknown name is a `CacheError`
    that lists the names the cache holds.
    """
    table_path = Path(path).expanduser() if path is not None else None
    if space is None:
        table = LatencyTable(table_path)
        n, files = len(table), [str(table.path)] if table.clear() else []
        for p in set_aside_files(table.path):
            p.unlink(missing_ok=True)
            files.append(str(p))
        return {"entries": n, "spaces": [], "files": files}
    table = LatencyTable(table_path)
    records = {k: e for k, e in table.items() if k.partition("||")[2].startswith(SPACE)}
    names = sorted({e.get("name") or "" for e in records.values()} - {""})
    chosen = {k: e for k, e in records.items() if e.get("name") == space}
    if not chosen:
        held = ", ".join(names) or "none"
        raise CacheError(
            f"no calibrated space named {space!r} in {table.path} (spaces: {held}){did_you_mean(space, names)}"
        )
    drop: set[str] = set(chosen)
    for key, rec in chosen.items():
        ctx = key.partition("||")[0]
        units = {f"{ctx}||{u}" for u in rec.get("keys", [])}
        drop |= units & {k for k, _ in table.items()}
        for k, e in table.items():  # end-to-end entries of this space's architectures
            if k.startswith(f"{ctx}||{ARCH}") and {f"{ctx}||{u}" for u in e.get("units", [])} <= units:
                drop.add(k)
    others = []
    for key, rec in records.items():
        ctx = key.partition("||")[0]
        if key not in drop and {f"{ctx}||{u}" for u in rec.get("keys", [])} & drop:
            drop.add(key)
            others.append(rec.get("name") or key)
    n = table.remove(drop)
    return {"entries": n, "spaces": [space, *sorted(set(others))], "files": []}
