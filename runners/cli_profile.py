"""`hybridnas profile ARCH.yaml`: MACs, params and (with ``--latency``) latency per stage, printed.

The numbers come from `runners.macs.profile_spec`, `runners.latency.latency` and the in-place unit
timings of `runners.latency_table.measure_in_context`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hybridnas.runners.fmt import human
from hybridnas.runners.latency import LatencyContext, MeasureError, latency
from hybridnas.runners.latency_table import measure_in_context, spec_units
from hybridnas.runners.macs import profile_spec


def latency_shares(spec: Any, context: LatencyContext) -> dict[str, float]:
    """Share of the forward time per row ("stem", "0", "1", ..., "head"), from units timed in place."""
    per_unit = measure_in_context(spec, context)["units"]
    rows: dict[str, float] = {}
    for u in spec_units(spec, context.batch_size):
        row = "stem" if u.module == "stem" else "head" if u.module == "head" else str(u.stage)
        rows[row] = rows.get(row, 0.0) + per_unit[u.key]
    total = sum(rows.values()) or 1.0
    return {row: ms / total for row, ms in rows.items()}


def main_profile(args: argparse.Namespace) -> int:
    """``hybridnas profile ARCH.yaml [--latency] [--json] [--device] [--batch-size] [--threads]``."""
    from hybridnas.search_space.build import build_model
    from hybridnas.search_space.spec import ArchSpec

    spec = ArchSpec.from_yaml(Path(args.arch))  # a path, always: a missing file is a SpecError
    prof = profile_spec(spec)
    out: dict[str, Any] = {"macs": prof["macs"], "flops": prof["flops"], "params": prof["params"]}
    shares: dict[str, float] = {}
    if args.latency:
        batch = args.batch_size
        if not isinstance(batch, int) or batch < 1:
            raise MeasureError(f"--batch-size must be a positive integer, got {batch!r}")
        ctx = LatencyContext(device=args.device, batch_size=batch, threads=args.threads)
        inp = spec.input
        lat = latency(build_model(spec), (inp.channels, inp.size, inp.size), ctx)
        out.update(
            latency_ms=lat["median_ms"],
            latency_p10_ms=lat["p10_ms"],
            latency_p90_ms=lat["p90_ms"],
            latency_device=args.device,
            latency_clock=ctx.clock,
            batch_size=batch,
            threads=args.threads,
        )
        shares = latency_shares(spec, ctx)
    if args.json:
        out["stages"] = prof["stages"]
        print(json.dumps(out))
        return 0

    header = ["stage", "mixer", "res", "ch", "MACs", "params"] + (["latency"] if shares else [])
    rows = []
    first_res = spec.input.size

    def row(name: str, mixer: str, res: int, ch: int, macs: int, params: int) -> list[str]:
        cells = [name, mixer, f"{res}x{res}", str(ch), human(macs, "macs"), human(params, "params")]
        return cells + ([f"{100 * shares.get(name, 0.0):.1f}%"] if shares else [])

    rows.append(
        row("stem", "conv3x3", first_res, spec.stem.channels, prof["stem"]["macs"], prof["stem"]["params"])
    )
    for st in prof["stages"]:
        rows.append(
            row(str(st["stage"]), st["mixer"], st["resolution"], st["channels"], st["macs"], st["params"])
        )
    last = prof["stages"][-1]
    rows.append(
        row(
            "head",
            "pool+linear",
            last["resolution"],
            last["channels"],
            prof["head"]["macs"],
            prof["head"]["params"],
        )
    )
    total = ["total", "", "", "", human(prof["macs"], "macs"), human(prof["params"], "params")]
    if shares:
        total.append(f"{out['latency_ms']:.3f} ms")
    rows.append(total)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        )
    print(
        f"MACs = multiply-accumulates (flops = 2 x MACs = {human(prof['flops'], 'flops')}); "
        "attention products included."
    )
    if shares:
        print(
            f"latency: median of {lat['runs']} runs on {args.device}, batch {args.batch_size}, "
            f"{args.threads} thread(s), {ctx.clock} clock (p10 {lat['p10_ms']:.3f} ms, p90 "
            f"{lat['p90_ms']:.3f} ms); shares from units timed in place"
        )
    return 0
